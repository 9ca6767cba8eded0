"""Model card (README.md) for a grown checkpoint.

:func:`render_card` takes a plain dict (so the CLI, tests and the executor can all build one)::

    {
      "title": "...",                      # optional
      "base_model": "HuggingFaceTB/SmolLM2-135M",   # optional
      "plan": "widen ffn x2 net2net\\n...",  # the plan text
      "config_before": {...}, "config_after": {...},
      "params_before": 134515008, "params_after": 201000000,
      "ops": [{"name": "...", "exactness": "exact", "status": "grown", "explain": "..."}, ...],
      "verification": {...},               # optional: VerifyReport.to_dict() or any flat dict
    }

:func:`card_info` fills most of it from a TensorProgram and a CheckpointReader.
"""

from __future__ import annotations

import json
import math
from typing import Any

_SKIP_KEYS = {"transformers_version", "_name_or_path"}


def _fmt(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    s = s.replace("|", "\\|")
    return s if len(s) <= 80 else s[:77] + "..."


def _params(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit} ({n:,})"
    return f"{n:,}"


def config_diff(before: dict, after: dict) -> list[tuple[str, Any, Any]]:
    rows = []
    for k in sorted(set(before) | set(after)):
        if k in _SKIP_KEYS:
            continue
        a, b = before.get(k, "(absent)"), after.get(k, "(absent)")
        if a != b:
            rows.append((k, a, b))
    return rows


def render_card(info: dict) -> str:
    title = info.get("title") or "Grown model (Scaler Wizard)"
    lines = ["---", "library_name: transformers", "tags:", "- scaler-wizard", "- model-growth"]
    if info.get("base_model"):
        lines.append(f"base_model: {info['base_model']}")
    lines += ["---", "", f"# {title}", ""]
    lines.append("This checkpoint was produced by Scaler Wizard from a trained model by a "
                 "function-preserving (or declared approximate) growth plan.")
    lines.append("")
    if info.get("plan"):
        lines += ["## Plan", "", "```", info["plan"].rstrip("\n"), "```", ""]
    pb, pa = info.get("params_before"), info.get("params_after")
    if pb is not None or pa is not None:
        lines += ["## Parameters", "", "| | parameters |", "|---|---|",
                  f"| before | {_params(pb)} |", f"| after | {_params(pa)} |"]
        if pb and pa:
            lines.append(f"| ratio | x{pa / pb:.3f} |")
        lines.append("")
    if "config_before" in info and "config_after" in info:
        rows = config_diff(info["config_before"], info["config_after"])
        lines += ["## Configuration changes", ""]
        if rows:
            lines += ["| key | before | after |", "|---|---|---|"]
            lines += [f"| `{k}` | {_fmt(a)} | {_fmt(b)} |" for k, a, b in rows]
        else:
            lines.append("No configuration key changed.")
        lines.append("")
    ops = info.get("ops") or []
    if ops:
        counts: dict[str, int] = {}
        for o in ops:
            counts[o.get("exactness", "?")] = counts.get(o.get("exactness", "?"), 0) + 1
        worst = "approx" if "approx" in counts else "exact-eps" if "exact-eps" in counts else "exact"
        lines += ["## Exactness", "",
                  f"Overall: **{worst}** (" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + " tensors).",
                  "`exact`: same function up to float re-association; `exact-eps`: exact except the "
                  "normalisation epsilon; `approx`: changes the function on purpose.", ""]
        changed = [o for o in ops if o.get("status", "new") != "original"]
        if changed:
            lines += ["| tensor | status | exactness | how |", "|---|---|---|---|"]
            for o in changed[:200]:
                lines.append(f"| `{o.get('name', '?')}` | {o.get('status', '?')} | {o.get('exactness', '?')} | "
                             f"{_fmt(o.get('explain', ''))} |")
            if len(changed) > 200:
                lines.append(f"| ... | | | {len(changed) - 200} more |")
            lines.append("")
    ver = info.get("verification")
    if ver:
        lines += ["## Verification", ""]
        flat = {k: v for k, v in ver.items() if not isinstance(v, (list, dict))}
        lines += ["| figure | value |", "|---|---|"]
        for k, v in flat.items():
            lines.append(f"| {k} | {_fmt(v if not isinstance(v, float) else float(f'{v:.6g}'))} |")
        for c in ver.get("checks", []) if isinstance(ver.get("checks"), list) else []:
            if isinstance(c, dict):
                lines.append(f"| {c.get('name')} | max abs {c.get('max_abs', float('nan')):.3g}, "
                             f"max rel {c.get('max_rel', float('nan')):.3g}, KL {c.get('mean_kl', float('nan')):.3g}, "
                             f"{'pass' if c.get('passed') else 'FAIL'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def card_info(program, reader, *, plan_text: str | None = None, verification: dict | None = None,
              base_model: str | None = None) -> dict:
    """Build the card dict from a TensorProgram and the input CheckpointReader."""
    before = sum(math.prod(reader.shape(n)) for n in reader.names())
    after = sum(o.node.numel for o in program.outputs.values())
    cfg_after = dict(reader.config)
    cfg_after.update(program.config_patch)
    return {
        "base_model": base_model,
        "plan": plan_text,
        "config_before": dict(reader.config),
        "config_after": cfg_after,
        "params_before": before,
        "params_after": after,
        "ops": [{"name": o.name, "exactness": o.exactness, "status": o.status, "explain": o.explain}
                for o in program.outputs.values()],
        "verification": verification,
    }
