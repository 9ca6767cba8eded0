"""The family sweep (issue 10) on a fixed subset: the nine families the issue names, every op of the sweep.

Every cell must be exact, approx or refused -- never a crash. The cells that crash today are listed in
KNOWN_CRASHES and run as strict xfails: fixing one makes its test XPASS (a failure), which forces the
list to be updated. The full table (every causal-LM family x every op) is benchmarks/family_sweep.py.
"""

from __future__ import annotations

import time

import pytest
from pathlib import Path

from scaler_wizard import sweep

NINE = ["cohere", "gptj", "phi", "stablelm", "bloom", "falcon", "olmo2", "mamba", "gemma3_text"]
SUBSET_OPS = list(sweep.OPS)  # every op of the sweep on the nine families (the rest: benchmarks/family_sweep.py)

# (family, op) -> why it crashes today (measured with transformers 5.24; see benchmarks/family_sweep.json).
# Empty since the fixes by kind (FalconLinear's x @ W.T, hand-written LayerNorms, SW350 / SW351 / SW352).
KNOWN_CRASHES: dict[tuple[str, str], str] = {}


def test_every_causal_lm_family_is_enumerated():
    fams = sweep.causal_lm_families()
    assert len(fams) > 100
    assert set(NINE) <= set(fams)
    assert fams == sorted(fams)


def test_tiny_config_shrinks_sizes_generically():
    cfg, applied = sweep.tiny_config("gemma3_text")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (16, 96, 128)
    assert len(cfg.layer_types) == 2
    assert applied["hidden_size"] == (2304, 64)
    # Multi-query attention stays multi-query; special token ids move into the small vocabulary.
    cfg, _ = sweep.tiny_config("gptj")
    assert cfg.n_embd == 64 and cfg.n_layer == 2 and cfg.eos_token_id < cfg.vocab_size


def test_unknown_op_is_refused_before_running():
    with pytest.raises(ValueError, match="unknown ops"):
        sweep.run_sweep(["llama"], ["widen_everything"])


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    # Run once per test session, whichever xdist worker comes first: the others wait on the lock and
    # read the result (the base temp's parent is shared by the workers of one session).
    import json

    from filelock import FileLock

    path = tmp_path_factory.getbasetemp().parent / "family_sweep_subset.json"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return json.loads(path.read_text())
        result = sweep.run_sweep(NINE, SUBSET_OPS, workers=2, timeout=600)
        path.write_text(json.dumps(result))
        return result


def _cells():
    for fam in NINE:
        for op in SUBSET_OPS:
            marks = []
            if (fam, op) in KNOWN_CRASHES:
                marks = [pytest.mark.xfail(strict=True, reason=KNOWN_CRASHES[(fam, op)])]
            yield pytest.param(fam, op, marks=marks, id=f"{fam}-{op}")


@pytest.mark.slow
# one xdist worker runs these (tests/conftest.py XDIST_GROUPS; the fixture also holds a file lock)
@pytest.mark.parametrize("family,op", list(_cells()))
def test_sweep_cell_is_not_a_crash(subset, family, op):
    r = subset["families"][family]
    assert r["built"], f"{family} could not be built tiny: {r['unbuildable']}"
    cell = r["cells"][op]
    assert cell["cell"] in sweep.CATEGORIES
    assert cell["cell"] != "crash", f"{family} / {op}: {cell['reason']}"
    if cell["cell"] == "refused":
        assert cell["reason"].startswith("SW") or "Error" not in cell["reason"][:40], cell["reason"]


# ---------------------------------------------------------------- fixes by kind (fast: check / IR only)
from families import first_refusal as _refusal, sweep_tiny as _tiny  # noqa: E402


def test_state_space_model_is_refused_as_not_a_transformer(tmp_path_factory, tmp_path):
    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError

    model = _tiny(tmp_path_factory, "mamba")
    for plan in ("widen hidden x2 tile", "insert layer 1 identity", "widen vocab by 64 mean"):
        d = _refusal(plan, model)
        assert d.code == "SW350" and "`mamba` (MambaForCausalLM) is not a transformer" in d.message, d.message
    out = tmp_path / "out"
    with pytest.raises(PlanError):
        api.apply("insert layer 1 identity", model, out=str(out))
    assert not out.exists()


def test_unrecognised_attention_is_refused_naming_the_softmax(tmp_path_factory):
    # Bloom's ALiBi attention (baddbmm -> softmax -> bmm) is not a form discovery knows: refused
    # as not understood, not called "not a transformer".
    d = _refusal("widen ffn x2 net2net", _tiny(tmp_path_factory, "bloom"))
    assert d.code == "SW352" and "softmax in transformer.h.0.self_attention" in d.message, d.message


def test_norm_over_all_heads_refuses_attention_growth(tmp_path_factory):
    # OLMo-2's q_norm / k_norm normalise the whole projection (heads x head_dim): new heads would
    # change the statistic. `widen hidden` implies heads growth there, so it is refused too.
    model = _tiny(tmp_path_factory, "olmo2")
    d = _refusal("widen hidden x2 tile", model)
    assert d.code == "SW351" and "q_norm.weight" in d.message and "heads x head_dim" in d.message, d.message
    d = _refusal("widen kv_heads x2", model)
    assert d.code == "SW351" and "k_norm.weight" in d.message, d.message
    from scaler_wizard import api

    api.check("widen ffn x2 net2net\ninsert layer 1 identity", model)  # unaffected ops still pass


def test_hand_written_layernorm_without_bias_is_a_layernorm(tmp_path_factory):
    # Cohere's CohereLayerNorm subtracts the mean before rsqrt (no bias): taken for an RMSNorm, a
    # non-integer hidden growth was called exact and drifted 6.4e-2.
    from scaler_wizard import api

    ir = api.ir(_tiny(tmp_path_factory, "cohere"), use_cache=False)
    assert {n.kind for n in ir.norms} == {"layernorm"} and all(n.bias is None for n in ir.norms)


def test_parallel_block_writers_are_discovered_through_matmul(tmp_path_factory):
    # Falcon's FalconLinear computes x @ W.T; both branches of its parallel attention+MLP block
    # write the residual, so an identity layer zeroes both.
    from scaler_wizard import api

    ir = api.ir(_tiny(tmp_path_factory, "falcon"), use_cache=False)
    assert "transformer.h.{i}.self_attention.dense.weight" in ir.residual.writers
    assert "transformer.h.{i}.mlp.dense_4h_to_h.weight" in ir.residual.writers
    assert ir.attention.o == "transformer.h.{i}.self_attention.dense.weight"
    assert "ffn" in ir.groups


def test_readme_family_table_is_generated_from_the_committed_sweep():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks" / "family_sweep.json").read_text())
    readme = (root / "README.md").read_text()
    assert sweep.readme_with_table(readme, result) == readme, \
        "README family table is stale: run benchmarks/family_sweep.py --from-json benchmarks/family_sweep.json --markdown README.md"
    assert "| family |" in readme.split(sweep.README_BEGIN)[1]
    # the committed full sweep: no crash cell, and run against the transformers this lock installs
    import transformers

    assert result["counts"]["crash"] == 0 == sum(
        c["cell"] == "crash" for f in result["families"].values() for c in (f.get("cells") or {}).values())
    assert result["transformers"] == transformers.__version__
    with pytest.raises(ValueError, match="markers"):
        sweep.readme_with_table("no markers here", result)


# ---------------------------------------------------------------- fixes by kind (sweep3)
def test_depth_growth_without_a_layer_stack_is_refused(tmp_path_factory):
    # BART's causal LM (built from an encoder-decoder config) takes its depth from decoder_layers
    # while num_hidden_layers names encoder_layers: discovery finds no per-layer tensors. Depth
    # growth used to fail inside the depth pass ("the IR names no per-layer tensors").
    model = _tiny(tmp_path_factory, "bart")
    for plan in ("insert layer 1 identity", "duplicate layers 0..2", "stack x2"):
        d = _refusal(plan, model)
        assert d.code == "SW353" and "layer stack was not found" in d.message and "encoder_layers" in d.message, d.message


def test_identity_layer_needs_every_layer_tensor_understood(tmp_path_factory):
    # Aria's routed experts run through grouped_mm (no shape rule): their down projection was not
    # known as a residual writer, so `insert layer identity` left it non-zero and was called exact
    # (measured drift 9.6e-2). Copy layers (approx) do not depend on it.
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "aria_text")
    d = _refusal("insert layer 1 identity", model)
    assert d.code == "SW354" and "mlp.experts" in d.message, d.message
    assert api.check("insert layer 1 copy", model).ops[0].exactness == "approx"
    # The same experts' hidden axis (a constant 64 to discovery) made `widen hidden` a refusal of the
    # compiler's own consistency check (SW316): now refused up front, naming the tensor.
    d = _refusal("widen hidden x2 tile", model)
    assert d.code == "SW357" and "experts.down_proj" in d.message and "(64)" in d.message, d.message


def test_group_binding_survives_tiny_size_coincidences(tmp_path_factory):
    # Aria's tiny config has kv_heads == moe_topk == moe_num_shared_experts == 2, heads ==
    # moe_num_experts == 4 and ffn 192 == 3 * hidden == 2 shared experts * 96. kv_heads was left
    # unbound (its x2 trace makes it equal heads: the group vanishes) and derived as
    # vocab_size // hidden_size, so `widen vocab` implied a kv_heads growth that failed in its pass.
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "aria_text")
    ir = api.ir(model, use_cache=False)
    assert ir.groups["kv_heads"].config_key == "num_key_value_heads"
    assert ir.groups["ffn"].derived == "intermediate_size * moe_num_shared_experts"
    assert not ir.groups["kv_heads"].companion_keys and not ir.groups["heads"].companion_keys  # moe_topk, experts follow nothing
    rp = api.check("widen vocab by 64 mean", model)
    assert [o.group for o in rp.ops] == ["vocab"]


def test_norm_over_all_ffn_units_refuses_ffn_growth(tmp_path_factory):
    # BitNet's ffn_sub_norm normalises the FFN activations over all units: widen ffn failed inside
    # its pass ("axis 0 has role `elem` on ffn").
    model = _tiny(tmp_path_factory, "bitnet")
    d = _refusal("widen ffn x2 net2net", model)
    assert d.code == "SW355" and "ffn_sub_norm" in d.message, d.message


def test_embedding_scale_applies_to_token_embedding_only(tmp_path_factory):
    # BioGPT scales its token embedding by sqrt(hidden); its learned position table is added
    # unscaled. Widening hidden scaled both, and the exact output drifted 4.6e-2.
    from scaler_wizard import api

    prog = api.compile("widen hidden x2 tile", _tiny(tmp_path_factory, "biogpt"))
    assert type(prog.outputs["biogpt.embed_positions.weight"].node).__name__ == "Tile"
    tok = prog.outputs["biogpt.embed_tokens.weight"].node
    assert type(tok).__name__ == "Scale" and abs(tok.factor - 0.5 ** 0.5) < 1e-12


def test_fused_qkv_layout_owed_to_a_coincidence_refuses_heads_growth(tmp_path_factory):
    # CodeGen splits its fused qkv into a fixed 4 model-parallel chunks; with 4 heads each chunk
    # looks like one head and discovery read [heads x 3 x head_dim]. A probe trace with 8 heads is
    # not understood, so heads growth (implied by widen hidden) is refused: it was called exact and
    # drifted 0.88 relative.
    model = _tiny(tmp_path_factory, "codegen")
    d = _refusal("widen hidden x2 tile", model)
    assert d.code == "SW356" and "n_head = 8" in d.message and "qkv_proj" in d.message, d.message
    from scaler_wizard import api

    api.check("widen ffn x2 net2net\ninsert layer 1 identity", model)


def test_fixed_table_over_hidden_refuses_hidden_growth(tmp_path_factory):
    # CTRL adds a sinusoidal table (a buffer, not a parameter) computed from n_embd to the stream:
    # the grown config re-computes it, so widening hidden was called exact and drifted 1.0.
    model = _tiny(tmp_path_factory, "ctrl")
    d = _refusal("widen hidden x2 tile", model)
    assert d.code == "SW356" and "transformer.pos_encoding" in d.message, d.message


def test_lemon_eps_shared_with_qk_norms_without_pre_norms_is_approx(tmp_path_factory):
    # EXAONE-4 normalises only after its sublayers: q/k norms see raw-stream projections, so the
    # config eps that LEMON rescales for the hidden norms moves them by far more than an epsilon
    # effect (0.12 relative, called exact-eps). Integer factors stay exact.
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "exaone4")
    assert api.check("widen hidden x1.5 lemon", model).ops[0].exactness == "approx"
    assert api.check("widen hidden x2 lemon", model).ops[0].exactness == "exact"


@pytest.mark.slow  # ~15-40 s: Falcon-H1's discovery runs several differential traces
def test_config_with_non_finite_floats_loads(tmp_path_factory, tmp_path):
    # transformers writes inf as {"__float__": "Infinity"} (Falcon-H1's time_step_limit); read raw,
    # the config class refused it and every op ended in a traceback. The pair (0, inf) is two entries
    # whatever the depth: with 2 layers it looked like a per-layer array, and depth growth made it
    # [0, inf, 0, inf] (SW316). Falcon-H1 is a parallel hybrid (attention + Mamba in every layer):
    # the Mamba block's output projection is not the FFN, and an identity layer is exact.
    import json
    from pathlib import Path

    from scaler_wizard import api
    from scaler_wizard.ir import model_ir_for

    model = _tiny(tmp_path_factory, "falcon_h1")
    assert "__float__" in (Path(model) / "config.json").read_text()
    ir = model_ir_for(model)
    assert "time_step_limit" not in ir.layer_arrays and "mlp_multipliers" not in ir.layer_arrays
    assert [m.module for m in ir.mixers] == ["model.layers.{i}.mamba"] and ir.mixers[0].layers == (0, 1)
    assert ir.groups["ffn"].size == 96 and not any("mamba" in t for t, _ in ir.groups["ffn"].members)
    r = api.apply("insert layer 1 identity", model, out=str(tmp_path / "out"), verify=True)
    assert r["passed"] and r["exactness"] == "exact"
    grown = json.loads((tmp_path / "out" / "config.json").read_text())
    assert grown["num_hidden_layers"] == 3 and len(grown["time_step_limit"]) == 2
    from scaler_wizard.ir.config import decode_special_floats

    assert decode_special_floats(json.loads('{"a": [0.0, {"__float__": "Infinity"}]}')) == {"a": [0.0, float("inf")]}


@pytest.mark.slow  # ~40-60 s: discovery of a gated-delta hybrid, one apply, two forwards
def test_hybrid_linear_attention_block_is_a_mixer_not_the_ffn(tmp_path_factory, tmp_path):
    # Qwen3-Next alternates gated-delta-net layers (conv1d + chunked delta rule) with softmax
    # attention. The gated-delta block's out_proj [hidden, 512] was named ffn, next to the experts'
    # 96: every op, even `widen vocab`, ended in the SW316 self-check. Now the block is an IR fact
    # (ModelIR.mixers) and growth that only touches its projections to / from the residual stream is exact.
    import torch
    from transformers import AutoModelForCausalLM

    from scaler_wizard import api
    from scaler_wizard.ir import model_ir_for

    model = _tiny(tmp_path_factory, "qwen3_next")
    ir = model_ir_for(model)
    (mx,) = ir.mixers
    assert mx.module == "model.layers.{i}.linear_attn" and mx.layers == (0,) and "conv1d" in mx.ops, mx
    assert "model.layers.{i}.linear_attn.out_proj.weight" in mx.tensors
    assert ir.groups["ffn"].size == 96 and not any("linear_attn" in t for t, _ in ir.groups["ffn"].members)
    out = tmp_path / "out"
    # verify=False: the layer-wise verifier's stand-in KV cache has no linear-attention layers yet
    r = api.apply("widen hidden x2 tile", model, out=str(out), verify=False)
    assert r["exactness"] == "exact"
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(input_ids=ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    # SW365: were a group the growth rules know (heads) to appear inside the block, beyond its
    # projections to / from the residual stream, its growth would be refused naming the block.
    from dataclasses import replace

    from scaler_wizard.compiler.typecheck import check_plan
    from scaler_wizard.diagnostics import PlanError
    from scaler_wizard.grammar import parse
    from scaler_wizard.ir.model_ir import Axis, Factor, Segment

    heads = ir.groups["heads"].size
    name = "model.layers.{i}.linear_attn.dt_bias"
    t = ir.tensor(name)
    odd = replace(t, shape=(heads,), axes=(Axis((Segment((Factor("heads", heads),)),), "elem"),))
    ir2 = replace(ir, tensors=tuple(odd if x.name == name else x for x in ir.tensors))
    with pytest.raises(PlanError) as e:
        check_plan(parse("widen heads x2 dup"), ir2, model_ref="t")
    d = e.value.diagnostics[0]
    assert d.code == "SW365" and "`qwen3_next` is a hybrid: layers 0 mix tokens with `model.layers.{i}.linear_attn`" in d.message
    assert name in d.message, d.message
    check_plan(parse("widen heads x2 dup"), ir, model_ref="t")  # the real IR: the block carries no heads


def test_second_ffn_width_refuses_ffn_growth(tmp_path_factory):
    # Afmoe's shared experts are moe_intermediate_size x num_shared_experts wide (192) next to experts
    # of 96: both were named ffn, and every op ended in SW316. The shared width is not ffn now; ffn
    # growth (whose keys size it) is refused by name, growth that leaves ffn as it is compiles.
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "afmoe")
    d = _refusal("widen ffn x2 net2net", model)
    assert d.code == "SW369" and "shared_experts.down_proj.weight" in d.message and "192" in d.message, d.message
    assert api.check("widen hidden x2 tile", model).ops[0].exactness == "exact"


def test_elementwise_parameter_on_hidden_refuses_hidden_growth(tmp_path_factory):
    # Doge scales the residual stream per channel (input_residual): widen hidden failed inside its
    # pass ("elementwise on hidden but not a known norm").
    d = _refusal("widen hidden x2 tile", _tiny(tmp_path_factory, "doge"))
    assert d.code == "SW358" and "input_residual" in d.message, d.message


def test_per_head_values_grow_with_their_heads(tmp_path_factory):
    # GraniteSWA's attention sinks (one logit per query head, role elem on heads): the heads growth
    # implied by `widen hidden` failed inside the heads pass. New zero-fan-out heads get a value
    # that is never seen; copied heads copy it (measured exact: 5.3e-7 with verify).
    from scaler_wizard import api

    prog = api.compile("widen hidden x2 tile", _tiny(tmp_path_factory, "granite_swa"))
    out = prog.outputs["model.layers.0.self_attn.sinks"]
    assert out.node.shape == (8,) and out.exactness == "exact"


def test_head_dim_growth_through_an_unknown_reader_is_refused(tmp_path_factory):
    # HRM gates the attention output with gate_proj [heads x head_dim, hidden]: widen head_dim failed
    # inside its pass ("carries head_dim but is not q/k/v/o"). Its layer stack is not found either
    # (depth key num_hidden_layers does not size the traced module lists).
    model = _tiny(tmp_path_factory, "hrm_text")
    d = _refusal("widen head_dim x2", model)
    assert d.code == "SW359" and "gate_proj" in d.message, d.message
    assert _refusal("stack x2", model).code == "SW353"


def test_an_exception_inside_discovery_is_a_refusal_not_a_traceback(tmp_path_factory):
    # ProphetNet's config refuses `num_hidden_layers` (discovery sets it to trace a reduced model);
    # JetMoE's graph has data-dependent sizes the op rules cannot take: both were tracebacks.
    d = _refusal("widen ffn x2", _tiny(tmp_path_factory, "prophetnet"))
    assert d.code == "SW401" and "NotImplementedError" in d.message and "num_hidden_layers" in d.message, d.message


def test_lemon_with_gainless_norms_is_approx(tmp_path_factory):
    # OLMo's LayerNorms have no gain: LEMON's non-integer residue has nowhere to put its scale
    # (called exact, drifted 0.34); integer factors (tiling) stay exact.
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "olmo")
    assert api.check("widen hidden x1.5 lemon", model).exactness == "approx"
    assert api.check("widen hidden x2 lemon", model).exactness == "exact"


# ---------------------------------------------------------------- hybrids and other SW316 kinds (issue 10)
@pytest.mark.slow  # ~30-60 s: MiniMax's discovery (lightning-attention layers next to softmax attention)
def test_hybrid_mixer_resized_by_the_grown_config_is_refused_as_a_hybrid(tmp_path_factory, tmp_path):
    # MiniMax's lightning-attention block sizes its norm and projections from hidden / heads in a way
    # discovery does not know: `widen hidden` ended in the SW316 self-check. Now it is refused as a
    # hybrid, naming the block, and nothing is written; ops that leave those sizes grow as usual.
    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError

    model = _tiny(tmp_path_factory, "minimax")
    d = _refusal("widen hidden x2 tile", model)
    assert d.code == "SW366", d.message
    assert "`minimax` is a hybrid: layers 1 mix tokens with `model.layers.{i}.self_attn` (MiniMaxLightningAttention" in d.message
    assert "not softmax attention" in d.message and "model.layers.1.self_attn." in d.message, d.message
    out = tmp_path / "out"
    with pytest.raises(PlanError):
        api.apply("widen hidden x2 tile", model, out=str(out))
    assert not out.exists()
    r = api.check("widen ffn x2 net2net\ninsert layer 1 identity", model)
    assert [o.exactness for o in r.ops] == ["exact", "exact"]


def test_attention_output_not_read_as_heads_refuses_head_growth(tmp_path_factory):
    # DiffLlama's differential attention regroups the heads in pairs before o_proj: its input axis
    # was named ffn (64, next to the MLP's 96), so every op -- even `widen vocab` -- ended in SW316.
    # Now o_proj's input is not ffn, the MLP's ffn binds to intermediate_size, and head growth is
    # refused by name.
    from scaler_wizard import api
    from scaler_wizard.ir import model_ir_for

    model = _tiny(tmp_path_factory, "diffllama")
    ir = model_ir_for(model)
    assert ir.groups["ffn"].size == 96 and ir.groups["ffn"].config_key == "intermediate_size"
    for plan in ("widen heads x2 dup", "widen kv_heads x2", "widen head_dim x2"):
        d = _refusal(plan, model)
        assert d.code == "SW367" and "o_proj.weight" in d.message and "not as heads x head_dim" in d.message, d.message
    # an identity layer renumbers the layers after it, and DiffLlama's lambda_init follows the index
    d = _refusal("insert layer 1 identity", model)
    assert d.code == "SW367" and "identity-style layer" in d.message, d.message
    assert api.check("widen ffn x2 net2net", model).ops[0].exactness == "exact"


@pytest.mark.slow  # ~30-60 s: two MoE families, one apply with verify
def test_layers_told_apart_by_a_scalar_key_are_traced_apart(tmp_path_factory, tmp_path):
    # GLM-4-MoE / Sarvam-MoE: `first_k_dense_replace` makes layer 0 dense and the rest MoE, with no
    # per-layer array saying so. Discovery traced one layer and called every layer dense: every op
    # ended in SW316. Now the parameter structure tells the layers apart; width growth is exact,
    # and depth growth that would put a dense copy where the config puts experts is refused by name.
    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError
    from scaler_wizard.ir import model_ir_for

    model = _tiny(tmp_path_factory, "glm4_moe")
    ir = model_ir_for(model)
    assert ir.tensor("model.layers.{i}.mlp.down_proj.weight").layers == (0,)
    assert ir.tensor("model.layers.{i}.mlp.experts.down_proj").layers == (1,) and ir.moe.layers == (1,)
    assert api.check("widen ffn x2 net2net", model).ops[0].exactness == "exact"
    for plan in ("insert layer 1 identity", "stack x2"):
        d = _refusal(plan, model)
        assert d.code == "SW368" and "differ in kind" in d.message and "mlp.experts" in d.message, d.message
    out = tmp_path / "out"
    with pytest.raises(PlanError):
        api.apply("stack x2", model, out=str(out))
    assert not out.exists()
    # Sarvam-MoE stores q/k/v fused as `query_key_value`; transformers splits it by the q / k / v
    # parameter sizes (a conversion op that needs the model): the reader runs it on a meta model.
    sarvam = _tiny(tmp_path_factory, "sarvam_moe")
    r = api.apply("widen hidden x2 tile", sarvam, out=str(tmp_path / "sarvam"), verify=True)
    assert r["passed"] and r["exactness"] == "exact"


def test_layer_kind_laid_out_by_index_refuses_depth_growth(tmp_path_factory):
    # ModernBERT-decoder's first layer has no attn_norm; its `layer_types` (full / sliding) does not
    # say so. A duplicated first layer lacks the norm the config gives every later layer: SW316 before.
    d = _refusal("duplicate layers 0..2", _tiny(tmp_path_factory, "modernbert-decoder"))
    assert d.code == "SW368" and "lacks `attn_norm.weight`" in d.message, d.message


@pytest.mark.slow
def test_derived_layer_index_list_is_rederived_by_depth_growth(tmp_path_factory, tmp_path):
    # Zamba-2's config derives `hybrid_layer_ids` (indices of the hybrid layers) from
    # `layers_block_type` but stores it, and transformers reads the stored list back: inserting a
    # layer before the hybrid one kept [1], and the grown model failed to run (KeyError: 2), after
    # `apply` had called the plan exact. The grown config now carries the re-derived list.
    import json

    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "zamba2")
    assert json.loads((Path(model) / "config.json").read_text())["hybrid_layer_ids"] == [1]
    out = tmp_path / "o"
    r = api.apply("insert layer 1 identity", model=model, out=str(out), verify=True)
    assert r["passed"] and r["exactness"] == "exact", r["verification"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layers_block_type"] == ["linear_attention", "linear_attention", "hybrid"]
    assert cfg["hybrid_layer_ids"] == [2]


@pytest.mark.slow
def test_constants_computed_from_sizes_refuse_their_growth(tmp_path_factory, tmp_path):
    # MiniCPM3 scales each residual branch by scale_depth / sqrt(num_hidden_layers) and the final
    # hidden states by dim_model_base / hidden_size: copied weights look exact, but transformers
    # re-computes both constants for the grown config (inserting an identity layer drifted 3e-2,
    # tiling hidden halved the logits; both had been called exact). Differential traces find the
    # constants; growth of their size is SW381 at the statement, and nothing is written.
    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError

    model = _tiny(tmp_path_factory, "minicpm3")
    ir = api.ir(model)
    assert {k for k, *_ in ir.size_constants} == {"num_hidden_layers", "hidden_size"}
    for plan, key in (("widen ffn x2 net2net\ninsert layer 1 identity", "num_hidden_layers"),
                      ("widen ffn x2 net2net\nwiden hidden x2 tile", "hidden_size")):
        with pytest.raises(PlanError) as e:
            api.check(plan, model)
        (d,) = [x for x in e.value.diagnostics if x.code == "SW381"]
        assert d.span.line == 2 and f"from `{key}`" in d.message, d.message
        out = tmp_path / key
        with pytest.raises(PlanError):
            api.apply(plan, model, out=str(out))
        assert not out.exists()
    r = api.check("widen ffn x2 net2net", model)
    assert r.exactness == "exact"


@pytest.mark.slow
def test_lemon_residue_with_config_and_fixed_epsilons_is_refused(tmp_path_factory):
    # DeepSeek-V2-style latent attention normalises its q / kv latents with a fixed epsilon next to
    # the config's rms_norm_eps: a LEMON residue can rescale only one kind, so `x1.5` is refused at
    # check (SW380, on the amount) instead of failing inside the widen-hidden pass; `x2` tiles.
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "glm4_moe_lite")
    d = _refusal("widen hidden x1.5 lemon", model)
    assert d.code == "SW380" and (d.span.line, d.span.col) == (1, 14), d
    assert "fixed one" in d.message and "`x2`" in d.help
    assert api.check("widen hidden x2 lemon", model).exactness == "exact"


def _cells_without_seconds(result):
    return {f: (r["built"], r["unbuildable"], {o: {k: v for k, v in c.items() if k != "seconds"}
                                             for o, c in r["cells"].items()})
            for f, r in result["families"].items()}


@pytest.mark.slow
def test_warm_fork_server_gives_the_cells_of_a_fresh_subprocess(tmp_path, monkeypatch):
    # run_sweep forks each family from a warm server (imports done once); the cells must be those
    # of the plain `--worker` subprocess, and the server's child must see this call's environment.
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "cache"))
    ops = ["ffn_net2net", "kv_heads"]  # gpt2: one exact cell, one refusal
    warm = sweep.run_sweep(["gpt2"], ops, workers=1, timeout=600)
    assert (tmp_path / "cache" / "ir").is_dir()  # the child used this test's cache
    cold = sweep.run_sweep(["gpt2"], ops, workers=1, timeout=600, warm=False)
    assert _cells_without_seconds(warm) == _cells_without_seconds(cold)
    cells = warm["families"]["gpt2"]["cells"]
    assert cells["ffn_net2net"]["cell"] == "exact" and cells["kv_heads"]["cell"] == "refused"


@pytest.mark.slow
def test_fork_server_timeout_kills_the_family_not_the_server(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "cache"))
    server = sweep.ForkServer()
    try:
        first = sweep.run_family("gpt2", ["vocab"], 600, server=server)
        assert first["cells"]["vocab"]["cell"] == "approx"
        # one second is less than building the tiny model and running two cells takes (tracing
        # included: a fresh cache); whichever was running when the time ran out, and every later
        # one, is a timeout; cells finished before it are kept (never a crash of another kind)
        slow = sweep.run_family("llama", ["vocab", "hidden_tile"], 1, server=server)
        assert server.alive()
        if slow["unbuildable"] != "timeout while building":
            cells = slow["cells"]
            timed_out = [op for op, c in cells.items() if c["cell"] == "crash" and "timeout" in c["reason"]]
            assert "hidden_tile" in timed_out, slow
            assert all(c["cell"] in ("exact", "approx") for op, c in cells.items() if op not in timed_out), slow
        again = sweep.run_family("gpt2", ["vocab"], 600, server=server)
        assert _cells_without_seconds({"families": {"g": again}}) == _cells_without_seconds({"families": {"g": first}})
    finally:
        server.close()
    assert not server.alive()


def test_fork_server_answers_a_family_that_ends_at_once(tmp_path):
    # A family that cannot be built ends within a second, so the server's `pid` and `rc` answers can
    # reach the pipe together: both must be read, not the second waited for until the timeout.
    server = sweep.ForkServer()
    try:
        for _ in range(3):
            t0 = time.time()
            r = sweep.run_family("no_such_model_type", ["vocab"], 120, server=server)
            assert time.time() - t0 < 60, "the rc answer was waited for past its arrival"
            assert not r["built"] and r["unbuildable"].startswith("KeyError"), r
            assert server.alive()
    finally:
        server.close()


@pytest.mark.slow
def test_sizes_only_ir_skips_the_constants_and_is_not_cached(tmp_path_factory, tmp_path, monkeypatch):
    # Verification's re-trace of a grown model reads sizes only (groups, depth, parameter count): it
    # traces without the size-constant question, and that partial IR must never answer a later full
    # request from the cache (MiniCPM3's constants would be lost, and with them SW381).
    from scaler_wizard.ir import cache_dir, model_ir_for

    model = _tiny(tmp_path_factory, "minicpm3")
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "cache"))
    part = model_ir_for(model, size_constants=False)
    assert part.size_constants == ()
    assert not cache_dir().exists() or not list(cache_dir().rglob("*.json"))
    full = model_ir_for(model)
    assert {k for k, *_ in full.size_constants} == {"num_hidden_layers", "hidden_size"}
    assert (part.groups, part.num_layers, part.total_params()) == (full.groups, full.num_layers, full.total_params())
    # a full IR in the cache serves the sizes-only caller too
    assert model_ir_for(model, size_constants=False).size_constants == full.size_constants
