"""The growth-payoff benchmark's mechanics on its tiny preset (`benchmarks/growth_payoff.py --quick`):
every arm runs (or is skipped with its reason), FLOPs grow along every curve, growth events are
logged with the parameters before/after, exact plans keep the held-out loss across the growth,
the JSON has its schema and the PNG is written. The FLOPs ratio itself is not asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # 26-90 s on 2 shared cores (1 thread): 6 tiny training runs, 2 applies


def _bench():
    spec = importlib.util.spec_from_file_location("growth_payoff", ROOT / "benchmarks" / "growth_payoff.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["growth_payoff"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("payoff")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    mod = _bench()
    import torch

    threads = torch.get_num_threads()
    try:  # one thread: tiny matmuls on a shared machine lose more to spinning OpenMP threads than they gain
        assert mod.main(["--quick", "-o", str(out), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return mod, out, json.loads((out / "payoff.json").read_text())


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_arm_runs_or_names_the_missing_feature(quick):
    mod, out, res = quick
    arms = {a["name"]: a for a in res["arms"]}
    assert list(arms) == ["baseline", "carry", "reset", "llama-pro", "stack", "schedule"]
    live = mod.live_growth_available()
    for name, a in arms.items():
        if name in ("carry", "reset", "schedule") and not live:
            assert a["status"] == "skipped" and "at step" in a["reason"] and not a["curve"]
        else:
            assert a["status"] == "ok" and a["curve"], name


def test_flops_increase_and_every_arm_sees_the_same_steps(quick):
    _, _, res = quick
    cfg = res["config"]
    for a in res["arms"]:
        if a["status"] != "ok":
            continue
        steps = [pt["step"] for pt in a["curve"]]
        flops = [pt["flops"] for pt in a["curve"]]
        assert steps[0] == 0 and steps[-1] == cfg["steps"], a["name"]
        for (s0, f0), (s1, f1) in zip(zip(steps, flops), zip(steps[1:], flops[1:])):
            assert s1 >= s0 and f1 >= f0, a["name"]
            assert (s1 > s0) == (f1 > f0), a["name"]  # equal only at the growth point (same step)
        assert all(math.isfinite(pt["eval_loss"]) for pt in a["curve"])
        assert a["curve"][-1]["tokens"] == cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]
    base = next(a for a in res["arms"] if a["name"] == "baseline")
    # our FLOPs formula and train's own cumulative `flops` (compiler FLOPs/token) agree
    assert base["runs"][0]["project_flops"] == base["curve"][-1]["flops"]
    for a in res["arms"]:
        if a["status"] == "ok" and a["name"] != "baseline":
            # the small phase is cheaper per token: a grown arm spends fewer FLOPs over the same tokens
            assert a["curve"][-1]["flops"] < base["curve"][-1]["flops"], a["name"]


def test_growth_events_are_logged_and_exact_plans_keep_the_loss(quick):
    _, out, res = quick
    cfg = res["config"]
    arms = {a["name"]: a for a in res["arms"]}
    for name in ("llama-pro", "stack"):  # train -> apply -> train
        (ev,) = arms[name]["growth_events"]
        assert ev["step"] == cfg["grow_at"] and ev["params_after"] > ev["params_before"] > 0
        small_end = [pt for pt in arms[name]["curve"] if pt["phase"] == "small"][-1]
        assert ev["flops"] == pytest.approx(small_end["flops"])
        # the continuation read the token stream from step S on
        recipe = json.loads((out / f"run-{name}.recipe.json").read_text())
        assert recipe["data_offset"] == cfg["grow_at"] and recipe["steps"] == cfg["steps"] - cfg["grow_at"]
    # exact growth: the same held-out loss before and after (fp32); stack x2 is approximate
    ev = arms["llama-pro"]["growth_events"][0]
    assert ev["eval_loss_after"] == pytest.approx(ev["eval_loss_before"], abs=1e-4)
    ev = arms["stack"]["growth_events"][0]
    assert abs(ev["eval_loss_after"] - ev["eval_loss_before"]) > 1e-3
    if arms["carry"]["status"] != "ok":
        return
    for name, steps in (("carry", [cfg["grow_at"]]), ("reset", [cfg["grow_at"]]),
                        ("schedule", [cfg["grow_at"], 2 * cfg["grow_at"]])):  # train --plan, `at step`
        evs = arms[name]["growth_events"]
        assert [e["step"] for e in evs] == steps, name
        assert all(e["params_after"] > e["params_before"] > 0 for e in evs), name
        assert evs[-1]["params_after"] == arms["baseline"]["runs"][0]["params"], name  # the target's shape
        assert [e["optimizer"] for e in evs] == ["reset" if name == "reset" else "carry"] * len(steps)


def test_json_schema_table_and_png(quick):
    mod, out, res = quick
    assert {"preset", "config", "flops_formula", "data", "arms", "summary", "wall_s"} <= set(res)
    assert res["preset"] == "quick"
    assert set(res["data"]["train_plays"]).isdisjoint(res["data"]["eval_plays"])  # whole plays held out
    s = res["summary"]
    base = next(a for a in res["arms"] if a["name"] == "baseline")
    assert s["baseline_final_eval_loss"] == base["curve"][-1]["eval_loss"]
    assert base["summary"]["ratio_to_baseline_flops"] == pytest.approx(1.0)
    for a in res["arms"]:
        if a["status"] == "ok":
            assert {"final_eval_loss", "total_flops", "flops_to_baseline_loss", "ratio_to_baseline_flops",
                    "eval_loss_at_baseline_flops_fraction"} <= set(a["summary"])
    png = out / "payoff.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tok = out / "tokenizer" / "tokenizer.json"
    assert tok.is_file()


def test_crossing_and_interpolation_helpers():
    mod = _bench()
    curve = [{"flops": 0.0, "eval_loss": 6.0}, {"flops": 10.0, "eval_loss": 4.0}, {"flops": 20.0, "eval_loss": 3.0}]
    assert mod.first_crossing(curve, 5.0) == pytest.approx(5.0)
    assert mod.first_crossing(curve, 3.5) == pytest.approx(15.0)
    assert mod.first_crossing(curve, 2.0) is None
    assert mod.loss_at(curve, 15.0) == pytest.approx(3.5)
    assert mod.loss_at(curve, 25.0) is None
    grown = [{"flops": 0.0, "eval_loss": 6.0}, {"flops": 10.0, "eval_loss": 5.0}, {"flops": 10.0, "eval_loss": 5.5}]
    assert mod.loss_at(grown, 10.0) == 5.5  # after a growth at equal FLOPs the grown point counts


def test_data_offset_recipe_key():
    from scaler_wizard.runtime.recipe import RecipeError, TrainRecipe

    assert TrainRecipe.from_options({"data_offset": 7}).data_offset == 7
    with pytest.raises(RecipeError, match="data_offset"):
        TrainRecipe.from_options({"data_offset": -1})
    with pytest.raises(RecipeError, match="streaming"):
        TrainRecipe.from_options({"data_offset": 3, "streaming": True})
