"""Python API mirroring the CLI: ``ir``, ``check``, ``compile``, ``apply``, ``verify``, ``train``,
``evaluate``.

    >>> from scaler_wizard import api
    >>> rp = api.check("widen ffn x2 net2net", model="path/to/model")      # plan text or a .expand path
    >>> prog = api.compile("plan.expand", model="path/to/model")            # TensorProgram
    >>> res = api.apply("plan.expand", model="path/to/model", out="grown")  # dict: report, verification
    >>> rep = api.verify("grown", against="path/to/model")                  # dict, as `verify --format json`
    >>> res = api.train("grown", "run", data=["corpus.txt"], steps=100)    # TrainResult
    >>> table = api.evaluate(["grown", "run/final"], ["perplexity"], text_files=["held_out.txt"])

Plan errors raise :class:`~scaler_wizard.diagnostics.PlanError` (with ``.sources`` for
rendering), bad inputs raise :class:`~scaler_wizard.diagnostics.UsageError`, lowering
failures raise :class:`~scaler_wizard.compiler.passes.base.PassError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from scaler_wizard.diagnostics import PlanError, UsageError

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
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise UsageError(f"seed must be an integer from 0 to 2**63-1, got {seed!r}")
        rp = dataclasses.replace(rp, seed=int(seed))
    if dtype is not None:
        from scaler_wizard.compiler.typecheck import DTYPE_ALIASES, DTYPES

        d = DTYPE_ALIASES.get(dtype, dtype)
        if d not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        rp = dataclasses.replace(rp, dtype=d)
    return rp


def compile(plan, model: str | None = None, *, seed: int | None = None, dtype: str | None = None, stored=None,
            dump_after: str | None = None):
    """Type-check and lower ``plan``: a TensorProgram (no weights read; ``stored`` names the tensors in
    the checkpoint when known, to pick which member of a tied set is stored). ``dump_after``: the
    program as it stands after that lowering pass (not checked against the output config)."""
    from scaler_wizard.compiler.lower import lower

    rp = plan if hasattr(plan, "layer_map") else check(plan, model, seed=seed, dtype=dtype)
    if stored is None and os.path.isdir(str(rp.model_ref)):
        try:
            from scaler_wizard.runtime.checkpoint import open_checkpoint

            stored = set(open_checkpoint(rp.model_ref).names())
        except Exception:
            stored = None
    if dump_after is not None:
        prog = lower(rp, stored=stored, dump_after=dump_after)
        prog.metadata["plan"] = rp.plan_text
        return prog
    prog = lower(rp, stored=stored)
    # Every output name and shape against the model transformers builds from the config to be
    # written (meta device; cached): a difference is a PlanError before any byte is written.
    from scaler_wizard.compiler.conform import conform

    rp2 = conform(rp, prog=prog)
    if rp2.config_after != rp.config_after or rp2.config_before != rp.config_before:
        prog.config_patch = {k: after for k, (_, after) in rp2.config_diff().items()}
    prog.metadata["plan"] = rp.plan_text
    return prog


def sidecar(prog, plan_text: str, base_model: str | None, rp=None) -> dict:
    predicted = {}
    if rp is not None:  # what the compiler predicts the re-traced output IR will show
        predicted = {"groups": dict(sorted(rp.sizes_after.items())), "layers": len(rp.layer_map), "params": rp.costs_after.params,
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
          shard_size: str | int = "5GB", keep_failed: bool = False) -> dict[str, Any]:
    """Grow a checkpoint; the output lands at ``out`` only after it verifies.

    The program is executed into a staging directory next to ``out`` and verified there (fp32
    logits against the original). It is renamed into place when an exact / exact-eps plan passes
    within its tolerance, or when the plan is approx (the drift is reported, not judged). Otherwise
    nothing is left at ``out`` -- with ``keep_failed`` the output is kept at ``out + ".failed"`` --
    and ``passed`` is False. A grown model that fails to load or run counts as a failed
    verification (``verification["error"]`` holds the message). ``verify=False`` lands the output
    unverified.

    Returns {"out" (the landed path, or None), "landed" (bool), "kept" (OUT.failed or None),
    "report" (ExecutionReport), "verification" (dict or None), "exactness", "passed" (None when not
    verified), "program"}. Raises PlanError / UsageError before anything is written."""
    from scaler_wizard.runtime.card import card_info
    from scaler_wizard.runtime.checkpoint import CheckpointError, check_output_path, open_checkpoint
    from scaler_wizard.runtime.execute import execute

    rp = plan if hasattr(plan, "layer_map") else check(plan, model, seed=seed, dtype=dtype)
    try:
        reader = open_checkpoint(rp.model_ref, allow_pickle=allow_bin)
        final = check_output_path(out, reader.path, force)
        failed_dir = final.with_name(final.name + ".failed")
        if keep_failed and verify and failed_dir.exists() and not force:
            raise CheckpointError(f"{failed_dir} already exists (a previous failed output); remove it or pass --force")
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    prog = compile(rp, stored=set(reader.names()) | set(reader.aliases))
    if reader.base_prefix:  # a headless base class stored (LlamaModel): write what it holds, as it names it
        from scaler_wizard.runtime.naming import StoredClassError, to_stored_class

        try:
            traced = {n for t in rp.ir.tensors for n in t.names()}
            to_stored_class(prog, reader, traced=traced,
                            grows_width=rp.sizes_after != {k: g.size for k, g in rp.ir.groups.items()})
        except StoredClassError as e:
            raise UsageError(str(e)) from None
    card = card_info(prog, reader, plan_text=rp.plan_text, base_model=rp.model_ref)
    card["ops"] = [{"name": o.text, "exactness": o.exactness, "status": o.kind, "explain": o.reason} for o in rp.ops]
    # Files other tools read: the names and shapes save_pretrained of the output class writes
    # (per-expert tensors, `embed_out`), computed from the in-memory outputs by transformers' reverse ops.
    from scaler_wizard.runtime.execute import merged_config
    from scaler_wizard.runtime.naming import DiskNamingError, to_disk_names

    try:
        on_disk = to_disk_names(prog, merged_config(reader, prog, rp.dtype))
    except DiskNamingError as e:
        raise UsageError(f"cannot write the on-disk layout transformers saves for this model: {e}") from None
    # Stage next to OUT (same file system: the final rename is atomic); OUT is untouched until then.
    staging = final.parent / f".{final.name}.unverified-{os.getpid()}"
    if verify:
        from scaler_wizard.runtime.checkpoint import clean_stale_temporaries

        try:
            clean_stale_temporaries(final)  # the staging of a killed apply (its pid is gone)
        except OSError:
            pass
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    # Verification needs torch, transformers and the model's modeling code, which the write (byte
    # copies, no torch) does not: they are imported in a thread while the write runs.
    warm = _warm_verifier(rp.config_after.get("model_type") or rp.ir.model_type) if verify else None
    compared = None
    try:
        try:
            # the growth record is written with the shards, before the output is committed: a failure to
            # write it (disk full) leaves no output, never one without it
            record = json.dumps(sidecar(prog, rp.plan_text, rp.model_ref, rp), indent=1) + "\n"
            report = execute(on_disk, reader, staging if verify else final, dtype=rp.dtype, force=force,
                             progress=progress, card=card, shard_size=shard_size, extra_files={SIDECAR: record})
            if warm is not None and warm.is_alive():  # waiting for the imports anyway: compare the copied layers
                compared = _compare_leading_layers(rp, reader, report.out_dir)
        finally:
            if warm is not None:
                warm.join()
    except CheckpointError as e:  # said of OUT, not of the hidden staging directory next to it
        raise UsageError(str(e).replace(str(staging), str(final)) if verify else str(e)) from None
    except BaseException:  # Ctrl-C between the write and verification: no staged output is left behind
        if verify:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
        raise
    outp = Path(report.out_dir)
    try:
        return _verify_and_land(rp, prog, card, report, outp, final, failed_dir, reader.path, force, verify,
                                keep_failed, compared)
    except BaseException:
        if verify and outp.exists() and outp != final:
            import shutil

            shutil.rmtree(outp, ignore_errors=True)  # never a half-landed output
        raise


def _compare_leading_layers(rp, reader, out_dir):
    """The byte comparisons of the output's leading decoder layers with the input's
    (:func:`scaler_wizard.runtime.layerwise.compare_leading_layers`: torch-free), made while the
    verifier's imports finish, for verification's identical-prefix check; None where they cannot be
    made (they are an optimisation: verification compares whatever is missing itself)."""
    from scaler_wizard.compiler.passes.base import layer_prefix_of
    from scaler_wizard.runtime.checkpoint import CheckpointError, open_checkpoint
    from scaler_wizard.runtime.layerwise import compare_leading_layers

    prefix = layer_prefix_of(rp.ir)
    if prefix is None or reader.format != "safetensors":
        return None
    try:
        return compare_leading_layers(reader, open_checkpoint(out_dir), prefix)
    except (CheckpointError, OSError, ValueError, KeyError):
        return None


def _warm_verifier(model_type: str | None):
    """Start a daemon thread importing what verification will import (torch, transformers, accelerate,
    the model type's modeling module, the layer-by-layer runner); returns the thread. Nothing it does
    is needed for correctness: an import that fails here fails again, reported, where it is used.
    Measured on the 1.1B depth plan of benchmarks/apply_speed.py: these imports take 8-10 s (torch
    2.5 s, transformers 2 s, its Llama module 3-4 s: distributed tensors, dynamo, scipy), the write
    4-6 s, and the two overlap (the write is copy_file_range system calls, which release the GIL):
    the imports, not the write, are on the path to verification."""
    import threading

    def work():
        import gc
        import importlib

        # Imports build hundreds of thousands of objects and almost no garbage, yet the growing heap
        # triggers full collections that walk all of it (measured: 6 collections, 1.1 s of the
        # 8-10 s these imports take here, on the path to verification). Collection is paused for
        # them; the objects are then left out of full collections while verification runs
        # (runtime/verify.py: _frozen_heap).
        paused = gc.isenabled()
        gc.disable()
        try:
            import accelerate  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
            from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

            import scaler_wizard.runtime.layerwise  # noqa: F401
            import scaler_wizard.runtime.verify  # noqa: F401

            if model_type:
                mod = str(model_type).replace("-", "_")
                importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
        except Exception:  # noqa: BLE001 - a warm-up only
            pass
        finally:
            if paused:
                gc.enable()

    t = threading.Thread(target=work, name="scaler-wizard-warm-verifier", daemon=True)
    t.start()
    return t


def _rounded_outputs(prog) -> list[str]:
    """Outputs of ``prog`` holding the input's values times a factor that is not a power of two outside
    a fan-out split (:class:`~scaler_wizard.compiler.program.ExactSplit` keeps those exact): such values
    are rounded when stored in bfloat16 / float16 (norm gains times LEMON's eta for a non-multiple
    size, sqrt(k) folded into queries by a head_dim growth, Gemma's sqrt(hidden) embedding scale, a
    fixed-epsilon stream scale, a 1+w norm gain carrying the tied head's shares)."""
    from scaler_wizard.compiler.program import ExactSplit, MulAxis, Scale

    def pow2(f: float) -> bool:
        return f == 0 or abs(math.frexp(f)[0]) == 0.5

    def rounds(node) -> bool:
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n.digest in seen:
                continue
            seen.add(n.digest)
            if isinstance(n, ExactSplit):
                stack.append(n.x)  # its y (the split shares) is re-rounded to sum exactly
                continue
            if isinstance(n, Scale) and not pow2(float(n.factor)) or isinstance(n, MulAxis) and not all(
                    pow2(float(c)) for c in n.vec):
                return True
            stack.extend(n.children())
        return False

    return [name for name, o in prog.outputs.items() if rounds(o.node)]


def _half_precision_hint(outp: Path, rp, prog) -> str | None:
    """What to do when an exact plan's output, stored in bfloat16 / float16, fails verification and
    some outputs hold values times a factor that dtype cannot hold exactly (see
    :func:`_rounded_outputs`; fan-out shares are not among them). None for other outputs or plans."""
    from scaler_wizard.runtime.checkpoint import CheckpointError, open_checkpoint

    try:
        with open_checkpoint(outp) as r:
            dt = r.main_dtype()
    except CheckpointError:
        return None
    if dt not in ("bfloat16", "float16"):
        return None
    names = _rounded_outputs(prog)
    if not names:
        return None
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return (f"the output is stored in {dt}: {', '.join(names[:3])}{more} hold the original values times a factor "
            f"that is not a power of two, which {dt} cannot hold exactly (a norm gain rescaled by a LEMON growth to a "
            f"non-multiple size, a query scale folded into q_proj / q_norm by a head_dim growth, Gemma's "
            f"sqrt(hidden) embedding scale, a fixed-epsilon stream scale), so rounding them changes the function; "
            f"`--dtype float32` writes float32 weights, which verify exactly")


def _verify_and_land(rp, prog, card, report, outp: Path, final: Path, failed_dir: Path, input_path, force: bool,
                     verify: bool, keep_failed: bool, compared=None) -> dict[str, Any]:
    import shutil

    from scaler_wizard.runtime.card import render_card

    result: dict[str, Any] = {"out": str(outp), "landed": True, "kept": None, "report": report, "verification": None,
                              "exactness": rp.exactness, "passed": None, "program": prog}
    if not verify:
        return result
    try:
        rep = verify_dirs(outp, rp.model_ref, exactness=rp.exactness, symmetry=False, byte_comparisons=compared)
    except Exception as e:  # noqa: BLE001 - a grown model that does not load or run failed verification
        msg = " ".join(str(e).split()) or type(e).__name__
        tol = tolerance_for(rp.exactness, None)
        rep = {"passed": False, "error": f"{type(e).__name__}: {msg[:2000]}", "exactness": rp.exactness,
               "judged": tol is not None, "tolerance": tol, "max_abs": float("nan"), "max_rel": float("nan"),
               "mean_kl": float("nan"), "checks": []}
    if not rep.get("passed") and rep.get("judged") and not rep.get("error"):
        hint = _half_precision_hint(outp, rp, prog)
        if hint:
            rep["hint"] = hint
    result["verification"] = rep
    result["passed"] = bool(rep["passed"])
    card["verification"] = {k: v for k, v in rep.items() if k != "ir_check"}
    _write_atomic(outp / "README.md", render_card(card))
    if result["passed"]:
        _land(outp, final, input_path, force)
        result["out"] = str(final)
        result["report"] = dataclasses.replace(report, out_dir=str(final))
        return result
    result["landed"] = False
    result["out"] = None
    if keep_failed:
        if failed_dir.exists():
            shutil.rmtree(failed_dir)
        os.replace(outp, failed_dir)
        result["kept"] = str(failed_dir)
    else:
        shutil.rmtree(outp, ignore_errors=True)
    result["report"] = dataclasses.replace(report, out_dir=result["kept"] or "(removed: verification failed)")
    return result


def _land(staged: Path, final: Path, input_path, force: bool) -> None:
    """Rename a verified output into place (replacing an existing OUT only with ``force``)."""
    import shutil
    import tempfile

    from scaler_wizard.runtime.checkpoint import CheckpointError, check_output_path

    try:
        check_output_path(final, input_path, force)  # re-checked: another process may have made OUT meanwhile
    except CheckpointError as e:
        shutil.rmtree(staged, ignore_errors=True)
        raise UsageError(str(e)) from None
    from scaler_wizard.runtime.io.writer import refuse_if_interrupted

    refuse_if_interrupted()  # a Ctrl-C that a callback swallowed still stops the landing
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / "old")
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)


def failed_checks(ver: dict) -> list[str]:
    """What failed in a verification dict, one line each (the load/run error, or each failing check)."""
    if ver.get("error"):
        return [f"the grown model could not be loaded or run: {ver['error']}"]
    out = []
    for c in ver.get("checks") or []:
        if isinstance(c, dict) and not c.get("passed", True):
            out.append(f"{c.get('name')}: max rel {c.get('max_rel', float('nan')):.3e} > tolerance "
                       f"{c.get('tol', float('nan')):.3e} (max|d| {c.get('max_abs', float('nan')):.3e})")
    return out or ["the grown model does not match the original within tolerance"]


def tolerance_for(exactness: str | None, tolerance: float | None) -> float | None:
    if tolerance is not None:
        return tolerance
    from scaler_wizard.runtime.verify import DEFAULT_RTOL

    return {"exact": DEFAULT_RTOL, "exact-eps": EPS_RTOL}.get(exactness or "exact")


def verify_dirs(out, against, *, texts=None, tolerance: float | None = None, exactness: str | None = None,
                symmetry: bool = True, byte_comparisons=None) -> dict[str, Any]:
    """Compare OUT with the original; judge by the plan's exactness class (from the sidecar).
    ``byte_comparisons``: file comparisons made before (see :func:`_compare_leading_layers`)."""
    from scaler_wizard.runtime.verify import compare_models, idle_threads, symmetry_check, torch_threads

    side = {}
    p = Path(out) / SIDECAR
    if p.is_file():
        try:
            side = json.loads(p.read_text())
            if not isinstance(side, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # could not run: exit 2, naming the broken file
            raise UsageError(f"{p}: the growth record is unreadable or corrupt ({e}); it says which plan made "
                             "OUT and how exactly to judge it: restore it or re-run apply") from None
    exactness = exactness or side.get("exactness") or "exact"
    tol = tolerance_for(exactness, tolerance)
    cast_note = None
    cast = _narrowing_cast(out, against) if tol is not None and tolerance is None else None
    if cast is not None:
        tol, cast_note = _cast_tolerance(against, cast, tol, texts)
    with torch_threads(idle_threads()):  # the cores other work leaves free (see idle_threads)
        rep = compare_models(str(out), str(against), texts=texts, rtol=tol if tol is not None else 1e-5,
                             byte_comparisons=byte_comparisons)
    judged = tol is not None
    d = rep.to_dict()
    if cast_note:
        d.setdefault("notes", []).append(cast_note)
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


def _narrowing_cast(out, against) -> str | None:
    """``bfloat16``/``float16`` when OUT's weights are stored in that dtype while the original's are
    wider (float32 files, or a GGUF dequantised to float32); else None. Headers only."""
    from scaler_wizard.runtime.checkpoint import CheckpointError, open_checkpoint
    from scaler_wizard.runtime.verify import resolve_model_path

    try:
        with open_checkpoint(out) as r:
            out_dt = r.main_dtype()
        if out_dt not in ("bfloat16", "float16"):
            return None
        src = resolve_model_path(against)
        if src.suffix == ".gguf":
            return out_dt
        with open_checkpoint(src) as r:
            return out_dt if r.main_dtype() != out_dt else None
    except CheckpointError:
        return None


def _cast_tolerance(against, cast: str, tol: float, texts) -> tuple[float, str]:
    """A requested cast is judged by what the cast allows: the original cast to ``cast`` the same
    way is compared with the original (same inputs), and the grown model may drift up to twice that
    (at least ``tol``). Returns (tolerance, a note saying so)."""
    import copy

    import torch

    from scaler_wizard.runtime.verify import compare_models, load_model

    original = load_model(str(against))
    cast_original = copy.deepcopy(original).to(getattr(torch, cast))  # load_model brings it back to float32 for the comparison
    ref = compare_models(cast_original, original, texts=texts, rtol=1.0)
    drift = max((c.max_rel for c in ref.checks), default=0.0)
    allowed = max(tol, 2.0 * drift)
    note = (f"output dtype {cast}: judged by what the cast allows: the original cast to {cast} drifts "
            f"rel={drift:.3e} from itself, so the tolerance is 2x that, {allowed:.3e} (not {tol:g})")
    return allowed, note


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
    """Re-trace OUT's config and compare group sizes with the config the compiler wrote.

    Only sizes are compared (groups, depth, parameter count), which the size-dependent constants of
    discovery do not touch: OUT is traced without that question (2-3 exports fewer per grown
    structure; the partial IR is not cached, so a later `check OUT` traces it in full)."""
    try:
        from scaler_wizard.ir import model_ir_for

        ir = model_ir_for(str(out), size_constants=False)
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
    stages = ()
    if plan:  # the plan's `at step` growth stages, resolved against model_dir
        from scaler_wizard.compiler.stages import stages_for_run

        recipe.validate()
        stages = stages_for_run(plan, str(model_dir), steps=recipe.steps, seq_len=recipe.max_seq_len)
    return _train(model_dir, run_dir, recipe, resume=resume, progress=progress, stages=stages)


def evaluate(models: list[str], tasks: list[str], **kw):
    """lm-eval over several models, as `scaler-wizard eval` (keyword arguments as in
    :func:`scaler_wizard.runtime.evaluate.evaluate`)."""
    from scaler_wizard.runtime.evaluate import evaluate as _evaluate

    return _evaluate(models, tasks, **kw)
