"""Lazy checkpoint reading and atomic sharded writing.

Modules: :mod:`.errors` (the :class:`CheckpointError` family), :mod:`.header` (safetensors dtype codes
and header parsing), :mod:`.conversion` (transformers' conversion table: renamed and virtual tensors),
:mod:`.ties` (tied embeddings), :mod:`.readers` (readers and :func:`open_checkpoint`), :mod:`.writer`
(:class:`CheckpointWriter`, :class:`ShardStream`, output-path checks).

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

from scaler_wizard.runtime.io.conversion import VirtualTensor
from scaler_wizard.runtime.io.errors import (
    CheckpointError, CorruptCheckpointError, MissingConfigError, MissingShardError, NoCheckpointError,
    OutputExistsError, OutputWriteError, PickleRefusedError, TensorNotFoundError, UnsafeOutputError,
    UnsupportedDtypeError,
)
from scaler_wizard.runtime.io.header import ITEMSIZE, MAX_HEADER_BYTES, ST_DTYPES, TensorInfo, read_safetensors_header
from scaler_wizard.runtime.io.readers import (
    TOKENIZER_FILES, CheckpointReader, GGUFCheckpointReader, InMemoryReader, SafetensorsReader, open_checkpoint,
)
from scaler_wizard.runtime.io.writer import (
    DEFAULT_SHARD_SIZE, CheckpointWriter, ShardStream, check_output_path, clean_stale_temporaries, parse_size,
    plan_shards,
)

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "MissingConfigError", "MissingShardError", "NoCheckpointError",
    "OutputExistsError", "OutputWriteError", "PickleRefusedError", "TensorNotFoundError", "UnsafeOutputError",
    "UnsupportedDtypeError", "ITEMSIZE", "MAX_HEADER_BYTES", "ST_DTYPES", "TensorInfo", "read_safetensors_header",
    "VirtualTensor", "TOKENIZER_FILES", "CheckpointReader", "GGUFCheckpointReader", "InMemoryReader",
    "SafetensorsReader", "open_checkpoint", "DEFAULT_SHARD_SIZE", "CheckpointWriter", "ShardStream",
    "check_output_path", "clean_stale_temporaries", "parse_size", "plan_shards",
]
