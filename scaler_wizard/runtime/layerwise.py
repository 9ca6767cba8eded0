"""Layer-by-layer forward of a checkpoint on disk, in memory bounded by one decoder layer.

:func:`run_layerwise` computes float32 logits of a model directory for a list of :class:`Job` s
(batches of token ids with their attention mask, position ids, token type ids, or teacher-forced
KV-cache decoding) while holding at most one decoder layer's weights in float32 (plus the small
tensors outside the layers: norms, position embeddings), and the next layer's, read and converted in
a thread while this one runs, where a layer's float32 weights fit
``LayerwiseModel.READ_AHEAD_MAX_BYTES`` (512 MiB: up to about 3B parameters Llama-shaped; a 7B
layer, 0.8 GB, is read on demand and the 2 GB bound at 7B holds). Float32 products of several rows
are computed weight-major (:func:`_linear`). The input embedding reads only the rows
of the ids the jobs use (each run of adjacent rows in one ``pread``); a ``Linear`` LM head is read
in chunks of rows (``LayerwiseModel.CHUNK_BYTES``, 64 MiB of float32) and applied chunk by chunk
over the vocabulary. Every other tensor is read once from the lazy safetensors reader
(:mod:`scaler_wizard.runtime.checkpoint`); a tied output embedding is read whole as the head.

It runs the model's own transformers code, not a reimplementation. The model class (the one
``from_pretrained`` would build, see :func:`scaler_wizard.runtime.verify.model_class_for`) is
built with parameters on the meta device; its decoder layers are the largest ModuleList of
identical modules. Three phases per model:

1. *inputs*: with the input embedding materialised, the model's forward runs for every job with
   each decoder layer replaced by a recorder: it keeps the hidden states entering layer 0 and the
   arguments the model passes each layer (attention masks built by the model's mask functions,
   rotary position embeddings, the cache), and stops the forward after the last layer.
2. *layers*: for each decoder layer in turn: its weights are read, converted to float32, the real
   layer module runs on every job's hidden states with the recorded arguments, and its weights are
   dropped (back to the meta device).
3. *outputs*: with the output embedding materialised and the input embedding answering zeros, the
   model's forward runs again for every job with layer 0 returning the final hidden states and
   the other layers passing them through, so final norm, LM head and logit soft-capping are the
   model's own.

KV-cache decoding (``Job.prefill``): the prefill and each single-token step are separate forwards.
In phase 1 each step sees a stand-in cache that already holds the right number of (zero) positions,
so the model builds the step's positions and masks as it would in real decoding; in phase 2 every
step runs, in order, against one real ``DynamicCache`` per job, layer by layer (layer ``l`` of
step ``t`` only reads layer ``l`` of the cache, written by steps before ``t``). With
``Job.prefill_from`` the prefill is no forward of its own: the named job's forward (the same
leading tokens, run over more of them) writes the cache, and right after it has run layer ``l``,
layer ``l`` of the cache is cut to the prefill's positions and rows (:func:`cut_cache_layer`),
before the decoding steps run layer ``l``.

Identical leading layers (``run(capture=k)`` on the original, ``run(reuse=prefix)`` on the grown
model; :func:`identical_prefix` decides k from the files): a depth plan that inserts layers after
the first k leaves those k layers byte-identical, with the same config, fed the same hidden states
and arguments; the grown model then starts at layer k from the original's captured outputs and KV
caches (every input is compared bitwise first; anything different and every layer is computed).

Raises :class:`LayerwiseUnsupported` when the model cannot be driven this way (GGUF files, no
decoder-layer list found); callers fall back on the whole-model forward.
"""

from __future__ import annotations

import inspect
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LayerwiseUnsupported(Exception):
    """This model cannot be run layer by layer (the message says why); use the whole-model path."""


class _Stop(Exception):
    pass


@dataclass
class Job:
    """One batch to run. ``input_ids`` [B, T] (int64); optional ``attention_mask`` [B, T],
    ``position_ids`` [B, T], ``token_type_ids`` [B, T]. ``prefill`` > 0: teacher-forced KV-cache
    decoding (forward on ids[:, :prefill] with a cache, then one token at a time; with ``steps`` >
    0 only the last ``steps`` tokens one at a time, the ones between in one forward through the
    cache); the logits of every position are returned, as
    :func:`scaler_wizard.runtime.verify.kv_decode_logits` does.

    ``prefill_from`` (with ``prefill``): the name of an earlier job (no token type ids; a mask and
    position ids only where they leave this job's rows unmasked at positions 0, 1, 2, ...) whose
    first rows and first ``prefill`` tokens are this job's: its forward runs
    with a cache, which is then cut to ``prefill`` positions and this job's rows
    (:func:`cut_cache_layer`), and the decoding continues from that cache instead of a prefill
    forward of its own (one forward per layer fewer); the logits of the prefill positions are that
    job's. Only where the cut cache is what the prefill would have written
    (:func:`prefill_from_longer_refused`)."""

    name: str
    input_ids: Any
    attention_mask: Any = None
    position_ids: Any = None
    token_type_ids: Any = None
    prefill: int = 0
    steps: int = 0
    prefill_from: str | None = None


def prefill_sources(jobs: list) -> dict[str, "Job"]:
    """source job name -> the decoding job whose prefill it gives (``Job.prefill_from``). Raises
    ValueError when a source is missing, comes after its decoding job, gives two prefills, has a
    token type ids, is itself a decoding job, or does not hold the decoding job's rows and prefill
    tokens as its first rows and tokens, unmasked and at positions 0, 1, 2, ... (its other rows may
    be padded: the padding check's rows share the random ids' forward)."""
    import torch

    out: dict[str, Job] = {}
    seen: dict[str, Job] = {}
    for j in jobs:
        if j.prefill > 0 and j.prefill_from is not None:
            src = seen.get(j.prefill_from)
            B, P = j.input_ids.shape[0], j.prefill
            why = None
            if src is None:
                why = "no earlier job of that name"
            elif src.name in out:
                why = "that job already gives another prefill"
            elif src.prefill > 0 or src.token_type_ids is not None:
                why = "that job is not a plain forward over token ids"
            elif (src.input_ids.shape[0] < B or src.input_ids.shape[1] < P
                  or not torch.equal(src.input_ids[:B, :P], j.input_ids[:, :P])):
                why = "its first rows and tokens are not this job's prefill"
            elif src.attention_mask is not None and not bool((src.attention_mask[:B, :P] == 1).all()):
                why = "its mask hides some of this job's prefill tokens"
            elif src.position_ids is not None and not torch.equal(
                    src.position_ids[:B, :P], torch.arange(P, dtype=src.position_ids.dtype).expand(B, P)):
                why = "its position ids for this job's rows are not 0, 1, 2, ..."
            if why:
                raise ValueError(f"job {j.name!r}: prefill_from={j.prefill_from!r}: {why}")
            out[src.name] = j
        seen[j.name] = j
    return out


def prefill_from_longer_refused(config, length: int) -> str | None:
    """None when the KV cache a forward over ``length`` tokens writes, cut to its first positions
    (:func:`cut_cache_layer`), holds what a forward over those positions alone would write (up to
    float32 re-association): every layer of ``DynamicCache(config=config)`` is a plain
    ``DynamicLayer``, or a sliding-window one whose window holds all ``length`` positions (it keeps
    the last ``window - 1``), and no RoPE frequencies depend on the forward's length (``dynamic``
    and ``longrope``: transformers picks them from the longest position of each forward, so the
    prefill's keys would be rotated with the long sequence's frequencies). Otherwise the reason."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from scaler_wizard.ir.config import rope_dicts_anywhere

    types = {d.get("rope_type", d.get("type")) for d in rope_dicts_anywhere(config.to_dict())}
    bad = sorted(t for t in types if isinstance(t, str) and (t == "longrope" or "dynamic" in t))
    if bad:
        return f"RoPE frequencies depend on the sequence length ({', '.join(bad)})"
    try:
        cache = DynamicCache(config=config)
    except Exception as e:  # noqa: BLE001 - a config the cache cannot read: keep the separate prefill
        return f"no DynamicCache for this config ({type(e).__name__})"
    for layer in getattr(cache, "layers", None) or []:
        if type(layer) is DynamicSlidingWindowLayer:
            if layer.sliding_window <= length:
                return f"a sliding window of {layer.sliding_window} positions drops some of {length}"
        elif type(layer) is not DynamicLayer:
            return f"{type(layer).__name__} cache layers"
    return None


def cut_cache_layer(layer, length: int, rows: int) -> None:
    """Keep the first ``length`` positions and the first ``rows`` batch rows of one KV-cache layer
    (a ``DynamicLayer``, or a ``DynamicSlidingWindowLayer`` that has not dropped positions yet).
    Raises ValueError for other layers."""
    import torch
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
        raise ValueError(f"cannot cut a {type(layer).__name__} cache layer")
    n = layer.get_seq_length()
    if n == 0:  # not written (a layer sharing another's cache)
        return
    if type(layer) is DynamicSlidingWindowLayer and layer.keys.shape[-2] != n:
        raise ValueError("the sliding-window cache layer has dropped positions")
    if n > length:
        layer.crop(length - n)  # a negative count: that many positions off the end
    if layer.keys.shape[0] > rows:
        layer.batch_select_indices(torch.arange(rows))


def decode_schedule(T: int, prefill: int, steps: int = 0) -> list[tuple[int, int]]:
    """The forwards of teacher-forced KV-cache decoding of T tokens, as (start, stop) token ranges:
    the prefill ``[0, prefill)``; then, when ``steps`` > 0 and tokens remain before the last
    ``steps``, one forward over them through the cache; then one forward per token."""
    out = [(0, prefill)]
    tail = T - steps if steps > 0 else prefill
    if tail > prefill:
        out.append((prefill, tail))
    out += [(t, t + 1) for t in range(max(prefill, tail), T)]
    return out


@dataclass
class _Step:
    job: str
    kwargs: dict
    cache_len: int = -1  # >= 0: a decode step, with this many positions already cached
    cache: str | None = None  # the job whose KV cache it reads and writes (its own, or the one it prefills)
    cut: tuple | None = None  # (positions, rows): after running a layer, cut the cache layers it wrote to these
    h: Any = None
    calls: list = field(default_factory=list)  # per layer: (args after hidden, kwargs)


@dataclass
class Prefix:
    """What a model's first ``layers`` decoder layers saw and gave in one :meth:`LayerwiseModel.run`
    (``capture=``): per step, (job, cache length, hidden states entering layer 0), the arguments
    of each of those layers, the hidden states they output, and the KV caches (job -> cache) whose
    layers 0..layers-1 they filled. About ``layers`` x (arguments) + two hidden states per step:
    small next to one decoder layer's weights."""

    layers: int
    inputs: list
    calls: list
    outputs: Any
    caches: dict
    returns_tuple: bool = False


def _same(a, b) -> bool:
    """Bitwise equality of recorded layer arguments: tensors (dtype, shape, values), containers
    element by element, caches as caches (each run swaps in its own), other values by ``==``."""
    import torch
    from transformers.cache_utils import Cache

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, Cache) or isinstance(b, Cache):
        return isinstance(a, Cache) and isinstance(b, Cache)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not known to be equal
        return False


_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# config keys no decoder layer reads (the depth, the vocabulary, names, the storage dtype)
_NOT_LAYER_KEYS = frozenset(_DEPTH_KEYS + ("vocab_size", "architectures", "dtype", "torch_dtype",
                                           "transformers_version", "_name_or_path"))


def identical_prefix(a: "LayerwiseModel", b: "LayerwiseModel", known: ByteComparisons | None = None) -> tuple[int, str]:
    """(k, why): the first k decoder layers of ``a`` and ``b`` are the same computation: the same
    class, the same config apart from keys no layer reads (depth, vocabulary size, names, storage
    dtype; per-layer lists equal over the first k entries), the same parameter names, and stored
    tensors of equal dtype and shape whose bytes are equal (compared straight from the safetensors
    files, 16 MiB at a time, stopping at the first difference). ``why`` says what ends the prefix.

    Sound because a decoder layer is a function of its code, its config, its weights and its
    inputs: with inputs checked bitwise as well (:meth:`LayerwiseModel._reuse`), the same kernels
    on the same shapes give the same bits. Tensors that are not a byte range of a file (built by a
    converter) end the prefix. ``known``: byte comparisons made before (:func:`compare_leading_layers`),
    used instead of reading the files again."""
    known = known if known is not None else ByteComparisons()
    if type(a.model) is not type(b.model) or type(a.layers) is not type(b.layers):
        return 0, "different model classes"
    n = min(len(a.layers), len(b.layers))
    ca, cb = a.config.to_dict(), b.config.to_dict()
    da, db = len(a.layers), len(b.layers)
    for key in sorted(set(ca) | set(cb)):
        va, vb = ca.get(key), cb.get(key)
        if key in _NOT_LAYER_KEYS or va == vb:
            continue
        if isinstance(va, list) and isinstance(vb, list) and len(va) == da and len(vb) == db:
            same = 0
            while same < min(da, db) and va[same] == vb[same]:
                same += 1
            n = min(n, same)
            continue
        return 0, f"config key {key!r} differs"
    for i in range(n):
        la, lb = a.layers[i], b.layers[i]
        if type(la) is not type(lb):
            return i, f"layer {i}: different classes"
        pa = dict(la.named_parameters(remove_duplicate=False))
        pb = dict(lb.named_parameters(remove_duplicate=False))
        if pa.keys() != pb.keys():
            return i, f"layer {i}: different parameters"
        for rel in pa:
            if not _same_bytes(a, pa[rel], b, pb[rel], known):
                return i, f"layer {i}: {rel} differs"
        ba, bb = dict(la.named_buffers()), dict(lb.named_buffers())  # loaded already (stored or computed)
        if ba.keys() != bb.keys():
            return i, f"layer {i}: different buffers"
        for rel in ba:
            x, y = ba[rel], bb[rel]
            if x.dtype != y.dtype or x.shape != y.shape or not bool((x == y).all()):
                return i, f"layer {i}: buffer {rel} differs"
    return n, "all layers of the shorter model" if n else "no layers"


def _pread_full(fd: int, buf: memoryview, offset: int) -> bool:
    """Fill ``buf`` from ``fd`` at ``offset`` (``preadv`` until full); False at end of file first."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            return False
        got += n
    return True


def _same_bytes(a: "LayerwiseModel", pa, b: "LayerwiseModel", pb, known: "ByteComparisons") -> bool:
    try:
        na = a._stored_name([full for _, _, full in a._slots[id(pa)]])
        nb = b._stored_name([full for _, _, full in b._slots[id(pb)]])
    except (KeyError, ValueError):
        return False
    ia, ib = a.reader.info(na), b.reader.info(nb)
    if ia.dtype != ib.dtype or tuple(ia.shape) != tuple(ib.shape):
        return False
    ra, rb = a.reader.byte_range(na), b.reader.byte_range(nb)
    if ra is None or rb is None:
        return False
    return known.same(ra, rb)


class ByteComparisons:
    """Byte ranges of safetensors files compared for equality, ``(file, start, end)`` pairs ->
    bool, each pair compared once (16 MiB reads, stopping at the first difference). Filled ahead of
    time by :func:`compare_leading_layers` (no torch needed) and consulted by :func:`identical_prefix`,
    so ``apply`` can compare the layers it copied while the verifier's imports are still running.
    Valid while the files are not rewritten (one apply or verify)."""

    def __init__(self):
        self._known: dict[tuple, bool] = {}

    def same(self, ra: tuple[str, int, int], rb: tuple[str, int, int]) -> bool:
        ka = (os.path.realpath(ra[0]), int(ra[1]), int(ra[2]))
        kb = (os.path.realpath(rb[0]), int(rb[1]), int(rb[2]))
        key = (ka, kb) if ka <= kb else (kb, ka)
        if key not in self._known:
            self._known[key] = _equal_ranges(ka, kb)
        return self._known[key]

    def __len__(self) -> int:
        return len(self._known)


def _equal_ranges(ra: tuple[str, int, int], rb: tuple[str, int, int]) -> bool:
    if ra[2] - ra[1] != rb[2] - rb[1]:
        return False
    size = ra[2] - ra[1]
    if not _CMP_BUFFERS:  # two reused buffers: fresh 16 MiB bytes objects per read are mmap'd and
        _CMP_BUFFERS.extend((bytearray(16 << 20), bytearray(16 << 20)))  # page-faulted each time
    step = len(_CMP_BUFFERS[0])
    with open(ra[0], "rb") as fa, open(rb[0], "rb") as fb:
        for off in range(0, size, step):
            k = min(step, size - off)
            bufs = [memoryview(x)[:k] for x in _CMP_BUFFERS]
            for f, start, buf in ((fa, ra[1], bufs[0]), (fb, rb[1], bufs[1])):
                if not _pread_full(f.fileno(), buf, start + off):
                    return False
            # bytearray == is a memcmp; memoryview == compares item by item (25x slower)
            same = _CMP_BUFFERS[0] == _CMP_BUFFERS[1] if k == step else bufs[0].tobytes() == bufs[1].tobytes()
            if not same:
                return False
    return True


def compare_leading_layers(a, b, layer_prefix: str, known: ByteComparisons | None = None) -> ByteComparisons:
    """Compare the stored tensors of decoder layers 0, 1, ... of two checkpoint readers
    (:func:`scaler_wizard.runtime.checkpoint.open_checkpoint`), tensor by tensor under equal names
    (``{layer_prefix}.{i}.``), until the first layer whose names, dtypes, shapes or bytes differ;
    returns the comparisons made (for :func:`identical_prefix`). Imports no torch: it runs while
    the verifier's imports do. A guess at which tensors :func:`identical_prefix` will ask about,
    never its verdict: that still checks classes, config and parameters."""
    from scaler_wizard.compiler.passes.base import split_layer_name

    known = known if known is not None else ByteComparisons()

    def by_layer(reader) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for n in reader.names():
            sp = split_layer_name(n, layer_prefix)
            if sp is not None:
                out.setdefault(sp[0], []).append(n)
        return out

    la, lb = by_layer(a), by_layer(b)
    i = 0
    while i in la and i in lb and sorted(la[i]) == sorted(lb[i]):
        for n in la[i]:
            ia, ib = a.info(n), b.info(n)
            ra, rb = a.byte_range(n), b.byte_range(n)
            if (ia.dtype != ib.dtype or tuple(ia.shape) != tuple(ib.shape) or ra is None or rb is None
                    or not known.same(ra, rb)):
                return known
        i += 1
    return known


_CMP_BUFFERS: list = []


# Float32 products of a few dozen to a few hundred rows are computed weight-major (see _linear).
# False: torch.nn.functional.linear, as the model's own forward computes them (bitwise the whole
# model's logits; the tests of the layer-by-layer replay itself use it).
WEIGHT_MAJOR_GEMM = True


def _linear(x, weight, bias=None):
    """``torch.nn.functional.linear(x, weight, bias)`` for float32 CPU tensors, computed as
    ``(weight @ x^T)^T``: x [..., in], weight [out, in], bias [out] or None -> [..., out]
    (contiguous). The same products, summed in another order by BLAS: results differ from
    ``linear``'s in the last bits. Measured on this project's 2-core machine (MKL, 2 threads;
    benchmarks/verify_forward_cost.py, medians of 7) over the seven matrices of a TinyLlama-1.1B
    decoder layer: 128 rows 152 ms as ``linear`` (x @ weight^T), 128 ms weight-major; 2 rows 35 ->
    19 ms; the LM head (32000 x 2048) at 128 rows 263 -> 221 ms; one thread: no difference. One row
    (a decoding step, a matrix-vector product) and other dtypes or devices go to ``linear``."""
    import torch

    rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    if (not WEIGHT_MAJOR_GEMM or rows < 2 or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2):
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        y = y + bias
    return y.contiguous().reshape(*x.shape[:-1], weight.shape[0])


def _weight_major_linears(module) -> list:
    """The plain ``torch.nn.Linear`` submodules of ``module`` (subclasses keep their own forward),
    given a forward computing :func:`_linear`; the caller removes it (``__dict__.pop("forward")``)."""
    import torch

    if not WEIGHT_MAJOR_GEMM:
        return []
    mods = [m for m in module.modules() if type(m) is torch.nn.Linear]
    for m in mods:
        m.forward = (lambda mod: lambda x: _linear(x, mod.weight, mod.bias))(m)
    return mods


def _all(module) -> list:
    """Every parameter of ``module``, shared ones once per slot."""
    return [p for _, p in module.named_parameters(remove_duplicate=False)]


def _layer_list(model, n_layers: int | None):
    """The decoder layers: the ModuleList of identical modules holding the most parameters."""
    import torch

    best, best_n = None, -1
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_n:
            best, best_n = (name, mod), n
    if best is None:
        raise LayerwiseUnsupported("no list of decoder layers found")
    return best


class LayerwiseModel:
    """A model directory opened for layer-by-layer execution (see the module docstring).

    ``path``: a directory with config.json and safetensors (the reader of
    :func:`scaler_wizard.runtime.checkpoint.open_checkpoint`). Raises LayerwiseUnsupported for
    a .gguf file; CheckpointError for unreadable checkpoints."""

    def __init__(self, path):
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from scaler_wizard.runtime.checkpoint import open_checkpoint
        from scaler_wizard.runtime.verify import is_causal_lm, model_class_for

        path = Path(path)
        if path.suffix == ".gguf" or not (path / "config.json").is_file():
            raise LayerwiseUnsupported(f"{path}: not a safetensors model directory")
        self.reader = open_checkpoint(path)
        if self.reader.format != "safetensors":
            raise LayerwiseUnsupported(f"{path}: {self.reader.format} checkpoint (read whole)")
        config = AutoConfig.from_pretrained(str(path))
        cls = model_class_for(path)
        with init_empty_weights(include_buffers=False):
            if cls is AutoModelForCausalLM:
                model = cls.from_config(config, dtype=torch.float32)
            else:
                model = cls._from_config(config, dtype=torch.float32)
        model.tie_weights()  # as from_pretrained does (config.tie_word_embeddings, _tied_weights_keys)
        self._load_buffers(model)
        self.model = model.eval()
        self.config = model.config
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.layers_name, self.layers = _layer_list(model, getattr(config, "num_hidden_layers", None))
        self.in_emb = model.get_input_embeddings()
        self.out_emb = model.get_output_embeddings()
        if self.in_emb is None or getattr(self.in_emb, "weight", None) is None:
            raise LayerwiseUnsupported(f"{type(model).__name__}: no input embedding matrix")
        sig = inspect.signature(model.forward).parameters
        self.cache_kw = next((k for k in ("cache", "past_key_values") if k in sig), None)
        self.causal = is_causal_lm(model)
        self.layer_returns_tuple = False
        # Free buffers, (dtype, shape) -> tensors: the decoder layers have the same shapes, so each
        # layer's weights are read into and converted in the previous layer's memory. Fresh
        # allocations of that size are mmap'd by the allocator and returned on free, and first
        # touching their pages cost 5x the conversion itself (measured: bf16 -> fp32 of a 1.1B
        # model, 5.8 s of 52 s of verification).
        self._pool: dict[tuple, list] = {}
        self._pool_lock = threading.Lock()  # the read-ahead thread takes buffers while layers run
        self._pooled: set[int] = set()  # ids of parameters whose memory came from the pool
        # parameter slots: id(param) -> [(module, attr, full name)], so tied parameters load once
        self._slots: dict[int, list] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for attr, p in mod._parameters.items():
                if p is not None:
                    self._slots.setdefault(id(p), []).append((mod, attr, f"{mname}.{attr}" if mname else attr))

    # -- weights
    def _load_buffers(self, model) -> None:
        """Persistent buffers the checkpoint stores replace the values the config built (as
        ``from_pretrained`` loads them: a trained router's ``e_score_correction_bias``, Gemma-4's
        ``layer_scalar``); floating ones in float32. They are small and held for the whole run."""
        import torch

        from scaler_wizard.ir.trace import persistent_buffers

        self.prefix = getattr(model, "base_model_prefix", "") or ""
        mods = dict(model.named_modules())
        for name, shape in persistent_buffers(model).items():
            try:
                stored = self._stored_name([name])
            except ValueError:
                continue  # not stored: the value the model computes is the one from_pretrained keeps
            t = self.reader.get(stored)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{self.reader.path}: buffer {stored!r} has shape {tuple(t.shape)}, "
                                 f"the model built from config.json expects {tuple(shape)}")
            mpath, _, attr = name.rpartition(".")
            mod = mods[mpath]
            t = t.to(torch.float32) if t.is_floating_point() else t
            mod._buffers[attr] = t.to(mod._buffers[attr].device)

    def _stored_name(self, names: list[str]) -> str:
        cands = []
        for n in names:
            cands.append(n)
            if self.prefix and n.startswith(self.prefix + "."):
                cands.append(n[len(self.prefix) + 1:])
            elif self.prefix:
                cands.append(f"{self.prefix}.{n}")
        for c in cands:
            if c in self.reader:
                return c
        raise ValueError(f"{self.reader.path}: no tensor for parameter {names[0]!r} in the checkpoint")

    def _params(self, module) -> list:
        return list({id(p): p for p in _all(module)}.values())

    def load(self, params: list, ready: dict | None = None) -> list:
        """Materialise ``params`` (float32, read from the checkpoint) in every slot that shares
        them; returns the new parameters, to give to :meth:`free`. ``ready``: tensors read ahead
        (:meth:`_read_ahead`), id(param) -> pooled float32 tensor."""
        import torch

        out = []
        for old in params:
            if old.device.type != "meta":
                out.append(old)
                continue
            slots = self._slots.pop(id(old))
            name = self._stored_name([full for _, _, full in slots])
            t = ready.pop(id(old), None) if ready else None
            t = t if t is not None else self._read_pooled(name)
            pooled = t is not None
            if t is None:
                t = self.reader.get(name)
                t = t.to(torch.float32) if t.dtype != torch.float32 else t
            if tuple(t.shape) != tuple(old.shape):
                raise ValueError(f"{self.reader.path}: tensor {name!r} has shape {tuple(t.shape)}, "
                                 f"the model built from config.json expects {tuple(old.shape)}")
            p = torch.nn.Parameter(t, requires_grad=False)
            for mod, attr, _ in slots:
                mod._parameters[attr] = p
            self._slots[id(p)] = slots
            if pooled:
                self._pooled.add(id(p))
            out.append(p)
        return out

    def _buffer(self, shape, dtype):
        import torch

        with self._pool_lock:
            free = self._pool.get((dtype, tuple(shape)))
            if free:
                return free.pop()
        return torch.empty(tuple(shape), dtype=dtype)

    def _give_back(self, t) -> None:
        with self._pool_lock:
            self._pool.setdefault((t.dtype, tuple(t.shape)), []).append(t)

    # float32 bytes of one decoder layer up to which the next layer is read while this one runs
    READ_AHEAD_MAX_BYTES = 512 << 20

    def _read_ahead(self, module):
        """Start reading ``module``'s parameters (those on the meta device) into pooled float32
        buffers in a thread (``pread`` and the dtype conversion release the GIL); returns (thread,
        results: id(param) -> tensor) for :meth:`load`, after ``thread.join()``. A parameter the
        thread could not read is left out: :meth:`load` reads it (and raises what it raises). The
        float32 buffers are taken here, in the calling thread, so which buffers exist does not
        depend on how the thread's reads interleave with the layer running meanwhile."""
        import torch

        todo = []
        for p in self._params(module):
            if p.device.type == "meta" and id(p) in self._slots:
                try:
                    name = self._stored_name([full for _, _, full in self._slots[id(p)]])
                except ValueError:
                    continue
                todo.append((id(p), name, self._buffer(tuple(self.reader.info(name).shape), torch.float32)))
        got: dict[int, Any] = {}

        def work():
            for pid, name, dst in todo:
                try:
                    t = self._read_pooled(name, dst)
                except Exception:  # noqa: BLE001 - load reads it again and reports
                    t = None
                if t is not None:
                    got[pid] = t
                else:
                    self._give_back(dst)

        th = threading.Thread(target=work, name="scaler-wizard-read-ahead", daemon=True)
        th.start()
        return th, got

    def _drop_read_ahead(self, pending) -> None:
        if pending is None:
            return
        if pending[0] is not None:
            pending[0].join()
        for t in pending[1].values():
            self._give_back(t)
        pending[1].clear()

    def _read_pooled(self, name: str, out=None):
        """The stored tensor ``name`` as float32, read with ``pread`` straight from its byte range
        into a pooled buffer (converted in another pooled buffer when stored narrower). None when
        it is not a plain byte range of a known dtype (a converter builds it): the caller reads it.
        ``out``: the float32 buffer to fill (of the stored shape), taken from the pool by the caller;
        on None it is the caller's to give back."""
        import torch

        where = self.reader.byte_range(name)
        info = self.reader.info(name)
        dtype = getattr(torch, str(info.dtype), None)
        if where is None or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            return None
        path, start, end = where
        shape = tuple(info.shape)
        raw = out if out is not None and dtype == torch.float32 else self._buffer(shape, dtype)
        view = raw.reshape(-1).view(torch.uint8).numpy()
        if view.nbytes != end - start:
            if raw is not out:
                self._give_back(raw)
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            if not _pread_full(fd, memoryview(view), start):
                raise OSError(f"{path}: short read of tensor {name!r}")
        finally:
            os.close(fd)
        self.reader.count_copy(info.nbytes)
        if dtype == torch.float32:
            return raw
        t = out if out is not None else self._buffer(shape, torch.float32)
        t.copy_(raw)
        self._give_back(raw)
        return t

    def free(self, params: list) -> None:
        """Put ``params`` back on the meta device (in every slot sharing them)."""
        import torch

        for p in params:
            if p.device.type == "meta" or id(p) not in self._slots:
                continue
            slots = self._slots.pop(id(p))
            if id(p) in self._pooled:
                self._pooled.discard(id(p))
                self._give_back(p.detach())
            m = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            for mod, attr, _ in slots:
                mod._parameters[attr] = m
            self._slots[id(m)] = slots
        params.clear()

    def _rest_params(self) -> list:
        """Parameters outside the decoder layers and the two embeddings (norms, position embeddings)."""
        big = {id(p) for p in _all(self.layers)}
        for m in (self.in_emb, self.out_emb):
            if m is not None:
                big |= {id(p) for p in _all(m)}
        return [p for p in self._params(self.model) if id(p) not in big]

    # -- forward
    def run(self, jobs: list[Job], *, capture: int = 0, reuse: "Prefix | None" = None) -> dict[str, Any]:
        """float32 logits [B, T, V] per job name (see the module docstring).

        ``capture`` > 0: also keep, in :attr:`captured` (a :class:`Prefix`), what the first
        ``capture`` decoder layers saw and gave (inputs, arguments, outputs, KV caches) for
        another model's :meth:`run` to ``reuse``; ``reuse``: a Prefix captured by a model whose
        first ``reuse.layers`` layers are byte-identical to this one's (:func:`identical_prefix`):
        when this model's inputs to them are bitwise those of the capture, their outputs are
        taken from it instead of computed (see :class:`Prefix`); otherwise everything is computed
        and :attr:`reuse_note` says why."""
        import torch
        from transformers import DynamicCache

        self.captured = None
        self.reuse_note = None
        self.reused_layers = 0

        sources = prefill_sources(jobs)
        steps: list[_Step] = []
        for j in jobs:
            base = {"input_ids": j.input_ids}
            for k in ("attention_mask", "position_ids", "token_type_ids"):
                v = getattr(j, k)
                if v is not None:
                    base[k] = v
            if j.prefill > 0:
                if not self.causal or self.cache_kw is None:
                    raise LayerwiseUnsupported(f"{type(self.model).__name__}: no KV-cache decoding")
                schedule = decode_schedule(j.input_ids.shape[1], j.prefill, j.steps)
                if j.prefill_from is not None:  # the source's forward writes the cache (see Job)
                    schedule = schedule[1:]
                for a, b in schedule:
                    steps.append(_Step(j.name, {"input_ids": j.input_ids[:, a:b]}, a, cache=j.name))
            elif j.name in sources:
                d = sources[j.name]
                steps.append(_Step(j.name, base, 0, cache=d.name, cut=(d.prefill, d.input_ids.shape[0])))
            else:
                steps.append(_Step(j.name, base))

        n = len(self.layers)
        rest: list = []
        try:
            rest = self.load(self._rest_params())
            with torch.no_grad():
                self._inputs(steps, n, DynamicCache)
                start, caches = 0, None
                if reuse is not None and reuse.layers > 0:
                    start, caches = self._reuse(steps, reuse)
                self._layers(steps, DynamicCache, start=start, caches=caches, capture=min(capture, n))
                out = self._outputs(steps, n)
        finally:
            for layer in self.layers:  # the recorders and replayers are instance attributes
                layer.__dict__.pop("forward", None)
            self.free(rest)
        for name, d in sources.items():  # the prefill positions' logits are the source's
            pre = out[name][:d.input_ids.shape[0], :d.prefill]
            out[d.name] = torch.cat([pre, out[d.name]], dim=1) if d.name in out else pre
        return out

    # -- the two vocabulary-sized matrices, read in chunks of rows
    CHUNK_BYTES = 64 << 20  # float32 bytes of one chunk of embedding / LM-head rows

    def _row_chunks(self, param):
        """(first row, float32 rows) of the stored tensor behind ``param``, chunk by chunk (about
        :attr:`CHUNK_BYTES` each), read straight from its byte range in the safetensors file; the
        whole tensor is read once. A tensor that is not a byte range (built by a converter) is read
        whole and sliced."""
        import torch

        name = self._stored_name([full for _, _, full in self._slots[id(param)]])
        info = self.reader.info(name)
        if tuple(info.shape) != tuple(param.shape):
            raise ValueError(f"{self.reader.path}: tensor {name!r} has shape {tuple(info.shape)}, "
                             f"the model built from config.json expects {tuple(param.shape)}")
        rows = int(info.shape[0])
        row_numel = max(1, info.numel // max(rows, 1))
        step = max(1, self.CHUNK_BYTES // (4 * row_numel))
        where = self.reader.byte_range(name)
        if where is None:
            whole = self.reader.get(name)
            for a in range(0, rows, step):
                yield a, whole[a:a + step].to(torch.float32)
            return
        path, start, _ = where
        dtype = getattr(torch, info.dtype)
        item = torch.empty((), dtype=dtype).element_size()
        # Two pooled buffers for every chunk (the stored bytes, their float32 conversion): a chunk is
        # used before the next is read (callers copy or multiply it at once), and fresh 64 MiB
        # allocations per chunk are mmap'd and page-faulted each time.
        full = (min(step, rows),) + tuple(info.shape[1:])
        out = self._buffer(full, torch.float32)
        raw = out if dtype == torch.float32 else self._buffer(full, dtype)
        fd = os.open(path, os.O_RDONLY)
        try:
            for a in range(0, rows, step):
                b = min(rows, a + step)
                stored = raw[:b - a]
                if not _pread_full(fd, memoryview(stored.reshape(-1).view(torch.uint8).numpy()),
                                   start + a * row_numel * item):
                    raise OSError(f"{path}: short read of tensor {name!r}")
                if stored.data_ptr() != out.data_ptr():
                    out[:b - a].copy_(stored)
                yield a, out[:b - a]
        finally:
            os.close(fd)
            self._give_back(out)
            if raw is not out:
                self._give_back(raw)
        self.reader.count_copy(info.nbytes)

    def _rows(self, param, used):
        """float32 rows ``used`` (sorted, unique row indices) of the stored tensor behind ``param``,
        read straight from their byte ranges (runs of adjacent rows in one read): a few hundred ids
        read a few hundred rows, not the vocabulary. None when the tensor is not a byte range of a
        file (built by a converter) or its shape is not ``param``'s: the caller reads it in chunks."""
        import torch

        name = self._stored_name([full for _, _, full in self._slots[id(param)]])
        info = self.reader.info(name)
        where = self.reader.byte_range(name)
        if where is None or tuple(info.shape) != tuple(param.shape) or len(info.shape) != 2:
            return None
        path, start, _ = where
        dtype = getattr(torch, info.dtype)
        row_bytes = int(info.shape[1]) * torch.empty((), dtype=dtype).element_size()
        idx = [int(i) for i in used]
        if idx and (idx[0] < 0 or idx[-1] >= int(info.shape[0])):
            return None
        out = torch.empty(len(idx), int(info.shape[1]), dtype=torch.float32)
        nbytes = 0
        with open(path, "rb") as f:
            k = 0
            while k < len(idx):
                e = k + 1
                while e < len(idx) and idx[e] == idx[e - 1] + 1:
                    e += 1
                buf = bytearray((e - k) * row_bytes)
                if not _pread_full(f.fileno(), memoryview(buf), start + idx[k] * row_bytes):
                    raise OSError(f"{path}: short read of tensor {name!r}")
                out[k:e] = torch.frombuffer(buf, dtype=dtype).reshape(e - k, -1).to(torch.float32)
                nbytes += len(buf)
                k = e
        self.reader.count_copy(nbytes)
        return out

    def _compact_embedding(self, ids):
        """The input embedding answering for ``ids`` only: the rows of the ids that occur (read row
        run by row run, :meth:`_rows`; chunk by chunk where the tensor is not a byte range of a file),
        behind the module's own forward (scaled embeddings keep their scale)."""
        import copy

        import torch

        weight = self.in_emb.weight
        if weight.device.type != "meta" or not isinstance(self.in_emb, torch.nn.Embedding):
            return None
        used = torch.unique(torch.cat([i.reshape(-1) for i in ids]))
        rows = self._rows(weight, used)
        if rows is None:
            rows = torch.empty(len(used), weight.shape[1], dtype=torch.float32)
            for a, chunk in self._row_chunks(weight):
                sel = (used >= a) & (used < a + chunk.shape[0])
                rows[sel] = chunk[used[sel] - a]
        mod = copy.copy(self.in_emb)
        mod._parameters = dict(self.in_emb._parameters)
        mod._parameters["weight"] = torch.nn.Parameter(rows, requires_grad=False)
        mod.padding_idx = None  # only gradients read it
        mod.__dict__.pop("forward", None)
        fwd = type(self.in_emb).forward

        def forward(input_ids, *a, **k):
            if input_ids.device.type == "meta":  # the values are gone: never embed uninitialised memory
                raise LayerwiseUnsupported("the model moved the token ids to the meta device before embedding")
            return fwd(mod, torch.searchsorted(used, input_ids.contiguous()), *a, **k)

        return forward

    def _inputs(self, steps, n, DynamicCache):
        import torch

        emb = []
        compact = self._compact_embedding([st.kwargs["input_ids"] for st in steps])
        meta_weight = None
        if compact is not None:
            self.in_emb.forward = compact
            # A model may move the ids to the embedding weight's device first (Llama-4:
            # `embed_tokens(input_ids.to(embed_tokens.weight.device))`): with the weight on the meta
            # device the ids would lose their values. Stand in a CPU weight of its shape that holds
            # no memory (stride 0); the compact forward never reads it.
            meta_weight = self.in_emb._parameters["weight"]
            self.in_emb._parameters["weight"] = torch.nn.Parameter(
                torch.zeros(1, dtype=meta_weight.dtype).expand(meta_weight.shape), requires_grad=False)
        else:
            emb = self.load(self._params(self.in_emb))
        try:
            for st in steps:
                kw = dict(st.kwargs)
                if self.causal:
                    kw["use_cache"] = st.cache_len >= 0
                if st.cache_len >= 0:
                    kw[self.cache_kw] = self._stand_in_cache(DynamicCache, st.kwargs["input_ids"].shape[0], st.cache_len)
                for i, layer in enumerate(self.layers):
                    layer.forward = self._recorder(st, i, n)
                try:
                    self.model(**kw)
                except _Stop:
                    pass
                except Exception as e:  # noqa: BLE001 - a forward that never reached the last layer
                    if len(st.calls) == n:  # (e.g. the list found is another tower's, GIT's vision
                        raise  # layers) touched weights left on the meta device: not drivable
                    raise LayerwiseUnsupported(f"the forward called {len(st.calls)} of {n} decoder layers "
                                               f"before failing ({type(e).__name__})") from None
                if len(st.calls) != n:
                    raise LayerwiseUnsupported(f"the forward called {len(st.calls)} of {n} decoder layers")
        finally:
            self.in_emb.__dict__.pop("forward", None)
            if meta_weight is not None:
                self.in_emb._parameters["weight"] = meta_weight
            self.free(emb)

    def _stand_in_cache(self, DynamicCache, batch: int, length: int):
        import torch

        cache = DynamicCache(config=self.config)
        if length:
            z = torch.zeros(batch, 1, length, 1)
            layers = getattr(cache, "layers", None)
            for i in range(len(self.layers)):
                if isinstance(layers, list) and i < len(layers) and not hasattr(layers[i], "update"):
                    continue  # a hybrid's linear-attention / state-space cache layer: it holds no positions
                try:
                    cache.update(z, z, i)
                except NotImplementedError:  # a placeholder layer (Nemotron-H's Mamba / MLP layers)
                    continue
        return cache

    @staticmethod
    def _recorder(st: _Step, i: int, n: int):
        def record(*args, **kwargs):
            if args:
                h, rest = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                h, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                st.h = h
            st.calls.append((rest, kwargs))
            if i == n - 1:
                raise _Stop
            return h

        return record

    def _layers(self, steps, DynamicCache, *, start: int = 0, caches: dict | None = None, capture: int = 0):
        from transformers.cache_utils import Cache

        if caches is None:
            caches = {}
        for st in steps:
            if st.cache_len >= 0 and st.cache not in caches:
                caches[st.cache] = DynamicCache(config=self.config)
        cap = None
        if capture > 0:
            cap = Prefix(capture, [(st.job, st.cache_len, st.h.clone()) for st in steps],
                         [list(st.calls[:capture]) for st in steps], [], caches)

        def swap(v, st):
            return caches[st.cache] if isinstance(v, Cache) else v

        def lengths(cache):
            return [layer.get_seq_length() for layer in getattr(cache, "layers", None) or []]

        # The next layer is read (and converted to float32) while this one runs, where two layers'
        # float32 weights stay under READ_AHEAD_MAX_BYTES each (memory: two layers instead of one).
        ahead = len(self.layers) - start > 1 and 4 * sum(
            p.numel() for p in self._params(self.layers[start])) <= self.READ_AHEAD_MAX_BYTES
        pending = None  # (thread, id(param) -> tensor) reading the next layer
        try:
            for i, layer in enumerate(self.layers):
                if i < start:  # taken from the capture of an identical model (see _reuse)
                    layer.__dict__.pop("forward", None)
                    for st in steps:
                        st.calls[i] = None
                    continue
                layer.__dict__.pop("forward", None)
                ready = None
                if pending is not None:
                    pending[0].join()
                    ready, pending = pending[1], None
                w = self.load(self._params(layer), ready)
                if ready:  # read ahead but not asked for (a parameter shared with a layer loaded already)
                    self._drop_read_ahead((None, ready))
                if ahead and i + 1 < len(self.layers):
                    pending = self._read_ahead(self.layers[i + 1])
                gemms = _weight_major_linears(layer)
                try:
                    for st in steps:
                        args, kwargs = st.calls[i]
                        args = tuple(swap(a, st) for a in args)
                        kwargs = {k: swap(v, st) for k, v in kwargs.items()}
                        before = lengths(caches[st.cache]) if st.cut else None
                        out = layer(st.h, *args, **kwargs)
                        if st.cut:  # the cache layers this layer wrote: cut to the prefill (see Job.prefill_from)
                            cache = caches[st.cache]
                            for k, now in enumerate(lengths(cache)):
                                if k >= len(before) or now != before[k]:
                                    cut_cache_layer(cache.layers[k], *st.cut)
                        if isinstance(out, (tuple, list)):  # a list: OpenAI GPT's Block
                            self.layer_returns_tuple = True
                            out = out[0]
                        st.h = out
                        st.calls[i] = None  # the arguments of a layer are not needed again
                finally:
                    for mod in gemms:
                        mod.__dict__.pop("forward", None)
                    self.free(w)
                if cap is not None and i == capture - 1:
                    cap.outputs = [st.h for st in steps]  # layers do not modify their input in place
                    cap.returns_tuple = self.layer_returns_tuple
        finally:
            self._drop_read_ahead(pending)
        self.captured = cap

    def _reuse(self, steps, prefix: "Prefix"):
        """(first layer to compute, the KV caches to continue) for reusing ``prefix``: its layers
        are byte-identical to ours (the caller checked the weights and config); here the inputs
        are checked: the same steps, bitwise the same hidden states entering layer 0 and bitwise
        the same arguments (masks, position embeddings, cache positions) to every reused layer.
        Then this model's layers 0..k-1 would compute, op for op, what the captured ones did, and
        their outputs (and the KV-cache layers they wrote) are taken from the capture. Anything
        different: nothing is reused and :attr:`reuse_note` says what."""
        k = prefix.layers
        why = None
        if len(steps) != len(prefix.inputs) or k > len(self.layers) or prefix.outputs is None:
            why = "the runs differ in steps"
        else:
            for si, (st, (job, cache_len, h0)) in enumerate(zip(steps, prefix.inputs)):
                if (st.job, st.cache_len) != (job, cache_len) or not _same(st.h, h0):
                    why = f"the hidden states entering layer 0 differ ({st.job})"
                    break
                bad = next((i for i in range(k) if not _same(st.calls[i], prefix.calls[si][i])), None)
                if bad is not None:
                    why = f"the arguments of layer {bad} differ ({st.job})"
                    break
        caches: dict[str, Any] = {}
        if why is None:
            for job, c in prefix.caches.items():
                layers = getattr(c, "layers", None)
                if not isinstance(layers, list) or len(layers) < k:
                    why = "the KV cache has no per-layer list"
                    break
                mine = type(c)(config=self.config)
                if not isinstance(getattr(mine, "layers", None), list) or len(mine.layers) < k:
                    why = "the KV cache has no per-layer list"
                    break
                mine.layers[:k] = layers[:k]  # the state layers 0..k-1 would have after every step
                caches[job] = mine
        if why is not None:
            self.reuse_note = f"identical leading layers not reused: {why}"
            return 0, None
        for st, h in zip(steps, prefix.outputs):
            st.h = h
        self.layer_returns_tuple = self.layer_returns_tuple or prefix.returns_tuple
        self.reused_layers = k
        return k, caches

    def _outputs(self, steps, n) -> dict[str, Any]:
        """Final norm, LM head and logit post-processing of the model's own forward. A plain
        ``Linear`` head is applied chunk by chunk over the vocabulary: one forward per step records
        the head's input, the head's rows are read once (chunk by chunk) for every step, and a
        second forward hands the model those logits (soft-capping and the like stay the model's)."""
        import torch

        wrap = (lambda h: (h,)) if self.layer_returns_tuple else (lambda h: h)
        width = self.in_emb.weight.shape[-1]
        self.in_emb.forward = lambda input_ids, *a, **k: torch.zeros(*input_ids.shape, width, dtype=torch.float32)
        out = self.out_emb
        chunked = (isinstance(out, torch.nn.Linear) and out.weight.device.type == "meta"
                   and (out.bias is None or out.bias.device.type == "meta"))
        head = self.load(self._params(out)) if out is not None and not chunked else []
        chunks: dict[str, list] = {}

        def forward(st, head_forward=None):
            for i, layer in enumerate(self.layers):
                if i == 0:
                    layer.forward = (lambda h: lambda *a, **k: wrap(h))(st.h)
                else:
                    layer.forward = lambda *a, **k: wrap(a[0] if a else k["hidden_states"])
            if head_forward is not None:
                out.forward = head_forward
            kw = dict(st.kwargs)
            if self.causal:
                kw["use_cache"] = False
            return self.model(**kw).logits.float()

        try:
            if chunked:
                V = out.weight.shape[0]
                seen: list = []

                def record(h, *a, **k):
                    seen.append(h)
                    return torch.zeros(*h.shape[:-1], V, dtype=torch.float32)

                for st in steps:
                    forward(st, record)
                hs, seen = seen, []
                if len(hs) != len(steps):
                    raise LayerwiseUnsupported("the LM head ran other than once per forward")
                logits = [torch.empty(*h.shape[:-1], V, dtype=torch.float32) for h in hs]
                bias = self.load([out.bias]) if out.bias is not None else []
                try:
                    for a, w in self._row_chunks(out.weight):
                        b = a + w.shape[0]
                        for h, lg in zip(hs, logits):
                            lg[..., a:b] = _linear(h, w, bias[0][a:b] if bias else None)
                finally:
                    self.free(bias)
                del hs
                for st, lg in zip(steps, logits):
                    chunks.setdefault(st.job, []).append(forward(st, (lambda x: lambda *a, **k: x)(lg)))
                    st.h = None
            else:
                for st in steps:
                    chunks.setdefault(st.job, []).append(forward(st))
                    st.h = None
        finally:
            self.in_emb.__dict__.pop("forward", None)
            if out is not None:
                out.__dict__.pop("forward", None)
            for layer in self.layers:
                layer.__dict__.pop("forward", None)
            self.free(head)
        return {k: (v[0] if len(v) == 1 else torch.cat(v, dim=1)) for k, v in chunks.items()}

    def vocab(self) -> int:
        return int(self.out_emb.weight.shape[0]) if self.out_emb is not None else int(self.config.vocab_size)

    def close(self):
        self._pool.clear()
        self.reader.close()


def run_layerwise(path, jobs: list[Job]) -> dict[str, Any]:
    """float32 logits per job name for the model directory ``path``, layer by layer."""
    m = LayerwiseModel(path)
    try:
        return m.run(jobs)
    finally:
        m.close()
