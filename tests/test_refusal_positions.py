"""Refusals found by the break-it pass, each positioned at the plan statement that causes it.

1. Gemma-4 (``gemma4_text``): depth growth. ``per_layer_config`` (the full-attention layers' head dim)
   now follows the layer map like ``layer_types``; what remains is ``embed_tokens_per_layer``, a
   tensor outside the layers with one slice per layer (SW371), reported at the depth statement
   (conform finds the culprit by conforming the plan's prefixes), not at 1:1.
2. Inkling-2 (``inkling2_text``, ``inkling2_loop_text``): transformers' reverse conversion pads the
   unembedding with zero rows (``Inkling2UnpadVocab``) and splits the loop's message queries by
   indexing; the writer follows both, so ``apply`` lands what ``check`` accepts (``check`` dry-runs
   the on-disk naming: SW373 where it could not).
3. MiMo-V2-Flash: the sliding layers' eager attention with sinks (scores ++ sinks -> softmax -> drop
   the sink column -> @ v) is attention; ``widen heads`` over its two attention shapes is SW370.

Each CLI run asserts the code, the line:col, the exit status, and that nothing is written.
"""

from __future__ import annotations

import json

import pytest

from scaler_wizard import sweep
from scaler_wizard.cli import main as cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made = {}

    def get(family: str) -> str:
        if family not in made:
            d = tmp_path_factory.mktemp(family)
            sweep.build_tiny(family, d)
            made[family] = str(d)
        return made[family]

    return get


def _refused(plan_text: str, model: str, tmp_path, capsys) -> dict:
    """Run ``check`` (JSON) and ``apply`` on the plan: both refuse, nothing is written. The
    diagnostic as ``check --format json`` gives it."""
    plan = tmp_path / "p.expand"
    plan.write_text(plan_text)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = cli(["check", "--format", "json", str(plan), "--model", model])
    text = capsys.readouterr().out
    assert rc == 1, text
    doc = json.loads(text)
    diags = doc[0]["diagnostics"]
    errors = [d for d in diags if d["severity"] == "error"]
    rc = cli(["apply", str(plan), "--model", model, "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    return errors[0]


@pytest.mark.slow  # builds a tiny Gemma-4 and conforms three prefixes (~10 s)
def test_gemma4_depth_growth_is_refused_at_the_depth_statement(tiny, tmp_path, capsys):
    model = tiny("gemma4_text")
    d = _refused("widen ffn x2 net2net\ninsert layer 1 copy\nwiden vocab to 256\n", model, tmp_path, capsys)
    assert (d["code"], d["line"], d["col"]) == ("SW371", 2, 1), d
    assert "embed_tokens_per_layer" in d["message"] and "one slice per layer" in d["message"], d["message"]
    assert "not homogeneous" not in d["message"]
    # the layer's per-layer overrides moved with it: transformers' validation no longer refuses
    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError

    with pytest.raises(PlanError) as e:
        api.check("duplicate layers 0..2", model)
    assert e.value.diagnostics[0].code == "SW371"


def test_per_layer_config_follows_the_layer_map(tiny):
    from scaler_wizard.compiler.typecheck import check_plan
    from scaler_wizard.grammar import parse
    from scaler_wizard.ir import model_ir_for

    model = tiny("gemma4_text")
    ir = model_ir_for(model)
    assert ir.config["per_layer_config"] == {"1": {"head_dim": 512}}
    rp = check_plan(parse("duplicate layers 0..2\n"), ir, model_ref=model)  # the type checker alone
    assert rp.config_after["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert rp.config_after["per_layer_config"] == {"1": {"head_dim": 512}, "3": {"head_dim": 512}}
    rp = check_plan(parse("insert layer 0 copy\n"), ir, model_ref=model)
    assert rp.config_after["per_layer_config"] == {"2": {"head_dim": 512}}


@pytest.mark.slow  # builds a tiny Inkling-2 and applies with verification (~10 s)
@pytest.mark.parametrize("family", ["inkling2_text", "inkling2_loop_text"])
def test_inkling2_write_follows_the_reverse_conversion(tiny, tmp_path, capsys, family):
    # inkling2_text: the unembedding is padded with zero rows (none here: unpadded == vocab size);
    # inkling2_loop_text: the message queries are split back by `queries[:, [0, 3]]` and `[:, 1:3]`
    from safetensors import safe_open

    model = tiny(family)
    plan = tmp_path / "p.expand"
    plan.write_text("widen ffn x2 net2net\n")
    out = tmp_path / "out"
    rc = cli(["apply", str(plan), "--model", model, "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "model.llm.unembed.weight" in names and "lm_head.weight" not in names
        assert tuple(f.get_slice("model.llm.unembed.weight").get_shape()) == (128, 64)
    with safe_open(f"{model}/model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert names <= stored  # the input's own naming throughout
    # the router's `e_score_correction_bias` is a persistent buffer, not a parameter: carried once
    # discovery carries persistent buffers
    assert all(n.endswith(".mlp.gate.bias") for n in stored - names), stored - names


@pytest.mark.slow  # builds a tiny MiMo-V2-Flash (~8 s)
def test_mimo_heads_growth_over_two_attention_shapes_is_sw370(tiny, tmp_path, capsys):
    from scaler_wizard.ir import model_ir_for

    model = tiny("mimo_v2_flash")
    ir = model_ir_for(model)
    assert not ir.mixers  # the sliding layers' attention with sinks is attention, not a mixer
    assert [(a.layers, a.heads, a.kv_heads) for a in ir.attention_shapes] == [((1,), 4, 4)]
    d = _refused("# heads\n  widen heads x2\n", model, tmp_path, capsys)
    assert (d["code"], d["line"], d["col"]) == ("SW370", 2, 3), d
    assert "two attention shapes" in d["message"] and "4 kv heads" in d["message"], d["message"]


@pytest.mark.slow  # builds a tiny gpt-oss and applies with verification (~10 s)
def test_attention_with_sinks_grows_heads_exactly(tiny, tmp_path):
    # gpt-oss: every layer's eager attention concatenates per-head sinks to the scores; it was
    # "attention not recognised" (SW352) for every op. The sinks grow with their heads.
    from scaler_wizard import api

    model = tiny("gpt_oss")
    r = api.apply("widen heads x2", model, out=str(tmp_path / "out"), verify=True)
    assert r["passed"] and r["exactness"] == "exact"
    # Its experts' output bias [E, hidden] (added after the grouped matmul) was read as `elem` on
    # hidden and hidden growth refused (SW358); its interleaved gate_up_proj ([..., ::2] / [..., 1::2])
    # was an unread 2 x ffn axis (SW357). Since session 11 discovery reads both (the bias is `out`,
    # the strided slices split the axis as ffn x 2): hidden and ffn growth verify exact.
    for plan in ("widen hidden x2 tile", "widen ffn x2 net2net"):
        out = tmp_path / plan.split()[1]
        r = api.apply(plan, model, out=str(out), verify=True)
        assert r["passed"] and r["exactness"] == "exact", (plan, r["verification"])
