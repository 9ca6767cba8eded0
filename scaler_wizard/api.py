"""Python API mirroring the CLI: ``ir``, ``check``, ``compile``, ``apply``, ``verify``, ``train``,
``evaluate``.

    >>> from scaler_wizard import api
    >>> rp = api.check("widen ffn x2 net2net", model="path/to/model")      # plan text or a .expand path
    >>> prog = api.compile("plan.expand", model="path/to/model")            # TensorProgram
    >>> res = api.apply("plan.expand", model="path/to/model", out="grown")  # dict: report, verification
    >>> rep = api.verify("grown", against="path/to/model")                  # dict, as `verify --format json`
    >>> res = api.train("grown", "run", data=["corpus.txt"], steps=100)    # TrainResult
    >>> table = api.evaluate(["grown", "run/final"], ["perplexity"], text_files=["held_out.txt"])

Plan errors raise :class:`~scaler_wizard.compiler.diagnostics.PlanError` (with ``.sources`` for
rendering), bad inputs raise :class:`~scaler_wizard.compiler.diagnostics.UsageError`, lowering
failures raise :class:`~scaler_wizard.compiler.passes.base.PassError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from scaler_wizard.compiler.diagnostics import PlanError, UsageError

SIDECAR = "scaler_wizard_growth.json"
EPS_RTOL = 1e-3  # exact-eps plans: the epsilon mismatch is ~eps / mean-square of the stream


def _parse(plan: str):
    from scaler_wizard.grammar import ast as A
    from scaler_wizard.grammar import parse

    if isinstance(plan, A.Plan):
        return plan, {plan.file: plan.source}
    looks_like_path = "\n" not in plan and (plan.endswith(".expand") or os.path.isfile(plan))
    if looks_like_path:
        from scaler_wizard.compiler.frontend import parse_plan_file

        if not os.path.isfile(plan):
            raise UsageError(f"{plan}: no such plan file")
        return parse_plan_file(plan)
    sources = {"<plan>": plan}
    try:
        return parse(plan, file="<plan>"), sources
    except PlanError as e:
        e.sources = sources
        raise


def check(plan: str, model: str | None = None, *, seed: int | None = None, dtype: str | None = None, context: int = 2048):
    """Parse and type-check ``plan`` (text or path). Returns a ResolvedPlan."""
    from scaler_wizard.compiler.frontend import check_parsed

    ast, sources = _parse(plan)
    rp = check_parsed(ast, sources, model=model, context=context)
    if seed is not None:
        rp = dataclasses.replace(rp, seed=int(seed))
    if dtype is not None:
        from scaler_wizard.compiler.typecheck import DTYPE_ALIASES, DTYPES

        d = DTYPE_ALIASES.get(dtype, dtype)
        if d not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        rp = dataclasses.replace(rp, dtype=d)
    return rp


def compile(plan, model: str | None = None, *, seed: int | None = None, dtype: str | None = None, stored=None):
    """Type-check and lower ``plan``: a TensorProgram (no weights read; ``stored`` names the tensors in
    the checkpoint when known, to pick which member of a tied set is stored)."""
    from scaler_wizard.compiler.lower import lower

    rp = plan if hasattr(plan, "layer_map") else check(plan, model, seed=seed, dtype=dtype)
    if stored is None and os.path.isdir(str(rp.model_ref)):
        try:
            from scaler_wizard.runtime.checkpoint import open_checkpoint

            stored = set(open_checkpoint(rp.model_ref).names())
        except Exception:
            stored = None
    prog = lower(rp, stored=stored)
    prog.metadata["plan"] = rp.plan_text
    return prog


def sidecar(prog, plan_text: str, base_model: str | None, rp=None) -> dict:
    predicted = {}
    if rp is not None:  # what the compiler predicts the re-traced output IR will show
        predicted = {"groups": dict(rp.sizes_after), "layers": len(rp.layer_map), "params": rp.costs_after.params,
                     "model_type": rp.config_after.get("model_type", rp.ir.model_type)}
    return {
        "format": 1,
        "predicted": predicted,
        "plan": plan_text,
        "base_model": base_model,
        "exactness": prog.metadata.get("exactness"),
        "ops": prog.metadata.get("ops", []),
        "symmetry_probes": prog.metadata.get("symmetry_probes", []),
        "tensors": {
            name: {"status": o.status,
                   **({"original_region": [list(r) for r in o.original_region]} if o.original_region else {})}
            for name, o in prog.outputs.items()
        },
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def apply(plan, model: str | None = None, *, out: str, force: bool = False, allow_bin: bool = False,
          seed: int | None = None, dtype: str | None = None, progress: bool = False, verify: bool = True,
          shard_size: str | int = "5GB") -> dict[str, Any]:
    """Grow a checkpoint. Returns {"out", "report" (ExecutionReport), "verification" (dict or None),
    "exactness", "passed" (None when not verified)}."""
    from scaler_wizard.runtime.card import card_info, render_card
    from scaler_wizard.runtime.checkpoint import CheckpointError, check_output_path, open_checkpoint
    from scaler_wizard.runtime.execute import execute

    rp = plan if hasattr(plan, "layer_map") else check(plan, model, seed=seed, dtype=dtype)
    try:
        reader = open_checkpoint(rp.model_ref, allow_pickle=allow_bin)
        check_output_path(out, reader.path, force)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    prog = compile(rp, stored=set(reader.names()))
    text = rp.plan_text
    card = card_info(prog, reader, plan_text=text, base_model=rp.model_ref)
    card["ops"] = [{"name": o.text, "exactness": o.exactness, "status": o.kind, "explain": o.reason} for o in rp.ops]
    try:
        report = execute(prog, reader, out, dtype=rp.dtype, force=force, progress=progress, card=card,
                         shard_size=shard_size)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    outp = Path(report.out_dir)
    _write_atomic(outp / SIDECAR, json.dumps(sidecar(prog, text, rp.model_ref, rp), indent=1) + "\n")
    result: dict[str, Any] = {"out": str(outp), "report": report, "verification": None,
                              "exactness": rp.exactness, "passed": None, "program": prog}
    if verify:
        rep = verify_dirs(outp, rp.model_ref, exactness=rp.exactness, symmetry=False)
        result["verification"] = rep
        result["passed"] = rep["passed"]
        card["verification"] = rep
        _write_atomic(outp / "README.md", render_card(card))
    return result


def tolerance_for(exactness: str | None, tolerance: float | None) -> float | None:
    if tolerance is not None:
        return tolerance
    from scaler_wizard.runtime.verify import DEFAULT_RTOL

    return {"exact": DEFAULT_RTOL, "exact-eps": EPS_RTOL}.get(exactness or "exact")


def verify_dirs(out, against, *, texts=None, tolerance: float | None = None, exactness: str | None = None,
                symmetry: bool = True) -> dict[str, Any]:
    """Compare OUT with the original; judge by the plan's exactness class (from the sidecar)."""
    from scaler_wizard.runtime.verify import compare_models, symmetry_check

    side = {}
    p = Path(out) / SIDECAR
    if p.is_file():
        side = json.loads(p.read_text())
    exactness = exactness or side.get("exactness") or "exact"
    tol = tolerance_for(exactness, tolerance)
    rep = compare_models(str(out), str(against), texts=texts, rtol=tol if tol is not None else 1e-5)
    judged = tol is not None
    d = rep.to_dict()
    d["exactness"] = exactness
    d["judged"] = judged
    d["passed"] = rep.passed if judged else True
    d["tolerance"] = tol
    if symmetry and side.get("symmetry_probes"):
        need, avail = _symmetry_bytes(out)
        if need > 0.8 * avail:  # the whole model trains one step: not bounded like the comparison
            d["symmetry"] = {"passed": None, "error": f"skipped: one AdamW step of the whole model needs about "
                             f"{need / 1e9:.1f} GB (fp32 weights, gradients, optimizer state), "
                             f"{avail / 1e9:.1f} GB available"}
            symmetry = False
    if symmetry and side.get("symmetry_probes"):
        try:
            sym = symmetry_check(str(out), [[tuple(s) for s in g] for g in side["symmetry_probes"]], steps=1)
            d["symmetry"] = sym.to_dict()
        except (KeyError, ValueError) as e:
            d["symmetry"] = {"passed": None, "error": str(e)}
    d["ir_check"] = _ir_check(out, side)
    return d


def _symmetry_bytes(out) -> tuple[int, int]:
    """(bytes the symmetry check needs: 4 fp32 copies of OUT's parameters, bytes of memory available)."""
    import psutil

    from scaler_wizard.runtime.checkpoint import open_checkpoint

    try:
        r = open_checkpoint(out)
        n = sum(r.info(k).numel for k in r.names())
    except Exception:  # unreadable here: the comparison has already said so
        return 0, 1
    return 16 * n, int(psutil.virtual_memory().available)


def _ir_check(out, side) -> dict:
    """Re-trace OUT's config and compare group sizes with the config the compiler wrote."""
    try:
        from scaler_wizard.ir import model_ir_for

        ir = model_ir_for(str(out))
    except Exception as e:  # discovery unavailable or unsupported family
        return {"done": False, "reason": f"{type(e).__name__}: {e}"}
    cfg = json.loads((Path(out) / "config.json").read_text())
    mismatches = []
    for name, g in ir.groups.items():
        if g.config_key and g.config_key in cfg and cfg[g.config_key] != g.size:
            mismatches.append(f"{name}: traced {g.size}, config {g.config_key}={cfg[g.config_key]}")
    if ir.num_layers != cfg.get(ir.layers_key, ir.num_layers):
        mismatches.append(f"layers: traced {ir.num_layers}")
    # The strongest oracle: the IR re-traced from OUT equals what the compiler predicted.
    pred = side.get("predicted") or {}
    for name, size in (pred.get("groups") or {}).items():
        if name in ir.groups and ir.groups[name].size != size:
            mismatches.append(f"{name}: predicted {size}, traced {ir.groups[name].size}")
    if pred.get("layers") is not None and pred["layers"] != ir.num_layers:
        mismatches.append(f"layers: predicted {pred['layers']}, traced {ir.num_layers}")
    if pred.get("params") is not None and pred["params"] != ir.total_params():
        mismatches.append(f"parameters: predicted {pred['params']:,}, traced {ir.total_params():,}")
    return {"done": True, "passed": not mismatches, "mismatches": mismatches, "compared_to_prediction": bool(pred),
            "groups": {k: g.size for k, g in ir.groups.items()}, "params": ir.total_params()}


def verify(out, against, *, texts=None, tolerance: float | None = None, symmetry: bool = True) -> dict[str, Any]:
    return verify_dirs(out, against, texts=texts, tolerance=tolerance, symmetry=symmetry)


def ir(model: str, *, use_cache: bool = True):
    """The model's IR, as `scaler-wizard ir` prints it (a ModelIR value)."""
    from scaler_wizard.ir import model_ir_for

    return model_ir_for(model, use_cache=use_cache)


def train(model_dir, run_dir, *, plan: str | None = None, resume=None, progress: bool = False, **options):
    """Continue training, as `scaler-wizard train`: ``options`` are recipe keys (``steps``, ``lr``,
    ``data``, ``freeze_original``, ...), overriding the plan's ``train { }`` block when ``plan`` is
    given."""
    from scaler_wizard.runtime.recipe import TrainRecipe, recipe_from_plan
    from scaler_wizard.runtime.train import train as _train

    recipe = recipe_from_plan(plan) if plan else TrainRecipe()
    recipe.update(options, "api.train options")  # validated like a recipe file: unknown keys are named
    return _train(model_dir, run_dir, recipe, resume=resume, progress=progress)


def evaluate(models: list[str], tasks: list[str], **kw):
    """lm-eval over several models, as `scaler-wizard eval` (keyword arguments as in
    :func:`scaler_wizard.runtime.evaluate.evaluate`)."""
    from scaler_wizard.runtime.evaluate import evaluate as _evaluate

    return _evaluate(models, tasks, **kw)
