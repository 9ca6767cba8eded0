"""Type checker: resolution, refusals with reasons, cost figures checked against real models."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest

from families import FAMILIES
from scaler_wizard.diagnostics import PlanError, render
from scaler_wizard.compiler.resolved import APPROX, EXACT, EXACT_EPS
from scaler_wizard.compiler.typecheck import check_plan
from scaler_wizard.grammar import parse

GOLDEN = Path(__file__).parent / "golden" / "check"

# SmolLM2-135M's published shape (config only: checking a plan reads no weights).
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "hidden_act": "silu",
}


@lru_cache(maxsize=None)
def ir_of(family: str, **overrides):
    from scaler_wizard.ir import discover

    cfg = FAMILIES[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return discover(cfg)


def ir_deep(family: str, layers: int):
    """The IR of a family's tiny config with more layers (tracing cost does not grow with depth)."""
    return _ir_deep(family, layers)


@lru_cache(maxsize=None)
def _ir_deep(family, layers):
    from scaler_wizard.ir import discover

    cfg = FAMILIES[family]()
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    setattr(cfg, key, layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i % len(cfg.layer_types)] for i in range(layers)]
    return discover(cfg)


def resolve(text: str, ir):
    return check_plan(parse(text, file="p.expand"), ir, model_ref="tiny")


def errors(text: str, ir) -> list:
    with pytest.raises(PlanError) as e:
        resolve(text, ir)
    return e.value.diagnostics


def codes(text: str, ir) -> list[str]:
    return [d.code for d in errors(text, ir)]


def count_params(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def config_from(d: dict):
    from transformers import AutoConfig

    d = {k: v for k, v in d.items() if not k.startswith("_") and k != "transformers_version"}
    return AutoConfig.for_model(**d)


# ---------------------------------------------------------------- resolution
def test_users_example_resolves_exactly_and_new_layer_gets_the_index():
    ir = ir_deep("llama", 30)
    rp = resolve("widen hidden x2 lemon\nwiden ffn x2 lemon\ninsert layer 12 identity\n", ir)
    assert rp.exactness == EXACT
    assert [o.kind for o in rp.ops] == ["widen", "widen", "insert"]
    assert (rp.ops[0].old_size, rp.ops[0].new_size) == (64, 128)
    assert (rp.ops[1].old_size, rp.ops[1].new_size) == (96, 192)
    assert len(rp.layer_map) == 31
    assert rp.layer_map[12].init == "identity" and rp.layer_map[12].src == 11  # fan-in from the layer before
    assert [s.src for s in rp.layer_map[:12]] == list(range(12))
    assert [s.src for s in rp.layer_map[13:]] == list(range(12, 30))
    assert rp.config_after["hidden_size"] == 128
    assert rp.config_after["intermediate_size"] == 192
    assert rp.config_after["num_hidden_layers"] == 31
    assert rp.config_after["rms_norm_eps"] == rp.config_before["rms_norm_eps"]  # integer factor: no eps change


def test_lemon_non_integer_rescales_eps_by_eta_squared():
    ir = ir_of("llama")
    rp = resolve("widen hidden to 96 lemon", ir)
    eta2 = 64 / 96
    assert rp.config_after["rms_norm_eps"] == pytest.approx(rp.config_before["rms_norm_eps"] * eta2)
    assert rp.ops[0].exactness == EXACT


def test_default_hidden_method_is_tile_for_integer_and_lemon_otherwise():
    ir = ir_of("llama")
    assert resolve("widen hidden x2", ir).ops[0].method == "tile"
    assert resolve("widen hidden x1.5", ir).ops[0].method == "lemon"


def test_depth_ops_build_the_layer_map():
    ir = ir_deep("llama", 8)
    rp = resolve("insert layers every 4 identity", ir)
    assert [(s.src, s.init) for s in rp.layer_map] == [
        (0, "original"), (1, "original"), (2, "original"), (3, "original"), (3, "identity"),
        (4, "original"), (5, "original"), (6, "original"), (7, "original"), (7, "identity"),
    ]
    rp = resolve("duplicate layers 2..6", ir)
    assert [s.src for s in rp.layer_map] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    assert rp.exactness == APPROX
    rp = resolve("insert 2 layers after 0 zero", ir)
    assert [(s.src, s.init) for s in rp.layer_map[:4]] == [(0, "original"), (0, "zero"), (0, "zero"), (1, "original")]
    rp = resolve("stack x2", ir)
    assert [s.src for s in rp.layer_map] == list(range(8)) * 2
    # statements apply in order: the second insert sees the first one's layer
    rp = resolve("insert layer 8 identity\ninsert layer 9 identity", ir)
    assert len(rp.layer_map) == 10 and rp.layer_map[9].init == "identity"


def test_layer_arrays_are_reindexed():
    ir = ir_of("gemma2")
    rp = resolve("insert layer 1 identity", ir)
    before = rp.config_before["layer_types"]
    assert rp.config_after["layer_types"] == [before[0], before[0], before[1]]


# ---------------------------------------------------------------- refusals
def test_all_errors_are_collected_and_sorted():
    ir = ir_of("llama")
    diags = errors("widen fnn x2\nwiden heads to 5\ninsert layer 9\nwiden hidden x1.5 tile\nwiden ffn x2 zap foo=1\n", ir)
    assert [(d.span.line, d.code) for d in diags] == [
        (1, "SW201"), (2, "SW304"), (3, "SW205"), (4, "SW303"), (5, "SW202"), (5, "SW204"),
    ]
    assert "did you mean `ffn`?" in diags[0].help
    assert "hidden(64)" in diags[0].help and "ffn(96 x2 layers)" in diags[0].help
    # the caret sits under the misspelt group
    text = render(diags, {"p.expand": "widen fnn x2\nwiden heads to 5\ninsert layer 9\nwiden hidden x1.5 tile\nwiden ffn x2 zap foo=1\n"})
    assert "1 | widen fnn x2\n  |       ^^^" in text


def test_post_ln_refuses_identity_layers_and_fractional_lemon():
    ir = ir_of("opt_postln")
    assert codes("insert layer 1 identity", ir) == ["SW305"]
    assert codes("insert layers every 1 zero", ir) == ["SW305"]
    assert codes("widen hidden x1.5 lemon", ir) == ["SW306"]
    assert resolve("insert layer 1 copy", ir).exactness == APPROX
    assert resolve("widen hidden x2 lemon untie=true", ir).exactness == EXACT
    assert codes("widen hidden x2 lemon", ir) == ["SW315"]  # tied head, no final norm to absorb the split


def test_gqa_divisibility():
    ir = ir_of("llama")  # 4 heads, 2 kv heads
    assert codes("widen heads to 5", ir) == ["SW304"]
    assert resolve("widen heads to 8", ir).ops[0].new_size == 8
    assert codes("widen heads to 6", ir) == ["SW313"]  # transformers needs hidden % heads == 0
    assert resolve("widen kv_heads x2", ir).ops[0].new_size == 4
    assert codes("widen kv_heads x3", ir) == ["SW304"]  # 4 query heads over 6 kv heads


def test_head_dim_growth_rules():
    assert codes("widen head_dim to 24", ir_of("llama")) == ["SW307"]  # RoPE: non-integer factor
    assert resolve("widen head_dim x2", ir_of("llama")).exactness == EXACT
    # q/k norms: the new dims copy old ones, so the norms keep their statistics (eps included)
    assert resolve("widen head_dim x2", ir_of("qwen3")).exactness == EXACT
    assert codes("widen head_dim x2", ir_of("gpt2")) == ["SW308"]  # derived: n_embd // n_head


def test_shared_eps_makes_fractional_lemon_exact_eps():
    assert resolve("widen hidden to 96 lemon", ir_of("qwen3")).exactness == EXACT_EPS


def test_derived_sizes_grow_together():
    ir = ir_of("gpt2")  # head_dim = n_embd // n_head, ffn = 4 * n_embd
    rp = resolve("widen hidden x2", ir)
    grown = {o.group: (o.old_size, o.new_size) for o in rp.ops}
    assert grown == {"hidden": (64, 128), "heads": (4, 8)}
    assert rp.config_after["n_head"] == 8
    assert rp.config_after["n_inner"] == 256  # ffn = 4 * n_embd unless n_inner is set: pinned
    assert ir.groups["ffn"].override_key == "n_inner"  # found by differential tracing
    rp = resolve("widen ffn x2", ir)
    assert rp.config_after["n_inner"] == 512 and rp.ops[0].exactness == EXACT
    assert codes("widen hidden to 72", ir) == ["SW313"]  # not a multiple of head_dim 16
    assert codes("widen heads x2", ir) == ["SW308"]
    assert codes("widen head_dim x2", ir) == ["SW308"]


def test_upcycle_rules():
    rp = resolve("upcycle ffn experts 4 top 2", ir_of("llama"))
    assert rp.config_after["model_type"] == "mixtral"
    assert rp.config_after["num_local_experts"] == 4 and rp.config_after["num_experts_per_tok"] == 2
    assert rp.exactness == EXACT
    assert codes("upcycle ffn experts 4 top 2", ir_of("gpt2")) == ["SW309"]
    assert codes("upcycle ffn experts 4 top 5", ir_of("llama")) == ["SW310"]
    assert codes("upcycle ffn experts 4 top 2", ir_of("mixtral")) == ["SW309"]
    assert codes("upcycle heads experts 4 top 2", ir_of("llama")) == ["SW202"]
    # Width growth after upcycle is not lowered: refused at check (it used to pass check and fail in apply).
    assert codes("upcycle ffn experts 4 top 2\nwiden ffn x2 net2net", ir_of("llama")) == ["SW318"]
    assert codes("upcycle ffn experts 4 top 2\nwiden hidden x2", ir_of("llama")) == ["SW318"]
    assert resolve("widen ffn x2 net2net\nupcycle ffn experts 4 top 2", ir_of("llama")).config_after[
        "intermediate_size"] == 2 * ir_of("llama").config["intermediate_size"]


def test_names_options_and_values():
    ir = ir_of("llama")
    assert codes("widen experts x2", ir) == ["SW312"]
    assert codes("widen layers x2", ir) == ["SW201"]
    assert codes("insert layer 1 idenity", ir) == ["SW203"]
    assert codes("dtype bfloat61", ir) == ["SW206"]
    assert codes("widen ffn x2 net2net split=lopsided", ir) == ["SW207"]
    assert codes("widen ffn x1", ir) == ["SW302"]
    assert codes("widen ffn to 50", ir) == ["SW302"]
    assert codes("widen heads x1.3", ir) == ["SW301"]
    (d,) = errors("widen ffn x1.0000001", ir)  # the factor and the product as written, not rounded to 6 digits
    assert "x1.0000001 of ffn(96) is 96.0000096" in d.message, d.message
    assert "`to 97`" in d.help and "`to 96`" not in d.help, d.help  # only sizes that grow are suggested
    assert codes("duplicate layers 1..5", ir) == ["SW205"]
    assert codes("insert 2 layers after 2", ir) == ["SW205"]
    rp = resolve("seed 7\ndtype bf16\nnoise 0.01\ntrain { steps = 10; lr = 3e-4 }", ir)
    assert (rp.seed, rp.dtype, rp.noise) == (7, "bfloat16", 0.01)
    assert rp.train == {"steps": 10, "lr": 3e-4}


def test_plan_wide_noise_reaches_every_op_that_takes_it():
    """issue 7 §4: `noise` written once holds for the whole plan, before or after the ops."""
    ir = ir_of("llama")
    # upcycle: the plan-wide noise perturbs the experts, so the op is approx (and says why)
    for text in ("upcycle ffn experts 4 top 2\nnoise 0.001", "noise 0.001\nupcycle ffn experts 4 top 2"):
        rp = resolve(text, ir)
        (op,) = rp.ops
        assert op.exactness == APPROX and op.options["noise"] == 0.001 and "plan-wide" in op.reason
        assert [w.code for w in rp.warnings] == ["SW601"]
    assert resolve("upcycle ffn experts 4 top 2 noise=0", ir).exactness == EXACT
    # identity layers: the noise lands on the new layers' copied fan-in, and stays exact
    rp = resolve("insert layer 1 identity\nnoise 0.01", ir)
    assert rp.exactness == EXACT and [s.noise for s in rp.layer_map] == [0.0, 0.01, 0.0]
    rp = resolve("insert layer 1 identity noise=0.2\ninsert layer 0 identity", ir)
    assert [s.noise for s in rp.layer_map] == [0.0, 0.0, 0.2, 0.0]  # per op, not the first op's for all
    # ops that cannot take noise: a warning naming the op, never a silent no-op
    rp = resolve("noise 0.01\nwiden kv_heads x2\nwiden ffn x2 net2net\nduplicate layers 0..1\ninsert layer 1 zero", ir)
    warned = [w for w in rp.warnings if w.code == "SW603"]
    assert sorted(w.message.split("`")[3] for w in warned) == [
        "duplicate layers 0..1", "insert layer 1 zero", "widen kv_heads x2"]
    assert resolve("noise 0.01\nwiden ffn x2 net2net\nwiden hidden x2", ir).warnings == ()


def test_options_an_op_would_not_read_are_errors():
    ir = ir_of("llama")
    assert codes("widen ffn x2 seed=3", ir) == ["SW204"]  # per-op seed was accepted and never read
    d = errors("insert layer 1 identity seed=3", ir)[0]
    assert "seed <n>" in d.help
    assert codes("upcycle ffn experts 4 top 2 seed=1", ir) == ["SW204"]
    assert codes("upcycle ffn experts 4 top 2 router=randm", ir) == ["SW207"]
    assert resolve("upcycle ffn experts 4 top 2 router=random", ir).exactness == EXACT
    assert codes("widen hidden x2 untie=maybe", ir_of("qwen2")) == ["SW207"]
    assert codes("widen kv_heads x2 noise=0.1", ir) == ["SW204"]
    assert codes("widen kv_heads x2 split=equal", ir) == ["SW204"]
    assert codes("widen ffn to 130 zero noise=0.1", ir) == ["SW204"]
    assert codes("widen heads to 8 zero split=equal", ir) == ["SW204"]
    assert codes("insert layer 1 zero noise=0.1", ir) == ["SW204"]
    assert codes("insert layer 1 copy noise=0.1", ir) == ["SW204"]
    resolve("widen ffn x2 net2net noise=0.1 split=equal\ninsert layer 1 identity noise=0.1", ir)


@lru_cache(maxsize=None)
def _qwen2_windowed():
    """Qwen2, 6 layers: full,full,full,sliding,sliding,sliding (max_window_layers 3)."""
    from transformers import AutoConfig

    from scaler_wizard.ir import discover

    cfg = AutoConfig.for_model("qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=160, num_hidden_layers=6, vocab_size=256, max_position_embeddings=64,
                               use_sliding_window=True, sliding_window=16, max_window_layers=3)
    assert cfg.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    return discover(cfg)


@pytest.mark.parametrize("plan,mwl,layout,warned", [
    ("duplicate layers 2..4", 3, "FFFSFSSS", True),  # no "first N full" describes it
    ("insert layer 1 identity", 4, "FFFFSSS", False),  # a new full layer inside the full prefix
    ("insert layer 4 identity", 3, "FFFSSSS", False),
    ("duplicate layers 0..3", 6, "FFFFFFSSS", False),
    ("stack x2", 3, "FFFSSSFFFSSS", True),
    ("widen ffn x2", 3, "FFFSSS", False),
])
def test_layer_types_and_max_window_layers(plan, mwl, layout, warned):
    """issue 7 §7: the per-layer array follows the layer map; the scalar that summarises it under the
    older convention is re-derived where one value fits, and named in a warning where none does."""
    rp = resolve(plan, _qwen2_windowed())
    types = rp.config_after["layer_types"]
    assert "".join("F" if t == "full_attention" else "S" for t in types) == layout
    assert rp.config_after["max_window_layers"] == mwl
    sw604 = [w for w in rp.warnings if w.code == "SW604"]
    assert bool(sw604) == warned
    if warned:
        assert "`max_window_layers`" in sw604[0].message and layout.replace("", ",")[1:-1] in sw604[0].message
    else:  # the older convention reproduces the layout exactly
        assert [("full_attention" if i < mwl else "sliding_attention") for i in range(len(types))] == types


# ---------------------------------------------------------------- grow to
def test_grow_to_reaches_the_target_with_exact_ops():
    ir = ir_of("llama")
    before = resolve("seed 0", ir).costs_before.params
    rp = resolve(f"grow to {before * 3 // 1000}K", ir)
    assert abs(rp.costs_after.params - before * 3) / (before * 3) <= 0.05
    assert rp.exactness == EXACT
    assert rp.alternatives and rp.alternatives[0].startswith("chosen:")
    deep = ir_deep("llama", 8)  # deep enough that doubling the layers nearly doubles the size
    before = resolve("seed 0", deep).costs_before.params
    rp = resolve(f"grow to {before * 2 // 1000}K prefer depth", deep)
    assert all(o.kind == "insert" for o in rp.ops) and len(rp.layer_map) == 16
    rp = resolve(f"grow to {before * 2 // 1000}K prefer width", deep)
    assert all(o.kind == "widen" for o in rp.ops)
    assert codes("grow to 1K", ir) == ["SW311"]


# ---------------------------------------------------------------- costs
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parameter_count_matches_the_real_model(family):
    ir = ir_of(family)
    rp = resolve("seed 0", ir)
    assert rp.costs_before.params == count_params(FAMILIES[family]())


@pytest.mark.parametrize(
    "family,plan",
    [
        ("llama", "widen hidden x2\nwiden ffn to 160 net2net\nwiden heads to 8\ninsert layers every 1 identity"),
        ("qwen2", "widen hidden x2\ninsert layer 0 identity"),
        ("gpt2", "widen hidden x2\nstack x2"),
        ("gpt2", "widen ffn to 320\nwiden hidden x2"),
        ("llama", "upcycle ffn experts 4 top 2"),
        ("gemma2", "widen hidden to 96 lemon\nwiden kv_heads x2"),
    ],
)
def test_predicted_parameters_match_a_model_built_from_the_grown_config(family, plan):
    rp = resolve(plan, ir_of(family))
    assert rp.costs_after.params == count_params(config_from(rp.config_after))


def test_flops_and_memory_figures_are_consistent():
    rp = resolve("widen hidden x2\nwiden ffn x2", ir_of("llama"))
    cb, ca = rp.costs_before, rp.costs_after
    assert ca.train_bytes == 16 * ca.params
    assert cb.flops_per_token > 2 * cb.params_non_embedding  # matmuls + lm head + attention
    short = check_plan(parse("widen hidden x2\nwiden ffn x2"), ir_of("llama"), model_ref="t", context=1)
    # the attention term is 2 matmuls x 2 FLOPs x layers x context x (heads x head_dim)
    assert ca.flops_per_token - short.costs_after.flops_per_token == 4 * 2 * (2048 - 1) * 4 * 16
    # per-token matmul FLOPs: x4 for the MLP (both sides doubled), x2 for q/k/v/o and the LM head
    mlp = 3 * 64 * 96
    attn = 2 * 64 * 64 + 2 * 64 * 32
    head = 128 * 64
    before = 2 * (2 * (mlp + attn) + head) + 4 * 2 * 1 * 64
    after = 2 * (2 * (4 * mlp + 2 * attn) + 2 * head) + 4 * 2 * 1 * 64
    assert short.costs_before.flops_per_token == before
    assert short.costs_after.flops_per_token == after


# ---------------------------------------------------------------- golden diagnostics
def _golden_cases():
    return sorted(p.stem for p in GOLDEN.glob("*.expand"))


@pytest.mark.parametrize("name", _golden_cases())
def test_golden_semantic_diagnostics(name):
    src_path = GOLDEN / f"{name}.expand"
    text = src_path.read_text()
    family = text.splitlines()[0].split("family:")[1].strip()
    file = f"{name}.expand"
    try:
        check_plan(parse(text, file=file), ir_of(family), model_ref=family)
        rendered = "(no errors)"
    except PlanError as e:
        rendered = render(e.diagnostics, {file: text})
    expected = GOLDEN / f"{name}.expected"
    if os.environ.get("SW_UPDATE_GOLDEN"):
        expected.write_text(rendered + "\n")
    assert rendered + "\n" == expected.read_text()


# ---------------------------------------------------------------- CLI
def _tiny_model_dir(tmp_path, family="llama") -> Path:
    d = tmp_path / family
    d.mkdir()
    (d / "config.json").write_text(FAMILIES[family]().to_json_string())
    return d


def test_check_cli_exit_codes_and_json(tmp_path, capsys, monkeypatch):
    from scaler_wizard.cli import main

    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "cache"))
    model = _tiny_model_dir(tmp_path)
    good = tmp_path / "good.expand"
    good.write_text("widen hidden x2 lemon\nwiden ffn x2 lemon\ninsert layer 1 identity\n")
    bad = tmp_path / "bad.expand"
    bad.write_text("widen fnn x2\ninsert layer 7\n")

    assert main(["check", str(good), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "exactness: exact" in out and "hidden_size" in out and "parameters" in out

    assert main(["check", str(bad), "--model", str(model)]) == 1
    err = capsys.readouterr().err
    assert "bad.expand:1:7: error[SW201]" in err and "bad.expand:2:14: error[SW205]" in err

    assert main(["check", str(good), str(bad), "--model", str(model), "--format", "json"]) == 1
    res = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in res] == [True, False]
    assert res[0]["params"]["after"] > res[0]["params"]["before"]
    assert {d["code"] for d in res[1]["diagnostics"]} == {"SW201", "SW205"}

    assert main(["check", str(tmp_path / "missing.expand"), "--model", str(model)]) == 2
    assert main(["check", str(good), "--model", str(tmp_path / "no-such-model")]) == 2
    nomodel = tmp_path / "nomodel.expand"
    nomodel.write_text("widen ffn x2\n")
    assert main(["check", str(nomodel)]) == 1
    assert "SW208" in capsys.readouterr().err


def test_check_cli_runs_every_example_on_tiny_llama(tmp_path, capsys, monkeypatch):
    from scaler_wizard.cli import main

    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "smollm2-135m-shape"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMOLLM2_135M))
    examples = sorted(str(p) for p in (Path(__file__).parent.parent / "examples").glob("*.expand"))
    assert examples
    for ex in examples:
        rc = main(["check", ex, "--model", str(d)])
        captured = capsys.readouterr()
        assert rc == 0, f"{ex}:\n{captured.err}"


# ---------------------------------------------------------------- every example x every family
EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.expand"))
PRE_LN = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "mixtral"]
POST_LN = ["opt_postln", "bert"]


@pytest.mark.parametrize("family", PRE_LN + POST_LN)
def test_examples_on_every_family(family):
    ir = ir_deep(family, 30)
    outcomes = {}
    for ex in EXAMPLES:
        text = ex.read_text()
        try:
            check_plan(parse(text, file=ex.name), ir, model_ref=family)
            outcomes[ex.name] = "ok"
        except PlanError as e:
            outcomes[ex.name] = sorted({d.code for d in e.diagnostics})
            # Only refusals with reasons, or a group this family does not have (MHA: no kv_heads).
            for d in e.diagnostics:
                assert d.code.startswith("SW3") or (d.code == "SW201" and "kv_heads" in d.message), (ex.name, render([d], {ex.name: text}))
    user_example = outcomes["smollm2-grow.expand"]
    if family == "opt_postln":
        assert user_example == ["SW305", "SW315"]  # no identity layer under Post-LN; tied head, no final norm
    elif family in POST_LN:
        assert user_example == ["SW305"]  # identity layers do not exist under Post-LN
    else:
        assert user_example == "ok"
        assert outcomes["llama-pro.expand"] == "ok" and outcomes["solar-dus.expand"] == "ok"
    if family in ("llama", "mistral", "qwen3"):
        assert outcomes["moe-upcycle.expand"] == "ok"


def test_plan_without_growth_statements_warns_at_its_first_line():
    """SW605: a plan with no growth statement (empty, comments, settings only) is checked, but warned
    about: `apply` would land an unchanged copy. A plan with one statement does not get it."""
    ir = ir_of("llama")
    for text in ("", "# to do\n", "seed 3\nnoise 0.01\n"):
        rp = resolve(text, ir)
        assert not rp.ops
        (w,) = [w for w in rp.warnings if w.code == "SW605"]
        assert (w.span.line, w.span.col, w.span.file) == (1, 1, "p.expand") and "unchanged copy" in w.message
    assert not [w for w in resolve("insert layer 1 identity", ir).warnings if w.code == "SW605"]


def test_apply_prints_the_checks_warnings_on_stderr(tmp_path):
    """`apply` says what `check` would warn about (here SW605) before it writes, on stderr, positioned."""
    import subprocess
    import sys

    from scaler_wizard.runtime.tiny import make_tiny_llama

    model = make_tiny_llama(tmp_path / "m", "to be or not to be, that is the question " * 40)
    plan = tmp_path / "empty.expand"
    plan.write_text("# nothing yet\n")
    out = subprocess.run([sys.executable, "-m", "scaler_wizard", "apply", str(plan), "--model", str(model), "-o",
                          str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{plan}:1:1: warning[SW605]" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "out" / "config.json").is_file()
