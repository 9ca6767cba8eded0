"""The continuation-training recipe: every knob of ``scaler-wizard train`` in one dataclass.

A recipe comes from (lowest to highest precedence) the defaults below, a ``train { ... }`` block
of a plan (or the TOML/JSON file it references), and the command-line flags. Validation names the
offending key so a typo in a plan reads ``train recipe: unknown key `lrr` (did you mean `lr`?)``.
No torch import here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaler_wizard.diagnostics import UsageError, suggest


class RecipeError(UsageError):
    """A bad recipe value; the message names the key."""


@dataclass
class TrainRecipe:
    # data
    data: list[str] = field(default_factory=list)  # files, globs or hub dataset ids
    data_config: str | None = None  # hub dataset config name
    data_split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    eval_data: list[str] = field(default_factory=list)  # explicit held-out files (else a split)
    eval_fraction: float = 0.05
    eval_blocks: int = 32  # at most this many held-out blocks per eval
    data_offset: int = 0  # optimizer steps of data to skip: step s reads the batches of step s + data_offset
    # schedule
    steps: int = 100
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    seq_len: int = 512
    curriculum: list[tuple[int, int]] = field(default_factory=list)  # [(seq_len, until_step)]
    # optimiser
    lr: float = 3e-4
    new_lr: float | None = None  # learning rate of tensors the growth record marks "new"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    freeze_original: bool = False
    # runtime
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 0  # 0: keep all
    # capability-retention breaker
    breaker: bool = True
    breaker_threshold: float = 0.25  # trip when eval ppl > baseline * (1 + threshold) ...
    breaker_patience: int = 2  # ... for this many consecutive evals
    baseline_model: str | None = None  # also measure the original (un-grown) model

    # ------------------------------------------------------------------ construction
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: dict[str, Any], where: str = "train recipe") -> "TrainRecipe":
        r = cls()
        r.update(options, where)
        return r

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainRecipe":
        return cls().merged(cls.file_options(path), where=str(path))

    def merged(self, options: dict[str, Any], where: str) -> "TrainRecipe":
        """This recipe with ``options`` (as :meth:`file_options` returns: data paths already made
        relative to their file) set over it; validated."""
        return self.update(options, where)

    @classmethod
    def file_options(cls, path: str | Path) -> dict[str, Any]:
        """The ``key = value`` table of a TOML/JSON recipe file, data paths resolved against the
        file's directory. Raises RecipeError."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise RecipeError(f"cannot read training recipe {p}: {e.strerror or e}") from None
        if p.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecipeError(f"{p}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        else:
            import tomllib

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise RecipeError(f"{p}: invalid TOML: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("train"), dict) and len(data) == 1:
            data = data["train"]  # accept a [train] table too
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: a training recipe must be a table of key = value")
        probe = cls.from_options(data, where=str(p))._relative_to(p.parent)  # validates, resolves paths
        return {k: getattr(probe, k.replace("-", "_")) for k in data}

    def _relative_to(self, base: Path) -> "TrainRecipe":
        """Data paths written in a recipe or plan file are relative to that file."""
        for key in ("data", "eval_data"):
            setattr(self, key, [str(base / d) if not Path(d).is_absolute() and (base / d).exists() else d
                                for d in getattr(self, key)])
        if self.baseline_model and not Path(self.baseline_model).is_absolute() and (base / self.baseline_model).exists():
            self.baseline_model = str(base / self.baseline_model)
        return self

    def update(self, options: dict[str, Any], where: str = "train recipe") -> "TrainRecipe":
        known = self.keys()
        for raw_key, value in options.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                hint = suggest(key, known)
                msg = f"{where}: unknown key `{raw_key}`"
                raise RecipeError(msg + (f" (did you mean `{hint}`?)" if hint else ""))
            setattr(self, key, _coerce(key, value, where))
        self.validate(where)
        return self

    def override(self, **flags: Any) -> "TrainRecipe":
        """Apply command-line values (None means "not given")."""
        given = {k: v for k, v in flags.items() if v is not None}
        if given:
            self.update(given, where="command line")
        return self

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "train recipe") -> None:
        def bad(key: str, why: str):
            raise RecipeError(f"{where}: `{key}` {why}")

        for key in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "breaker_patience"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "save_every", "keep_checkpoints", "warmup_steps", "data_offset"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("lr", "new_lr"):
            v = getattr(self, key)
            if v is not None and (not math.isfinite(v) or v < 0):
                bad(key, f"must be a finite number >= 0, got {v}")
        if not 0.0 <= self.eval_fraction < 1.0:
            bad("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.eval_blocks < 1:
            bad("eval_blocks", f"must be >= 1, got {self.eval_blocks}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            bad("precision", f"must be one of auto, fp32, bf16, fp16; got `{self.precision}`")
        if self.breaker_threshold < 0:
            bad("breaker_threshold", f"must be >= 0, got {self.breaker_threshold}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            bad("seed", f"must be an integer from 0 to 2**63-1, got {self.seed}")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", f"must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.data_offset and self.streaming:
            bad("data_offset", "is not supported with `streaming = true` (a stream cannot be entered at a step)")
        last = 0
        for seq, until in self.curriculum:
            if seq < 1:
                bad("curriculum", f"has a sequence length {seq} < 1")
            if until <= last:
                bad("curriculum", "stage end steps must increase")
            last = until

    # ------------------------------------------------------------------ schedule helpers
    @property
    def max_seq_len(self) -> int:
        return max([self.seq_len] + [s for s, _ in self.curriculum])

    def seq_len_at(self, step: int) -> int:
        """Sequence length of (1-based) optimizer step ``step``: curriculum stages first."""
        for seq, until in self.curriculum:
            if step <= until:
                return seq
        return self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["curriculum"] = [list(x) for x in self.curriculum]
        return d


def parse_curriculum(text: str | list, where: str = "curriculum") -> list[tuple[int, int]]:
    """``"128:200,256:400"`` -> [(128, 200), (256, 400)]: length 128 up to step 200, then 256
    up to step 400, then ``seq_len``. A list of pairs is accepted as is."""
    out: list[tuple[int, int]] = []
    items = text if isinstance(text, list) else [t for t in str(text).split(",") if t.strip()]
    for item in items:
        try:
            if isinstance(item, (list, tuple)):
                seq, until = item
            else:
                seq, until = item.split(":")
            out.append((int(seq), int(until)))
        except (ValueError, TypeError):
            raise RecipeError(
                f"{where}: `curriculum` stage `{item}` is not SEQ_LEN:UNTIL_STEP (e.g. 128:200,256:400)"
            ) from None
    return out


_LISTS = {"data", "eval_data"}


def _coerce(key: str, value: Any, where: str) -> Any:
    """Convert plan/CLI/TOML values (strings, numbers, AST leaves) to the field's type."""
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        value = value.value  # grammar AST leaf (Int, Number, Str, Bool)
    elif hasattr(value, "name") and not isinstance(value, (str, int, float, bool)):
        value = value.name  # grammar Ident
    if key == "curriculum":
        return parse_curriculum(value, where)
    if key in _LISTS:
        if isinstance(value, str):
            return [v for v in (s.strip() for s in value.split(",")) if v]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise RecipeError(f"{where}: `{key}` must be a string or a list of strings")
    default = TrainRecipe.__dataclass_fields__[key]
    kind = _field_kind(key)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError
        if value is None:
            if "None" in str(default.type):
                return None
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (int, float, bool)):
            raise ValueError
        return str(value)
    except (ValueError, TypeError):
        name = kind.__name__ if kind in (bool, int, float) else "string"
        raise RecipeError(f"{where}: `{key}` must be a {name}, got {value!r}") from None


def _field_kind(key: str) -> type:
    t = str(TrainRecipe.__dataclass_fields__[key].type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(name):
            return kind
    return str


def recipe_from_plan(path: str | Path) -> TrainRecipe:
    """The recipe of a plan file's ``train`` statement (inline block or referenced file).

    A plan without a ``train`` statement yields the defaults. An unreadable plan raises
    UsageError, a malformed one PlanError (the CLI renders its diagnostics, exit 1).
    """
    from scaler_wizard.grammar import parse_file
    from scaler_wizard.grammar.ast import TrainStmt

    p = Path(path)
    plan = parse_file(p)
    recipe = TrainRecipe()
    for stmt in plan.statements:
        if isinstance(stmt, TrainStmt):
            if stmt.ref is not None:
                ref = Path(stmt.ref.value)
                if not ref.is_absolute():
                    ref = p.parent / ref
                recipe = TrainRecipe.from_file(ref)
            else:
                opts = {o.key.name: o.value for o in stmt.options}
                recipe = TrainRecipe.from_options(opts, where=f"{p}: train")._relative_to(p.parent)
    return recipe
