"""Lazy checkpoint readers (see :mod:`scaler_wizard.runtime.io`) and :func:`open_checkpoint`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from scaler_wizard.runtime.io.conversion import VirtualTensor, _run_converter, add_virtual, converter_model, find_aliases
from scaler_wizard.runtime.io.errors import (
    CheckpointError, CorruptCheckpointError, MissingConfigError, MissingShardError, NoCheckpointError,
    PickleRefusedError, TensorNotFoundError, UnsupportedDtypeError,
)
from scaler_wizard.runtime.io.header import ITEMSIZE, TensorInfo, read_safetensors_header
from scaler_wizard.runtime.io.ties import find_ties

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)


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
        """Apply transformers' conversion table (:func:`scaler_wizard.runtime.io.conversion.find_aliases`)."""
        find_aliases(self)

    def _add_virtual(self, conv, layer_name: str, by_pattern: dict[str, list[str]]) -> None:
        add_virtual(self, conv, layer_name, by_pattern)

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

        model = converter_model(self) if vt.needs_model else None
        outs = _run_converter(vt.converter, vt.layer_name, vt.sources, load, model=model)
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
        """Map absent tied output-embedding names to their stored input embedding (:func:`find_ties`)."""
        find_ties(self)


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
