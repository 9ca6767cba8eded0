"""Experiment trackers for ``scaler-wizard train --report-to``, through accelerate's trackers
(``Accelerator(log_with=...)``, ``init_trackers``, ``log``, ``end_training``).

What is logged: every record of ``metrics.jsonl`` at its step (loss, eval loss, perplexity, learning
rate, tokens/s, the distillation terms, ...; non-numeric fields are left out) and each event as
``event/<name> = 1`` (``baseline``, ``breaker_trip``, growth events); the recipe as hyperparameters.
Everything is offline: TensorBoard writes ``RUN_DIR/tb``, W&B runs in offline mode under
``RUN_DIR/wandb``, MLflow and Aim keep their stores under RUN_DIR. A tracker whose package is not
installed is a UsageError (exit 2) naming the package to install; ``all`` means every one of
tensorboard, wandb, mlflow and aim that is installed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from scaler_wizard.diagnostics import UsageError

PROJECT = "tb"  # TensorBoard's run directory name under RUN_DIR
_KNOWN = ("tensorboard", "wandb", "mlflow", "aim")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_PACKAGE[name]) is not None


def resolve(report_to: str) -> list[str]:
    """Tracker names for a ``--report-to`` value (``none`` -> []). Raises UsageError when a named
    tracker's package is missing."""
    names = [t.strip() for t in report_to.split(",") if t.strip()]
    if names == ["none"] or not names:
        return []
    if "none" in names:
        raise UsageError("--report-to: `none` cannot be combined with other trackers")
    if "all" in names:
        return [n for n in _KNOWN if _installed(n)]
    out = []
    for n in names:
        if n not in _KNOWN:
            raise UsageError(f"--report-to: unknown tracker `{n}` (choose from {', '.join(_KNOWN)}, all, none)")
        if not _installed(n):
            raise UsageError(f"--report-to {n}: the `{_PACKAGE[n]}` package is not installed "
                             f"(pip install {_PACKAGE[n]}), or choose another tracker")
        if n not in out:
            out.append(n)
    return out


def accelerator_kwargs(names: list[str], run_dir: Path) -> dict:
    """Keyword arguments for ``Accelerator(...)`` (empty without trackers)."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": names, "project_config": ProjectConfiguration(project_dir=str(run_dir),
                                                                      logging_dir=str(run_dir))}


def hyperparameters(recipe) -> dict[str, Any]:
    """The recipe flattened to the scalar types every tracker takes (lists as strings, None as "")."""
    out: dict[str, Any] = {}
    for k, v in recipe.to_dict().items():
        if isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif v is None:
            out[k] = ""
        else:
            out[k] = str(v)
    return out


def start(accelerator, names: list[str], recipe, run_dir: Path) -> None:
    if not names:
        return
    init = {"wandb": {"mode": "offline", "dir": str(run_dir)}}
    accelerator.init_trackers(PROJECT, config=hyperparameters(recipe),
                              init_kwargs={k: v for k, v in init.items() if k in names})


def log(accelerator, names: list[str], rec: dict) -> None:
    """One metrics record at its step: finite numbers as scalars, an event as ``event/<name> = 1``."""
    if not names:
        return
    values: dict[str, float] = {}
    for k, v in rec.items():
        if k == "step" or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(v):
            values[k] = float(v)
    if isinstance(rec.get("event"), str):
        values[f"event/{rec['event']}"] = 1.0
    if values:
        accelerator.log(values, step=int(rec["step"]))


def end(accelerator, names: list[str]) -> None:
    if names:
        accelerator.end_training()
