"""Lazy checkpoint reading and atomic sharded writing.

Reading
-------
:func:`open_checkpoint` returns a :class:`CheckpointReader` for

* a directory with ``model.safetensors`` or ``model.safetensors.index.json`` + shards: headers are
  parsed (and validated against the file size) without reading any tensor data; tensors are read one
  at a time through ``safetensors.safe_open`` (opened per read, so no mapping stays resident);
* a ``.gguf`` file (or a directory holding exactly one): dequantised through transformers, whole
  (GGUF models are small; tensors get the Hugging Face names);
* ``pytorch_model.bin`` (or a sharded ``pytorch_model.bin.index.json``) only with ``allow_pickle=True``.

Tied weights: when ``config.tie_word_embeddings`` holds and the output embedding is absent from the
files, ``reader.tied`` maps the absent name to the stored one and ``get``/``info`` resolve it.

In-memory names: transformers 5 renames some weights between disk and memory and builds others from
several stored tensors (legacy per-expert MoE layouts -> stacked ``experts.gate_up_proj``). The reader
applies transformers' own conversion table: renames become ``reader.aliases``; converters
(``MergeModulelist``, ``Concatenate``, ...) become ``reader.virtual`` tensors whose shape and dtype
come from running the converter on meta tensors (no data read) and whose ``get`` reads just their
source tensors and runs the converter on them.

Writing
-------
:class:`CheckpointWriter` writes sharded safetensors into a temporary directory next to the output and
renames it into place at :meth:`CheckpointWriter.commit`; on any failure (or without a commit) the
temporary directory is removed. It refuses to overwrite without ``force`` and refuses to write into
or around the input directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

# safetensors dtype code -> (torch dtype name, item size in bytes)
ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
ITEMSIZE = {name: size for name, size in ST_DTYPES.values()}

DEFAULT_SHARD_SIZE = 5 * 10**9
MAX_HEADER_BYTES = 100 * 2**20

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)


# ---------------------------------------------------------------------------------------------- errors


class CheckpointError(Exception):
    """Base class of every checkpoint reading/writing problem (message is user-facing)."""


class MissingConfigError(CheckpointError):
    pass


class MissingShardError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


class TensorNotFoundError(CheckpointError, KeyError):
    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedDtypeError(CheckpointError):
    pass


class PickleRefusedError(CheckpointError):
    pass


class NoCheckpointError(CheckpointError):
    pass


class OutputExistsError(CheckpointError):
    pass


class OutputWriteError(CheckpointError):
    """The output could not be created or written (read-only location, permissions, disk full); the
    temporary directory has been removed and nothing was written at OUT."""


class UnsafeOutputError(CheckpointError):
    """The output would be written into, over or around the input."""


# ---------------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name
    file: str  # file the tensor lives in ("" for in-memory sources)
    offsets: tuple[int, int] = (0, 0)  # absolute byte range in the file (safetensors)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE.get(self.dtype, 4)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Raises CorruptCheckpointError (naming the file) for a truncated file, a bad header, offsets past
    the end of the file or sizes that do not match shapes; UnsupportedDtypeError for unknown dtypes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CorruptCheckpointError(
                    f"{path}: corrupt or truncated safetensors header (header says {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise MissingShardError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            code, shape, (a, b) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if code not in ST_DTYPES:
            raise UnsupportedDtypeError(f"{path}: tensor {name!r} has unsupported dtype {code}")
        dt, item = ST_DTYPES[code]
        if not (0 <= a <= b) or b - a != math.prod(shape) * item:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has inconsistent offsets {a}..{b} for shape {shape}")
        if b > data_len:
            raise CorruptCheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + b} but the file has {size} bytes"
            )
        infos[name] = TensorInfo(name, shape, dt, str(path), (data_start + a, data_start + b))
    return infos, meta


@dataclass(frozen=True)
class VirtualTensor:
    """An in-memory (model) tensor that transformers builds at load time from several stored ones.

    ``sources``: (converter source pattern, stored names in transformers' load order) per pattern;
    ``layer_name``: the converter's target key for this group (transformers' ``layer_name``), used
    to expand the converter's target patterns into full names; ``info``: shape/dtype from headers."""

    name: str
    converter: Any  # transformers.core_model_loading.WeightConverter (never mutated; copied per use)
    layer_name: str
    sources: tuple[tuple[str, tuple[str, ...]], ...]
    info: TensorInfo

    @property
    def stored(self) -> list[str]:
        return [n for _, names in self.sources for n in names]


def _run_converter(converter, layer_name: str, sources, load) -> dict[str, Any]:
    """Run a transformers WeightConverter the way ``convert_and_load_state_dict_in_model`` does:
    collect the tensors per source pattern (in load order), then ``converter.convert(layer_name)``
    (which applies the operations in order and expands target patterns to full names).
    ``load(name)`` gives the stored tensor (real, or a meta tensor for shapes)."""
    import copy as _copy

    conv = _copy.deepcopy(converter)  # convert() consumes the collected tensors; keep the table clean
    for pattern, names in sources:
        for n in names:
            conv.add_tensor(layer_name, n, pattern, load(n))
    return conv.convert(layer_name)


class CheckpointReader:
    """Common interface. Subclasses fill ``_infos`` and implement ``_read``."""

    format: str = "?"

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path  # the directory (or the .gguf file)
        self.config = config
        self._infos: dict[str, TensorInfo] = {}
        self.tied: dict[str, str] = {}  # absent name -> stored name
        self.aliases: dict[str, str] = {}  # in-memory (model) name -> stored name, where they differ
        self.virtual: dict[str, VirtualTensor] = {}  # in-memory name -> tensor built from stored ones
        self.unconverted: list = []  # (converter, error) pairs: matched stored names but could not be applied
        self.base_prefix: str | None = None  # headless base class stored (LlamaModel): the head class's prefix
        self.bytes_read = 0
        self.reads = 0

    # -- metadata
    @property
    def model_dir(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def names(self) -> list[str]:
        """Stored tensor names, in file order."""
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos or name in self.tied or name in self.aliases or name in self.virtual

    def _find_base_prefix(self) -> None:
        """A checkpoint of the headless base class (``LlamaModel``, ``BertModel``): its tensors are
        reachable under the head class's in-memory names (``model.`` / ``bert.`` + stored name)."""
        from scaler_wizard.runtime.naming import headless_prefix, missing_prefix

        self.base_prefix = headless_prefix(self.config, self._infos)
        prefix = missing_prefix(self.config, self._infos)
        if prefix:
            for n in self._infos:
                self.aliases.setdefault(f"{prefix}.{n}", n)
            self._find_ties()  # the tie's stored member is reachable now (hub gpt2: wte.weight)

    def _find_aliases(self) -> None:
        """transformers 5 renames some weights between disk and memory (GPT-NeoX stores
        ``embed_out`` for the module ``lm_head``) and merges others (Mixtral's legacy
        ``block_sparse_moe.experts.E.w1/w3`` -> stacked ``mlp.experts.gate_up_proj``). Expose the
        in-memory names, which the IR uses, through transformers' own conversion table, applied as
        its loader does (every renaming in turn, then at most one converter per stored key):
        renames become ``aliases``, converters become lazy ``virtual`` tensors."""
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
            from transformers.core_model_loading import (
                WeightConverter, WeightRenaming, apply_converters, apply_renamings, dot_natural_key,
            )
        except ImportError:  # an older transformers: names on disk are names in memory
            return
        arch = (self.config.get("architectures") or [None])[0]
        transforms = (arch and get_checkpoint_conversion_mapping(arch)) or get_checkpoint_conversion_mapping(
            self.config.get("model_type")
        ) or []
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        # target key -> (converter, {source pattern -> stored names})
        groups: dict[str, tuple[Any, dict[str, list[str]]]] = {}
        # transformers collects a converter's tensors in natural key order (expert 2 before 10)
        for stored in sorted(self._infos, key=dot_natural_key):
            model_name = apply_renamings(stored, renamings)
            target, pattern = apply_converters(model_name, converters) if converters else (model_name, None)
            if pattern is not None and target not in self._infos:
                conv = next(c for c in converters if pattern in c.source_patterns)
                groups.setdefault(target, (conv, {}))[1].setdefault(pattern, []).append(stored)
            elif model_name != stored and model_name not in self._infos:
                self.aliases[model_name] = stored
        for target, (conv, by_pattern) in groups.items():
            self._add_virtual(conv, target, by_pattern)
        # ties were found under stored names; make them reachable under model names too
        for absent, stored in list(self.tied.items()):
            renamed = apply_renamings(absent, renamings)
            if renamed != absent:
                self.tied[renamed] = stored

    def _add_virtual(self, conv, layer_name: str, by_pattern: dict[str, list[str]]) -> None:
        """Shapes/dtypes of a converter's outputs from running it on meta tensors (headers only)."""
        import torch

        # keep the converter's pattern order (Concatenate relies on it), not dict insertion order
        sources = tuple((p, tuple(by_pattern[p])) for p in conv.source_patterns if p in by_pattern)

        def meta(n: str):
            i = self._infos[n]
            return torch.empty(i.shape, dtype=getattr(torch, i.dtype), device="meta")

        try:
            outs = _run_converter(conv, layer_name, sources, meta)
        except Exception as e:  # an op needing the model or a config object (Split, Chunk by config)
            self.unconverted.append((conv, f"{type(e).__name__}: {e}"))
            return
        for name, t in outs.items():
            if name in self._infos:
                continue
            info = TensorInfo(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), "")
            self.virtual[name] = VirtualTensor(name, conv, layer_name, sources, info)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self):
        return len(self._infos)

    def _resolve(self, name: str) -> str:
        if name in self._infos:
            return name
        if name in self.aliases:
            return self.aliases[name]
        if name in self.tied:
            return self._resolve(self.tied[name]) if self.tied[name] not in self._infos else self.tied[name]
        import difflib

        close = difflib.get_close_matches(name, list(self._infos), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TensorNotFoundError(f"tensor {name!r} not found in checkpoint {self.path}{hint}")

    def info(self, name: str) -> TensorInfo:
        if name in self.virtual and name not in self._infos:
            return self.virtual[name].info
        return self._infos[self._resolve(name)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        return self.info(name).dtype

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def main_dtype(self) -> str:
        """The floating dtype holding the most bytes (for new tensors with no input)."""
        by: dict[str, int] = {}
        for i in self._infos.values():
            if i.dtype.startswith("float") or i.dtype == "bfloat16":
                by[i.dtype] = by.get(i.dtype, 0) + i.nbytes
        return max(by, key=by.get) if by else "float32"

    # -- data
    def get(self, name: str):
        """Read one tensor (a fresh CPU tensor in its stored dtype)."""
        if name in self.virtual and name not in self._infos:
            return self._get_virtual(self.virtual[name])
        real = self._resolve(name)
        t = self._read(real)
        self.reads += 1
        self.bytes_read += t.numel() * t.element_size()
        return t

    def _read(self, name: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def byte_range(self, name: str) -> tuple[str, int, int] | None:
        """(file, start, stop): where the stored bytes of ``name`` lie (little-endian, row-major, in
        its stored dtype), for a byte copy; None when the tensor is not a byte range of a file
        (built from several stored tensors, dequantised, unpickled)."""
        return None

    def count_copy(self, nbytes: int) -> None:
        """Account for a tensor copied as bytes (:meth:`byte_range`) in ``reads``/``bytes_read``."""
        self.reads += 1
        self.bytes_read += nbytes

    def _get_virtual(self, vt: VirtualTensor):
        """Read just the sources of ``vt`` (one at a time) and run the converter on them."""
        def load(n: str):
            t = self._read(n)
            self.bytes_read += t.numel() * t.element_size()
            return t

        outs = _run_converter(vt.converter, vt.layer_name, vt.sources, load)
        self.reads += 1
        t = outs[vt.name]
        if tuple(t.shape) != vt.info.shape:  # cannot happen unless transformers' ops change under us
            raise CorruptCheckpointError(
                f"{self.path}: building {vt.name!r} from {len(vt.stored)} stored tensors gave shape "
                f"{tuple(t.shape)}, headers said {vt.info.shape}")
        return t.contiguous()

    def tokenizer_files(self) -> list[Path]:
        d = self.model_dir
        return [d / f for f in TOKENIZER_FILES if (d / f).is_file()]

    def save_tokenizer(self, out_dir: Path) -> list[str]:
        """Copy tokenizer / generation config files into ``out_dir``; returns the names written."""
        done = []
        for p in self.tokenizer_files():
            shutil.copy2(p, out_dir / p.name)
            done.append(p.name)
        return done

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _find_ties(self) -> None:
        """Map absent tied output-embedding names to their stored input embedding."""
        if not self.config.get("tie_word_embeddings", True):
            return
        try:
            pairs = _tied_pairs_from_model(self.config)
        except Exception:  # unknown architecture: fall back on the common names
            pairs = []
            emb = next((n for n in self._infos if n.endswith(("embed_tokens.weight", "wte.weight",
                                                              "word_embeddings.weight", "embed_in.weight"))), None)
            if emb is not None:
                pairs = [("lm_head.weight", emb)]
        have = set(self._infos) | set(self.aliases)
        for absent, stored in pairs:
            if absent not in have and stored in have:
                self.tied[absent] = stored
            elif stored not in have and absent in have:
                self.tied[stored] = absent


def _tied_pairs_from_model(config: dict) -> list[tuple[str, str]]:
    """(output embedding name, input embedding name) from the real model class, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    cfg.pop("transformers_version", None)
    conf = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None:
        return []
    mod_names = {id(m): n for n, m in model.named_modules()}
    out_name = mod_names[id(out_emb)] + ".weight"
    in_name = mod_names[id(in_emb)] + ".weight"
    return [(out_name, in_name)] if out_name != in_name else []


class SafetensorsReader(CheckpointReader):
    format = "safetensors"

    def __init__(self, path: Path, config: dict[str, Any]):
        super().__init__(path, config)
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise MissingShardError(
                    f"{index} lists shard(s) that do not exist: {', '.join(missing)}"
                )
            per_file = {f: read_safetensors_header(path / f)[0] for f in files}
            for name, f in weight_map.items():
                if name not in per_file[f]:
                    raise CorruptCheckpointError(f"{index} maps {name!r} to {f}, but {f} has no such tensor")
            for f in files:  # file order, then header order inside a file
                self._infos.update(per_file[f])
        elif single.is_file():
            self._infos = read_safetensors_header(single)[0]
        else:
            raise NoCheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self._find_ties()
        self._find_aliases()
        self._find_base_prefix()

    def byte_range(self, name: str) -> tuple[str, int, int] | None:
        if name in self.virtual and name not in self._infos:
            return None
        info = self._infos[self._resolve(name)]
        return info.file, info.offsets[0], info.offsets[1]

    def _read(self, name: str):
        from safetensors import safe_open

        info = self._infos[name]
        try:
            with safe_open(info.file, framework="pt", device="cpu") as f:
                t = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt data
            raise CorruptCheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from None
        return t


class InMemoryReader(CheckpointReader):
    """Tensors already in memory (GGUF dequantised, pickle .bin loaded)."""

    def __init__(self, path: Path, config: dict[str, Any], tensors: dict, fmt: str, source: str):
        super().__init__(path, config)
        self.format = fmt
        self._tensors = tensors
        for n, t in tensors.items():
            dt = str(t.dtype).replace("torch.", "")
            if dt not in ITEMSIZE:
                raise UnsupportedDtypeError(f"{source}: tensor {n!r} has unsupported dtype {dt}")
            self._infos[n] = TensorInfo(n, tuple(t.shape), dt, source)
        self._find_ties()
        self._find_aliases()
        self._find_base_prefix()

    def _read(self, name: str):
        return self._tensors[name].clone()


class GGUFCheckpointReader(InMemoryReader):
    def __init__(self, gguf_path: Path):
        from transformers import AutoModelForCausalLM

        self.gguf_path = gguf_path
        try:
            import torch

            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as e:
            raise CheckpointError(f"{gguf_path}: cannot load GGUF file: {e}") from None
        config = model.config.to_dict()
        # The tensors are dequantised here: whatever is written from them is a plain checkpoint,
        # and a leftover quantization_config would make transformers treat it as GGUF-quantised.
        config.pop("quantization_config", None)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            out = model.get_output_embeddings()
            mods = {id(m): n for n, m in model.named_modules()}
            if out is not None:
                sd.pop(mods[id(out)] + ".weight", None)
        del model
        super().__init__(gguf_path, config, sd, "gguf", str(gguf_path))

    @property
    def model_dir(self) -> Path:
        return self.gguf_path.parent

    def tokenizer_files(self) -> list[Path]:
        return []

    def save_tokenizer(self, out_dir: Path) -> list[str]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.gguf_path.parent), gguf_file=self.gguf_path.name)
        tok.save_pretrained(str(out_dir))
        return sorted(p.name for p in out_dir.iterdir() if p.name in TOKENIZER_FILES)


def _load_config(d: Path) -> dict:
    p = d / "config.json"
    if not p.is_file():
        raise MissingConfigError(f"{d}: config.json not found (a Hugging Face model directory needs one)")
    try:
        cfg = json.loads(p.read_text())
    except ValueError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: expected a JSON object")
    return cfg


def _bin_reader(d: Path, config: dict) -> CheckpointReader:
    import torch

    idx = d / "pytorch_model.bin.index.json"
    files = (list(dict.fromkeys(json.loads(idx.read_text())["weight_map"].values()))
             if idx.is_file() else ["pytorch_model.bin"])
    sd = {}
    for f in files:
        p = d / f
        if not p.is_file():
            raise MissingShardError(f"{idx}: lists shard {f}, which does not exist")
        try:
            part = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CorruptCheckpointError(f"{p}: cannot load pickle checkpoint: {e}") from None
        sd.update(part)
    return InMemoryReader(d, config, sd, "bin", str(d))


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> CheckpointReader:
    """Open a model directory (safetensors, or .bin with ``allow_pickle``) or a ``.gguf`` file.

    Short names known to the IR front end (``SmolLM2-135M``: the GGUF shipped by a package) resolve
    the same way here, so every command accepts the same model references."""
    p = Path(path)
    if not p.exists():
        from scaler_wizard.ir.config import resolve_short_name

        short = resolve_short_name(str(path))
        if short is not None:
            p = short
    if not p.exists():
        raise NoCheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".gguf":
            return GGUFCheckpointReader(p)
        raise NoCheckpointError(f"{p}: expected a model directory or a .gguf file")
    if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
        return SafetensorsReader(p, _load_config(p))
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFCheckpointReader(ggufs[0])
    if (p / "pytorch_model.bin").is_file() or (p / "pytorch_model.bin.index.json").is_file():
        if not allow_pickle:
            raise PickleRefusedError(
                f"{p}: only a pickle checkpoint (pytorch_model.bin) was found; loading pickles can run "
                "arbitrary code. Pass --allow-bin (allow_pickle=True) if you trust this file."
            )
        return _bin_reader(p, _load_config(p))
    if not (p / "config.json").is_file() and not any(p.glob("*.safetensors")):
        raise MissingConfigError(f"{p}: not a model directory (no config.json, no weights)")
    raise NoCheckpointError(f"{p}: no model.safetensors, model.safetensors.index.json, .gguf or pytorch_model.bin")


# ---------------------------------------------------------------------------------------------- writer


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy packing in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for name, nb in sizes:
        if cur and cur_bytes + nb > max_shard_size:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nb
    if cur:
        shards.append(cur)
    return shards


def parse_size(s: int | str) -> int:
    """'5GB' -> 5e9, '500MB', '2GiB', 1234 (bytes). Raises CheckpointError for anything else or a
    size that is not positive."""
    if isinstance(s, int) and not isinstance(s, bool):
        n = s
    else:
        t = str(s).strip().upper()
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                 "TB": 10**12, "B": 1}
        mult = 1
        for u, m in units.items():
            if t.endswith(u):
                t, mult = t[: -len(u)].strip(), m
                break
        try:
            v = float(t)
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise CheckpointError(f"shard size {s!r}: expected a size such as 500MB, 2GB, 2GiB or a number of bytes")
        n = int(v * mult)
    if n <= 0:
        raise CheckpointError(f"shard size {s!r}: must be positive")
    return n


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_path(out_dir: str | os.PathLike, input_path: str | os.PathLike | None, force: bool) -> Path:
    out = Path(out_dir).expanduser().resolve()
    if input_path is not None:
        inp = Path(input_path).expanduser().resolve()
        inp_dir = inp if inp.is_dir() else inp.parent
        if _is_within(out, inp_dir):
            raise UnsafeOutputError(f"refusing to write the output {out} into the input directory {inp_dir}")
        if _is_within(inp_dir, out):
            raise UnsafeOutputError(f"refusing to write the output {out}: it contains the input {inp_dir}")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force (force=True) to overwrite it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.exists() and force and any(out.iterdir()) and not (out / "config.json").is_file():
        # --force replaces a model directory; it never deletes a directory of something else (`-o ~`)
        raise OutputExistsError(f"refusing to replace {out}: it is not empty and not a model directory (no "
                                "config.json); --force only replaces a model directory")
    if out.exists() and force and (out == Path(out.anchor) or out == Path.home().resolve()):
        raise OutputExistsError(f"refusing to replace {out}")
    return out


_ST_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_COPY_FILE_RANGE = [hasattr(os, "copy_file_range")]  # cleared after the first file system refusing it
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ShardStream:
    """One safetensors file written header-first, then tensor by tensor (see CheckpointWriter.shard)."""

    def __init__(self, path: Path, entries, metadata: dict[str, str]):
        self.path = path
        self.entries = [(n, tuple(int(d) for d in shape), _ST_DTYPES[str(dt).replace("torch.", "")]) for n, shape, dt in entries]
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        off = 0
        for n, shape, st in self.entries:
            nb = _ST_ITEMSIZE[st]
            for d in shape:
                nb *= d
            header[n] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        self.data_bytes = off
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(path, "wb")
        self._f.write(len(blob).to_bytes(8, "little"))
        self._f.write(blob)
        self._next = 0

    def write(self, name: str, tensor) -> None:
        import torch

        if self._next >= len(self.entries):
            raise CheckpointError(f"{self.path.name}: more tensors than declared ({name})")
        want, shape, st = self.entries[self._next]
        if name != want:
            raise CheckpointError(f"{self.path.name}: expected tensor {want!r} next, got {name!r}")
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{name}: declared {st}{list(shape)}, got {tensor.dtype}{list(tensor.shape)}")
        target = next(getattr(torch, k) for k, v in _ST_DTYPES.items() if v == st)
        if tensor.dtype != target and not (tensor.is_floating_point() and target.is_floating_point):
            raise CheckpointError(f"{name}: declared {st}, got {tensor.dtype} (only float casts are done here)")
        t = tensor.detach().contiguous().reshape(-1)
        # Cast while writing, in blocks, so a float32 value never needs a whole second copy.
        step = max(1, (64 << 20) // max(t.element_size(), 1))
        for a in range(0, t.numel(), step):
            block = t[a:a + step]
            if block.dtype != target:
                block = block.to(target)
            self._f.write(block.view(torch.uint8).numpy().data)
        self._next += 1

    def copy_range(self, name: str, src: str, start: int, stop: int, dtype: str,
                   shape: tuple[int, ...]) -> None:
        """Write the next tensor as a byte copy of ``src[start:stop]`` (a stored tensor of ``dtype``
        (torch name) and ``shape``): in the kernel with ``os.copy_file_range`` where the file
        systems allow it, else through a 16 MiB buffer. The dtype and shape must be the declared ones."""
        if self._next >= len(self.entries):
            raise CheckpointError(f"{self.path.name}: more tensors than declared ({name})")
        want, shp, st = self.entries[self._next]
        if name != want:
            raise CheckpointError(f"{self.path.name}: expected tensor {want!r} next, got {name!r}")
        if tuple(shape) != shp or _ST_DTYPES.get(dtype) != st or stop - start != self._nbytes(shp, st):
            raise CheckpointError(f"{name}: declared {st}{list(shp)}, byte copy of {dtype}{list(shape)}")
        self._f.flush()
        dst = self._f.fileno()
        pos = self._f.tell()
        n = stop - start
        try:
            f = open(src, "rb")
        except FileNotFoundError:
            raise MissingShardError(f"{src}: file not found (while copying {name!r})") from None
        except OSError as e:
            raise CheckpointError(f"{src}: cannot read: {e}") from None
        with f:
            fd = f.fileno()
            done = 0
            if _COPY_FILE_RANGE[0]:
                try:
                    while done < n:
                        k = os.copy_file_range(fd, dst, n - done, start + done, pos + done)
                        if k == 0:
                            raise CheckpointError(f"{src}: ends inside tensor {name!r}")
                        done += k
                except OSError:  # EXDEV, ENOSYS, EINVAL: a file system without it; copy through userspace
                    _COPY_FILE_RANGE[0] = False
            try:
                while done < n:
                    buf = os.pread(fd, min(16 << 20, n - done), start + done)
                    if not buf:
                        raise CheckpointError(f"{src}: ends inside tensor {name!r}")
                    os.pwrite(dst, buf, pos + done)
                    done += len(buf)
            except OSError as e:
                raise CheckpointError(f"copying {name!r} from {src} to {self.path}: {e}") from None
        self._f.seek(pos + n)
        self._next += 1

    @staticmethod
    def _nbytes(shape, st) -> int:
        nb = _ST_ITEMSIZE[st]
        for d in shape:
            nb *= d
        return nb

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._next != len(self.entries):
            raise CheckpointError(f"{self.path.name}: {len(self.entries) - self._next} declared tensor(s) never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._f.close()
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary directories ``.OUT.tmp-<pid>-*`` (and ``.OUT.old-*`` trash, and apply's
    verification staging ``.OUT.unverified-<pid>`` with its ``..OUT.unverified-<pid>.tmp-<pid>-*``) that a killed
    writer of the same OUT left behind: those whose process is gone. Each removal is said on stderr;
    temporaries without a pid (older versions) are only named. Returns what was removed."""
    import re
    import sys

    removed = []
    # .OUT.tmp-<pid>-*, .OUT.old-* and apply's staging .OUT.unverified-<pid> with its own writer's
    # temporary ..OUT.unverified-<pid>.tmp-<pid>-* (the pid in the name is the writer's)
    pat = re.compile(rf"^\.(\.)?{re.escape(out.name)}\.(tmp|old|unverified)-(\d+)?")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for e in entries:
        m = pat.match(e.name)
        if not m or not e.is_dir() or (m.group(1) and m.group(2) != "unverified"):
            continue
        rest = e.name[m.end():]
        ok = rest == "" or rest.startswith(".tmp-") if m.group(2) == "unverified" else rest.startswith("-")
        pid = int(m.group(3)) if m.group(3) and ok else None
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(e, ignore_errors=True)
            removed.append(e)
            sys.stderr.write(f"removed {e}: the temporary output of an interrupted run (process {pid} is gone)\n")
        elif pid is None:
            sys.stderr.write(f"note: {e} looks like the temporary output of an interrupted run; remove it if no "
                             "other run is writing there\n")
    return removed


class CheckpointWriter:
    """Atomic sharded safetensors writer.

    >>> with CheckpointWriter(out, input_path=src, max_shard_size="2GB") as w:
    ...     w.add("a", t)           # buffered; a shard is flushed when the next tensor would overflow it
    ...     w.write_shard({...})    # or write explicit shards (the executor does)
    ...     w.write_config(cfg); w.commit()

    Shards are written as ``model-XXXXX-of-YYYYY.safetensors`` (or ``model.safetensors`` for one) in
    the order they are produced. Leaving the ``with`` block without :meth:`commit` (an exception)
    removes the temporary directory; the output path is untouched until commit.
    """

    def __init__(self, out_dir: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
                 max_shard_size: int | str = DEFAULT_SHARD_SIZE, force: bool = False,
                 metadata: dict[str, str] | None = None):
        self.out = check_output_path(out_dir, input_path, force)
        self.input_path = input_path
        self.force = force
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(self.out)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            from scaler_wizard.runtime.preflight import os_error_reason

            raise OutputWriteError(f"cannot create the output {self.out}: {os_error_reason(e)}"
                                   f"{f' ({e.filename})' if e.filename else ''}") from None
        self._shard_files: list[tuple[str, list[str]]] = []  # (temp file name, tensor names)
        self._buf: dict[str, Any] = {}
        self._buf_bytes = 0
        self.total_size = 0
        self.bytes_written = 0
        self._names: set[str] = set()
        self.committed = False

    # -- tensors
    def add(self, name: str, tensor) -> None:
        nb = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nb > self.max_shard_size:
            self.flush()
        self._buf[name] = tensor
        self._buf_bytes += nb

    def flush(self) -> None:
        if self._buf:
            buf, self._buf, self._buf_bytes = self._buf, {}, 0
            self.write_shard(buf)

    def write_shard(self, tensors: dict[str, Any]) -> int:
        """Write one shard now; returns its byte size."""
        from safetensors.torch import save_file

        dup = self._names.intersection(tensors)
        if dup:
            raise CheckpointError(f"tensor(s) written twice: {sorted(dup)[:5]}")
        seen_ptrs: set[int] = set()
        clean = {}
        for n, t in tensors.items():
            t = t.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            if t.numel() and t.data_ptr() in seen_ptrs:  # save_file refuses shared storage
                t = t.clone()
            if t.numel():
                seen_ptrs.add(t.data_ptr())
            clean[n] = t
        fname = f"shard-{len(self._shard_files):05d}.tmp"
        save_file(clean, str(self.tmp / fname), metadata=self.metadata)
        nb = sum(t.numel() * t.element_size() for t in clean.values())
        self._shard_files.append((fname, list(clean)))
        self._names.update(clean)
        self.total_size += nb
        self.bytes_written += (self.tmp / fname).stat().st_size
        return nb

    def shard(self, entries: list[tuple[str, tuple[int, ...], str]]) -> "ShardStream":
        """Open a shard whose tensors (name, shape, dtype name) are known before any is computed.

        The safetensors header is written first; each tensor's bytes then go straight to the file as
        it is produced (``stream.write(name, tensor)``, in ``entries`` order), so the writer holds at
        most one tensor, whatever the shard size."""
        dup = self._names.intersection(n for n, _, _ in entries)
        if dup:
            raise CheckpointError(f"tensor(s) written twice: {sorted(dup)[:5]}")
        fname = f"shard-{len(self._shard_files):05d}.tmp"
        stream = ShardStream(self.tmp / fname, entries, self.metadata)
        self._shard_files.append((fname, [n for n, _, _ in entries]))
        self._names.update(n for n, _, _ in entries)
        self.total_size += stream.data_bytes
        return stream

    def _shard_done(self, stream: "ShardStream") -> None:
        self.bytes_written += stream.path.stat().st_size

    # -- side files
    def write_config(self, config: dict) -> None:
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def copy_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        shutil.copy2(src, self.tmp / (name or Path(src).name))

    @property
    def dir(self) -> Path:
        """The temporary directory (put extra files here before commit)."""
        return self.tmp

    # -- finish
    def commit(self) -> Path:
        self.flush()
        n = len(self._shard_files)
        if n == 0:
            raise CheckpointError("no tensors were written")
        weight_map: dict[str, str] = {}
        for i, (tmpname, names) in enumerate(self._shard_files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / tmpname, self.tmp / final)
            for nm in names:
                weight_map[nm] = final
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        # mkdtemp/mkstemp create private (0700/0600) entries; give the output the modes a plain
        # mkdir/open would have (the umask applies), so the model can be shared like any other.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        for f in self.tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        # re-check right before the swap (another process may have created it meanwhile)
        check_output_path(self.out, self.input_path, self.force)
        if self.out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-{os.getpid()}-", dir=self.out.parent))
            os.replace(self.out, trash / "old")
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        self.committed = True
        return self.out

    def abort(self) -> None:
        if not self.committed and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort()
        if isinstance(exc, OSError):  # disk full, read-only, permissions: one message, no partial output
            from scaler_wizard.runtime.preflight import os_error_reason

            raise OutputWriteError(f"writing {self.out} failed: {os_error_reason(exc)}; the partial output was "
                                   f"removed and nothing was written at {self.out}") from None
        return False
