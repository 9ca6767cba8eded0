"""Which tensors of a grown model are new: the sidecar ``scaler_wizard_growth.json`` written by
``scaler-wizard apply`` next to the grown checkpoint::

    {"format": 1, "plan": "<plan text>", "base_model": "<ref>",
     "tensors": {"<param name>": {"status": "new" | "grown" | "original",
                                  "original_region": [[start, stop], ...]}}}

``original_region`` (only for ``grown``) is, per axis, the slice of the new tensor that still holds
the original values; a grown tensor without one (e.g. a down projection rescaled by a
function-preserving widening) has no unchanged slice and trains like a new tensor. Training uses the record to freeze the original parameters (LLaMA Pro style)
or to give new ones their own learning rate. No torch import at module level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from scaler_wizard.diagnostics import UsageError

SIDECAR = "scaler_wizard_growth.json"
STATUSES = ("new", "grown", "original")


@dataclass(frozen=True)
class TensorGrowth:
    status: str
    original_region: tuple[tuple[int, int], ...] | None = None

    def region_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in (self.original_region or ()))


@dataclass
class GrowthRecord:
    tensors: dict[str, TensorGrowth] = field(default_factory=dict)
    plan: str = ""
    base_model: str | None = None
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> "GrowthRecord":
        p = Path(path)
        if p.is_dir():
            p = p / SIDECAR
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise UsageError(f"cannot read growth record {p}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"{p}:{e.lineno}:{e.colno}: growth record is not valid JSON: {e.msg}") from None
        if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("tensors"), dict):
            raise UsageError(f"{p}: not a Scaler Wizard growth record (format 1 with a `tensors` table)")
        tensors: dict[str, TensorGrowth] = {}
        for name, entry in data["tensors"].items():
            status = entry.get("status") if isinstance(entry, dict) else None
            if status not in STATUSES:
                raise UsageError(f"{p}: tensor `{name}`: status must be one of {', '.join(STATUSES)}, got {status!r}")
            region = None
            raw = entry.get("original_region")
            if status == "grown" and raw is not None:  # absent: no slice kept its original values
                try:
                    region = tuple((int(a), int(b)) for a, b in raw)
                except (TypeError, ValueError):
                    raise UsageError(
                        f"{p}: tensor `{name}`: a grown tensor needs `original_region` as [[start, stop], ...] per axis"
                    ) from None
            tensors[name] = TensorGrowth(status, region)
        return cls(tensors, data.get("plan", ""), data.get("base_model"), p)

    @classmethod
    def find(cls, model_dir: str | Path) -> "GrowthRecord | None":
        p = Path(model_dir) / SIDECAR
        return cls.load(p) if p.is_file() else None

    def status(self, name: str) -> str:
        """Status of a parameter; names missing from the record count as original."""
        t = self.tensors.get(name)
        return t.status if t else "original"

    def check_against(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every recorded tensor exists and every region fits inside its tensor."""
        for name, t in self.tensors.items():
            if name not in shapes:
                continue  # tied/buffer names may be absent from named_parameters
            if t.original_region is not None:
                shape = shapes[name]
                if len(t.original_region) != len(shape) or any(
                    not (0 <= a <= b <= n) for (a, b), n in zip(t.original_region, shape)
                ):
                    raise UsageError(
                        f"growth record: region {list(map(list, t.original_region))} of `{name}` "
                        f"does not fit its shape {list(shape)}"
                    )

    def to_json(self) -> dict:
        out = {}
        for name, t in self.tensors.items():
            e: dict = {"status": t.status}
            if t.original_region is not None:
                e["original_region"] = [list(r) for r in t.original_region]
            out[name] = e
        return {"format": 1, "plan": self.plan, "base_model": self.base_model, "tensors": out}

    def save(self, model_dir: str | Path) -> Path:
        p = Path(model_dir) / SIDECAR
        p.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return p
