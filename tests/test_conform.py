"""The written config describes the written tensors (issue 7 section 1) and an output lands only
after it verifies (section 3).

Inputs are tiny real checkpoints (save_pretrained, norms and biases perturbed) whose config.json
leaves sizes implicit or lets values coincide; see tests/implicit_configs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from families import FAMILIES
from implicit_configs import ISSUE_INPUTS, save_input, spec

from scaler_wizard import api
from scaler_wizard.cli import main
from scaler_wizard.diagnostics import PlanError

RTOL = 1e-5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("implicit")
    return {name: save_input(name, root / name) for name in ISSUE_INPUTS}


def _load_clean(out):
    import torch

    from scaler_wizard.runtime.verify import model_class_for

    m, info = model_class_for(out).from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, bad
    return m


# what each input's written config must say (the key the input left implicit or coincident)
EXPECT = {
    "a_llama_no_head_dim": {"head_dim": 16, "hidden_size": 128},
    "b_phi_kv_eq_heads": {"num_key_value_heads": 8, "num_attention_heads": 8},
    "b_llama_kv4_heads": {"num_key_value_heads": 8, "num_attention_heads": 8},
    "b_phi3_kv_eq_heads": {"num_key_value_heads": 8, "num_hidden_layers": 3},
    "c_gpt2_n_positions_eq_n_embd": {"n_positions": 64, "n_embd": 128},  # n_positions was not grown
    "d_gptj_widen_ffn": {"n_inner": 512, "n_embd": 64},
}


@pytest.mark.parametrize("name", list(ISSUE_INPUTS))
def test_issue_inputs_apply_and_verify_exactly(inputs, tmp_path, name):
    _, plan = ISSUE_INPUTS[name]
    rp = api.check(plan, str(inputs[name]))
    assert rp.exactness == "exact"
    res = api.apply(rp, out=str(tmp_path / "out"))
    ver = res["verification"]
    assert res["landed"] and ver["passed"] and ver["max_rel"] <= RTOL, ver
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    for k, v in EXPECT[name].items():
        assert cfg.get(k) == v, (k, cfg.get(k))
    _load_clean(tmp_path / "out")


def test_check_names_the_implicit_key(inputs):
    rp = api.check("widen hidden x2 tile", str(inputs["a_llama_no_head_dim"]))
    assert rp.config_diff()["head_dim"] == (None, 16)
    assert any("head_dim" in n and "implicit" in n for n in rp.config_notes)
    # a key the plan did not grow never changes, though its value equals hidden's
    rp = api.check("widen hidden x2 tile", str(inputs["c_gpt2_n_positions_eq_n_embd"]))
    assert "n_positions" not in rp.config_diff()


def test_mismatch_is_a_compile_time_error(inputs, tmp_path, monkeypatch):
    """A program whose tensors the grown config cannot describe (simulated compiler bug: q_proj one
    head short) is refused by check and apply with SW316 naming the tensor and the config keys, and
    nothing is written."""
    from scaler_wizard.compiler import conform

    def short(real):
        def f(x):
            t = dict(real(x))
            for n in t:
                if n.endswith("q_proj.weight"):
                    t[n] = (t[n][0] - 16, t[n][1])
            return t
        return f

    monkeypatch.setattr(conform, "program_tensors", short(conform.program_tensors))  # compile / apply
    monkeypatch.setattr(conform, "predicted_tensors", short(conform.predicted_tensors))  # check
    monkeypatch.setattr(conform, "_cache_path", lambda key: tmp_path / "verdicts" / f"{key}.json")
    d = str(inputs["b_llama_kv4_heads"])
    with pytest.raises(PlanError) as e:
        api.check("widen heads x2 dup", d)
    diag = e.value.diagnostics[0]
    assert diag.code == "SW316" and "q_proj.weight" in diag.message and "num_attention_heads" in diag.message
    out = tmp_path / "out"
    plan = tmp_path / "p.expand"
    plan.write_text("widen heads to 12 dup\n")
    assert main(["apply", str(plan), "--model", d, "-o", str(out), "--no-progress"]) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# ------------------------------------------------------------------ every family, implicit-key variants
def _variants():
    """Implicit-key variants where each kind bites: head_dim left out (families whose config class
    re-derives it), kv == heads written out, a position count equal to hidden (learned position
    tables, Llama as the control), GPT-2's n_inner left out, ffn == hidden."""
    out = []
    for fam in ("llama", "mistral"):
        out.append((fam, "no_head_dim", spec("", family=fam, drop=("head_dim",)), "widen hidden x2"))
    for fam in ("llama", "qwen2", "phi3", "gemma2", "mixtral"):
        s = spec("", family=fam, num_key_value_heads=4)
        out.append((fam, "kv_eq_heads", s, "widen hidden x2\nwiden ffn x2"))
        out.append((fam, "kv_eq_heads", s, "widen heads x2"))
    for fam in ("gpt2", "opt", "opt_postln", "bert", "llama"):
        key = "n_positions" if fam == "gpt2" else "max_position_embeddings"
        out.append((fam, "positions_eq_hidden", spec("", family=fam, **{key: 64}), "widen hidden x2"))
    out.append(("gpt2", "no_n_inner", spec("", family="gpt2", drop=("n_inner",)), "widen hidden x2\nwiden ffn x2"))
    out.append(("llama_square", "ffn_eq_hidden", spec("", family="llama_square"), "widen hidden x2"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fam,variant,s,plan", _variants(),
                         ids=[f"{f}-{v}-{p.splitlines()[-1].replace(' ', '_')}" for f, v, _, p in _variants()])
def test_families_implicit_keys_refuse_or_verify(tmp_path, fam, variant, s, plan):
    from transformers import AutoConfig

    d = save_input(s, tmp_path / "in")
    saved = json.loads((d / "config.json").read_text())
    if s["drop"]:  # a real checkpoint only drops a key its config class re-derives to the same value
        reread = AutoConfig.for_model(saved["model_type"], **{k: v for k, v in saved.items() if k != "model_type"})
        full = FAMILIES[fam]().to_dict()
        if any(getattr(reread, k, None) != full.get(k) for k in s["drop"]):
            pytest.skip(f"{fam}'s config class does not re-derive {s['drop']}: no such checkpoint exists")
    out = tmp_path / "out"
    try:
        res = api.apply(plan, str(d), out=str(out))
    except PlanError:
        assert not out.exists()
        return
    ver = res["verification"]
    assert res["landed"] and ver["passed"], ver
    _load_clean(out)


# ------------------------------------------------------------------ section 3: land only what verifies
@pytest.fixture()
def llama_dir(inputs):
    return inputs["b_llama_kv4_heads"]


def _break_tile(monkeypatch):
    """An executor op that computes wrong values (every tiled tensor off by 1e-2)."""
    from scaler_wizard.compiler import program as P

    real = P.Tile.compute

    def wrong(self, ins, ctx):
        return real(self, ins, ctx) + 1e-2

    monkeypatch.setattr(P.Tile, "compute", wrong)


def test_failed_verification_leaves_nothing(llama_dir, tmp_path, monkeypatch, capsys):
    _break_tile(monkeypatch)
    plan = tmp_path / "p.expand"
    plan.write_text("widen hidden x2 tile\n")
    out = tmp_path / "out"
    rc = main(["apply", str(plan), "--model", str(llama_dir), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert not out.exists() and not (tmp_path / "out.failed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind
    assert "verification failed" in err and "nothing was written" in err and "Traceback" not in err

    rc = main(["apply", str(plan), "--model", str(llama_dir), "-o", str(out), "--no-progress", "--keep-failed"])
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    kept = tmp_path / "out.failed"
    assert (kept / "config.json").is_file() and "kept at" in err
    assert "## Verification" in (kept / "README.md").read_text()  # figures in the card before any rename


def test_unloadable_output_is_a_failed_verification(llama_dir, tmp_path, monkeypatch, capsys):
    """A config that does not describe the tensors (written wrong behind the compiler's back): the
    load error is reported as the verification failure, with no traceback, and nothing lands."""
    from scaler_wizard.runtime import execute as X

    real = X.merged_config

    def wrong(reader, program, dtype):
        cfg = real(reader, program, dtype)
        cfg["intermediate_size"] = 80
        return cfg

    monkeypatch.setattr(X, "merged_config", wrong)
    plan = tmp_path / "p.expand"
    plan.write_text("widen ffn x2\n")
    out = tmp_path / "out"
    rc = main(["apply", str(plan), "--model", str(llama_dir), "-o", str(out), "--no-progress", "--format", "json"])
    cap = capsys.readouterr()
    assert rc == 1 and not out.exists()
    assert "could not be loaded or run" in cap.err and "Traceback" not in cap.err
    assert json.loads(cap.out)["verification"]["error"]


def test_no_verify_lands_unverified_and_passing_output_lands(llama_dir, tmp_path, monkeypatch, capsys):
    _break_tile(monkeypatch)
    plan = tmp_path / "p.expand"
    plan.write_text("widen hidden x2 tile\n")
    out = tmp_path / "out"
    assert main(["apply", str(plan), "--model", str(llama_dir), "-o", str(out), "--no-progress", "--no-verify"]) == 0
    assert (out / "model.safetensors").is_file() and "unverified" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["apply", str(plan), "--model", str(llama_dir), "-o", str(out), "--no-progress", "--force"]) == 0
    assert "landed at" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "## Verification" in card and "kv_cache_vs_original" in card
