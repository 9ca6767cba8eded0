"""Training data: files or hub datasets through `datasets`, tokenised with the model's tokenizer,
packed into fixed-length blocks, split into train and held-out parts.

Batches are a pure function of (seed, step, micro-step, rank, sequence length): the token stream
is viewed as non-overlapping blocks of the current length, each epoch visits them in a seeded
permutation, and global sample ``g`` of the run is block ``perm_epoch[g % n]``. A resumed run
therefore sees exactly the batches the uninterrupted run would have seen, on any number of
processes, without saving a data-loader state. Streaming datasets (``streaming = true``) are read
sequentially instead and fast-forwarded on resume.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from scaler_wizard.diagnostics import UsageError

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet", ".csv": "csv"}


# --------------------------------------------------------------------------- sources
@dataclass
class Source:
    kind: str  # "text" | "json" | "parquet" | "csv" | "hub"
    files: list[str]  # local files (empty for hub)
    name: str | None = None  # hub id


def resolve_sources(specs: list[str]) -> list[Source]:
    """Local files, directories and globs grouped by builder; anything else is a hub id."""
    by_kind: dict[str, list[str]] = {}
    hub: list[Source] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _BUILDERS)
            if not files:
                raise UsageError(f"data directory {spec} holds no .txt/.jsonl/.json/.parquet/.csv files")
        elif any(c in spec for c in "*?["):
            files = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not files:
                raise UsageError(f"data pattern {spec} matches no files")
        elif p.is_file():
            files = [str(p)]
        elif p.suffix.lower() in _BUILDERS or spec.startswith((".", "/", "~")) or os.sep + os.sep in spec:
            raise UsageError(f"data file {spec} does not exist")
        else:
            hub.append(Source("hub", [], spec))
            continue
        for f in files:
            suffix = Path(f).suffix.lower()
            if suffix not in _BUILDERS:
                raise UsageError(f"data file {f}: unknown format `{suffix}` (use .txt, .jsonl, .json, .parquet or .csv)")
            if _BUILDERS[suffix] == "text":
                check_text_file(f)
            by_kind.setdefault(_BUILDERS[suffix], []).append(f)
    return [Source(k, v) for k, v in by_kind.items()] + hub


def _unreadable_data(e: BaseException) -> str | None:
    """What is wrong with a local data file, from the exception datasets raised while reading it
    (its cause chain: undecodable bytes, malformed JSON/CSV/parquet); None for anything else."""
    seen = 0
    while e is not None and seen < 8:
        name = type(e).__name__
        if isinstance(e, UnicodeDecodeError):
            return f"not UTF-8 text (byte {e.start}: {e.reason}); is it a binary file?"
        if isinstance(e, ValueError) and "JSON" in name or name in ("ArrowInvalid", "ParserError", "JSONDecodeError",
                                                                  "ArrowTypeError", "ParquetException"):
            return f"{name}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def check_text_file(path: str, probe_bytes: int = 1 << 20) -> None:
    """A .txt data file must be UTF-8 text: its first ``probe_bytes`` are decoded (a NUL byte or an
    undecodable sequence is a UsageError naming the file and the byte offset)."""
    import codecs

    try:
        with open(path, "rb") as f:
            head = f.read(probe_bytes)
    except OSError as e:
        raise UsageError(f"data file {path}: cannot read: {e.strerror or e}") from None
    nul = head.find(b"\0")
    if nul >= 0:
        raise UsageError(f"data file {path}: not text (a NUL byte at offset {nul}); is it a binary file?")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                         "is it a binary file?") from None


def _load(src: Source, *, text_field: str, config: str | None, split: str, streaming: bool):
    import datasets

    datasets.disable_progress_bars()
    try:
        if src.kind == "hub":
            ds = datasets.load_dataset(src.name, config, split=split, streaming=streaming)
        elif src.kind == "text":
            # one row per file: documents stay whole and get one EOS between them
            ds = datasets.load_dataset("text", data_files=src.files, split="train", sample_by="document",
                                       streaming=streaming)
        else:
            ds = datasets.load_dataset(src.kind, data_files=src.files, split="train", streaming=streaming)
    except FileNotFoundError as e:
        raise UsageError(f"data source {src.name or src.files[0]}: {e}") from None
    except Exception as e:  # datasets raises many types for unreachable/unknown hub ids
        if src.kind == "hub":
            raise UsageError(f"cannot load hub dataset `{src.name}`: {type(e).__name__}: {e}") from None
        why = _unreadable_data(e)
        if why is None:
            raise
        raise UsageError(f"data file(s) {', '.join(src.files[:3])}: cannot be read as {src.kind}: {why}") from None
    cols = ds.column_names if not streaming else (ds.column_names or [text_field])
    if text_field not in (cols or []):
        raise UsageError(
            f"data source {src.name or src.files[0]}: no `{text_field}` column (columns: {', '.join(cols or [])}); "
            "choose one with --text-field"
        )
    return ds


def _tokenize_fn(tokenizer, text_field: str) -> Callable[[dict], dict]:
    eos = tokenizer.eos_token_id

    def fn(batch):
        enc = tokenizer(batch[text_field], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [list(e) + ([eos] if eos is not None else []) for e in enc]}

    return fn


def tokenize_to_array(specs: list[str], tokenizer, *, text_field="text", config=None, split="train") -> np.ndarray:
    """All sources concatenated into one flat int32 array of token ids."""
    import transformers

    parts: list[np.ndarray] = []
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length" is fine here
    try:
        for src in resolve_sources(specs):
            ds = _load(src, text_field=text_field, config=config, split=split, streaming=False)
            ds = ds.map(_tokenize_fn(tokenizer, text_field), batched=True, batch_size=64,
                        remove_columns=ds.column_names, keep_in_memory=True)
            for ids in ds["ids"]:
                parts.append(np.asarray(ids, dtype=np.int32))
    finally:
        transformers.logging.set_verbosity(verbosity)
    if not parts:
        raise UsageError(f"data {', '.join(specs)}: no text found")
    return np.concatenate(parts)


# --------------------------------------------------------------------------- batches
class PackedBatches:
    """Deterministic batches of packed blocks from an in-memory token array."""

    def __init__(self, tokens: np.ndarray, *, batch_size: int, grad_accum: int, world: int, rank: int, seed: int):
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.batch_size, self.grad_accum, self.world, self.rank, self.seed = batch_size, grad_accum, world, rank, seed
        self._perm: dict[tuple[int, int], torch.Tensor] = {}

    def n_blocks(self, seq_len: int) -> int:
        return len(self.tokens) // seq_len

    def _perm_for(self, seq_len: int, epoch: int) -> torch.Tensor:
        key = (seq_len, epoch)
        if key not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + seq_len * 7919 + epoch)
            self._perm = {k: v for k, v in self._perm.items() if k[0] == seq_len and k[1] >= epoch - 1}
            self._perm[key] = torch.randperm(self.n_blocks(seq_len), generator=g)
        return self._perm[key]

    def batch(self, step: int, micro: int, seq_len: int) -> torch.Tensor:
        """The [batch_size, seq_len] block ids of this rank at (1-based) ``step``, micro-step ``micro``."""
        n = self.n_blocks(seq_len)
        if n < 1:
            raise UsageError(f"training data has {len(self.tokens)} tokens, fewer than one block of {seq_len}")
        first = (((step - 1) * self.grad_accum + micro) * self.world + self.rank) * self.batch_size
        rows = []
        for g in range(first, first + self.batch_size):
            idx = int(self._perm_for(seq_len, g // n)[g % n])
            rows.append(self.tokens[idx * seq_len:(idx + 1) * seq_len])
        return torch.stack(rows)

    def fast_forward(self, step: int, seq_len_at: Callable[[int], int]) -> None:
        pass  # stateless


class StreamBatches:
    """Sequential packed batches from a token iterator (streaming datasets). Every rank reads the
    stream and keeps its own slice of each global batch; resume replays the consumption."""

    def __init__(self, blocks: Iterator[int], *, batch_size: int, grad_accum: int, world: int, rank: int):
        self.it = blocks
        self.batch_size, self.grad_accum, self.world, self.rank = batch_size, grad_accum, world, rank

    def _take(self, n: int) -> torch.Tensor:
        out = np.fromiter(self.it, dtype=np.int64, count=n)  # raises ValueError when exhausted
        return torch.from_numpy(out)

    def batch(self, step: int, micro: int, seq_len: int) -> torch.Tensor:
        per = self.batch_size * seq_len
        try:
            flat = self._take(per * self.world)
        except ValueError:
            raise UsageError("the streamed dataset ran out of tokens before the last step") from None
        return flat[self.rank * per:(self.rank + 1) * per].view(self.batch_size, seq_len)

    def fast_forward(self, step: int, seq_len_at: Callable[[int], int]) -> None:
        for s in range(1, step + 1):
            for m in range(self.grad_accum):
                self.batch(s, m, seq_len_at(s))


def _stream_tokens(specs, tokenizer, text_field, config, split) -> Iterator[int]:
    fn = _tokenize_fn(tokenizer, text_field)
    for src in resolve_sources(specs):
        ds = _load(src, text_field=text_field, config=config, split=split, streaming=True)
        for row in ds:
            for t in fn({text_field: [row[text_field]]})["ids"][0]:
                yield t


@dataclass
class TrainData:
    batches: PackedBatches | StreamBatches
    eval_tokens: np.ndarray
    train_tokens: int  # -1 when streaming (unknown)


def prepare_data(recipe, tokenizer, *, world: int = 1, rank: int = 0) -> TrainData:
    """Tokenise and split the recipe's data. Held-out tokens come from ``eval_data`` when given,
    else from the last ``eval_fraction`` of the corpus (streaming: its first blocks)."""
    if not recipe.data:
        raise UsageError("no training data: pass --data FILE... or set `data` in the recipe")
    kw = dict(batch_size=recipe.batch_size, grad_accum=recipe.grad_accum, world=world, rank=rank)
    need_eval = recipe.eval_blocks * recipe.max_seq_len
    if recipe.streaming:
        it = _stream_tokens(recipe.data, tokenizer, recipe.text_field, recipe.data_config, recipe.data_split)
        if recipe.eval_data:
            eval_tokens = tokenize_to_array(recipe.eval_data, tokenizer, text_field=recipe.text_field)
        else:
            eval_tokens = np.fromiter(it, dtype=np.int32, count=need_eval)  # consumed, never trained on
        return TrainData(StreamBatches(it, **kw), eval_tokens, -1)
    tokens = tokenize_to_array(recipe.data, tokenizer, text_field=recipe.text_field,
                               config=recipe.data_config, split=recipe.data_split)
    if recipe.eval_data:
        eval_tokens = tokenize_to_array(recipe.eval_data, tokenizer, text_field=recipe.text_field)
    elif recipe.eval_fraction > 0:
        n_eval = min(int(len(tokens) * recipe.eval_fraction), need_eval)
        n_eval = max(n_eval, min(recipe.max_seq_len, len(tokens) // 2))
        tokens, eval_tokens = tokens[:-n_eval], tokens[-n_eval:]
    else:
        eval_tokens = tokens[:0]
    return TrainData(PackedBatches(tokens, seed=recipe.seed, **kw), eval_tokens, len(tokens))


def eval_blocks(eval_tokens: np.ndarray, seq_len: int, max_blocks: int) -> torch.Tensor:
    """Held-out tokens as at most ``max_blocks`` blocks of ``seq_len`` (shorter if data is short)."""
    t = torch.from_numpy(np.ascontiguousarray(eval_tokens, dtype=np.int64))
    seq_len = min(seq_len, len(t))
    if seq_len < 2:
        return t.new_zeros((0, 2))
    n = min(len(t) // seq_len, max_blocks)
    return t[: n * seq_len].view(n, seq_len)
