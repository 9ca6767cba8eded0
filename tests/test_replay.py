"""Process replay (tinygrad's habit): plans x families -> the resolved plan and the lowered program.

Every plan below is type-checked and lowered against every family of ``tests/families.py`` (configs
only: no weights are read). The result, the resolved plan as ``check --format json`` prints it plus
the tensor program as ``compile`` writes it, or the diagnostics when the plan is refused, is compared
with ``tests/golden/replay/<family>.json``. A refactor must leave every entry byte-identical; a change
that means to alter lowering regenerates the corpus (``SW_UPDATE_GOLDEN=1``) and the diff is read and
explained in the commit message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from families import FAMILIES

GOLDEN = Path(__file__).parent / "golden" / "replay"
EXAMPLES = Path(__file__).parent.parent / "examples"

# The statement kinds of the growth property test, the README's examples and a few combinations.
PLANS = [
    "widen hidden x2",
    "widen hidden x2 tile",
    "widen hidden to 96 lemon",
    "widen hidden x2 lemon untie=true",
    "widen ffn x2 net2net",
    "widen ffn to 200 zero",
    "widen ffn to 220 net2net split=equal",
    "widen ffn x2 lemon noise=0.01",
    "widen heads x2 dup",
    "widen heads x2 zero",
    "widen kv_heads x2",
    "widen head_dim x2",
    "widen vocab to 192 mean",
    "insert layers every 1 identity",
    "insert 1 layers after 0 zero",
    "insert layer 0 identity",
    "insert layer 1 cancel",
    "duplicate layers 0..2",
    "stack x2",
    "upcycle ffn experts 4 top 2",
    "seed 7\nwiden hidden x2 lemon\nwiden ffn x2 net2net\ninsert layer 1 identity",
    "grow to 400K prefer width",
    "grow to 400K prefer depth",
] + sorted(p.name for p in EXAMPLES.glob("*.expand"))


def _plan_text(plan: str) -> str:
    if plan.endswith(".expand"):  # an example file, without its model line (the family is the model)
        lines = (EXAMPLES / plan).read_text().splitlines()
        return "\n".join(ln for ln in lines if not ln.lstrip().startswith("model "))
    return plan


def replay_entry(plan_text: str, model_dir: str) -> dict:
    """The resolved plan and program for ``plan_text`` against ``model_dir``, or its diagnostics."""
    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError, to_json
    from scaler_wizard.compiler.passes.base import PassError
    from scaler_wizard.compiler.report import plan_to_dict

    try:
        rp = api.check(plan_text, model=model_dir)
    except PlanError as e:
        return {"refused": json.loads(to_json(e.diagnostics))}
    resolved = json.loads(json.dumps(plan_to_dict(rp), default=str))
    resolved.pop("model", None)  # the temporary directory's path
    try:
        prog = api.compile(rp, stored=None)
    except PassError as e:
        return {"resolved": resolved, "pass_error": str(e)}
    except PlanError as e:  # refused after lowering (the output config would not describe the program's tensors)
        return {"resolved": resolved, "refused_after_lowering": json.loads(to_json(e.diagnostics))}
    text = prog.to_json().replace(model_dir, "<model>")
    return {"resolved": resolved, "program_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "outputs": len(prog.outputs), "config_patch": prog.config_patch}


def _scrub(obj, model_dir: str):
    text = json.dumps(obj, indent=1, sort_keys=True, default=str).replace(model_dir, "<model>")
    return json.loads(text)


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    out = {}
    for name, make in FAMILIES.items():
        d = tmp_path_factory.mktemp(name)
        make().save_pretrained(d)
        out[name] = str(d)
    return out


@pytest.mark.slow  # ~10 s a family
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_replay_corpus(family, config_dirs):
    model_dir = config_dirs[family]
    got = {plan: _scrub(replay_entry(_plan_text(plan), model_dir), model_dir) for plan in PLANS}
    path = GOLDEN / f"{family}.json"
    if os.environ.get("SW_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    if not path.exists():
        pytest.fail(f"missing replay corpus {path}; regenerate with SW_UPDATE_GOLDEN=1")
    want = json.loads(path.read_text())
    changed = [p for p in sorted(set(want) | set(got)) if want.get(p) != got.get(p)]
    assert not changed, f"{family}: lowering changed for {changed}; regenerate with SW_UPDATE_GOLDEN=1 and read the diff"
