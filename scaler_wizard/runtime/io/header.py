"""The safetensors format: dtype codes and the header, parsed and validated without reading data.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes
of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then
the data; offsets are relative to the byte after the header."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from scaler_wizard.runtime.io.errors import CorruptCheckpointError, CheckpointError, MissingShardError, UnsupportedDtypeError

# safetensors dtype code -> (torch dtype name, item size in bytes)
ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
ITEMSIZE = {name: size for name, size in ST_DTYPES.values()}

MAX_HEADER_BYTES = 100 * 2**20


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
