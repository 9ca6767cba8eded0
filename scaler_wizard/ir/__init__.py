"""The model IR: discovered by tracing, cached on disk.

    model_ir_for(ref_or_config_dict, *, use_cache=True) -> ModelIR
    discover(config) -> ModelIR            # always traces (imports torch + transformers)
    instantiate(ir, num_layers) -> ModelIR # per-layer tensors for another depth

The cache-hit path imports neither torch nor transformers. Two levels:

1. exact: a hash of the config dict with the depth and per-layer arrays normalised away, the
   transformers version (read from package metadata) and IR_FORMAT_VERSION; the cached IR is
   re-instantiated for the real depth;
2. structure (:mod:`scaler_wizard.ir.structure`): a hash with every number replaced by its equality
   class, so a config whose structure was traced once (at any sizes) is re-bound to its own sizes
   without a trace (``<cache>/structure/<key>.json`` holds the traced IR and the config it came
   from); when re-binding cannot account for a value, the config is traced as before.

Both levels re-index the cached IR by the config's per-layer arrays (:func:`instantiate`); an array
the file leaves to the config class (``layer_types`` of a Qwen2 / Gemma-3 config written before
transformers 4.53) is derived first (:func:`with_derived_arrays`: memoised per config when it is
traced; otherwise the config object is built, importing transformers and torch but tracing nothing).
A real layer whose kind the cached IR never traced (an exact key has no depth: Gemma-3's pattern puts
the first full-attention layer at index 5) makes the entry unusable, and the config is traced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from scaler_wizard.ir.errors import IRDiscoveryError
from scaler_wizard.ir.model_ir import IR_FORMAT_VERSION, ModelIR

__all__ = ["model_ir_for", "discover", "instantiate", "with_derived_arrays", "cache_dir", "cache_key", "structure_key_of", "IRDiscoveryError", "ModelIR"]

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def cache_dir() -> Path:
    base = os.environ.get("SCALER_WIZARD_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "scaler_wizard"
    return root / "ir"


@functools.cache
def _transformers_version() -> str:
    """The version of the transformers that would be imported (``"none"`` when it is not installed),
    for the cache keys. Read from the ``__version__ = "..."`` line of its ``__init__.py`` without
    importing it: ``importlib.metadata`` costs 40-70 ms of every cached check and apply (it imports
    the ``email`` package to parse METADATA). Falls back to the package metadata when that line is
    not found."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("transformers")
    if spec is None:
        return "none"
    try:
        with open(spec.origin, encoding="utf-8") as f:
            m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.M)
        if m:
            return m.group(1)
    except (OSError, TypeError):  # TypeError: a namespace package has no origin
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "none"


def _normalised(cfg: dict) -> dict:
    """The config with depth and per-layer arrays removed (they do not change the traced IR)."""
    n = next((cfg[k] for k in _LAYER_KEYS if isinstance(cfg.get(k), int)), None)
    out = {}
    for k, v in cfg.items():
        if k in _LAYER_KEYS or k.startswith("_") or k in ("transformers_version", "_name_or_path", "architectures_"):
            continue
        if isinstance(v, list) and n and len(v) == n:
            v = sorted({json.dumps(x, sort_keys=True) for x in v})  # which layer kinds exist, not where
        out[k] = v
    return out


def cache_key(cfg: dict) -> str:
    blob = json.dumps({"cfg": _normalised(cfg), "tf": _transformers_version(), "fmt": IR_FORMAT_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def discover(config, *, size_constants: bool = True) -> ModelIR:
    """Trace ``config`` (a transformers PretrainedConfig or a config dict) and build its IR.
    ``size_constants=False`` leaves out the differential traces of the size-dependent constants
    (``ModelIR.size_constants`` empty): an IR for reading sizes only, never to be cached."""
    if isinstance(config, dict):
        config = _config_from_dict(config)
    from scaler_wizard.ir.discovery import build_ir
    from scaler_wizard.ir.errors import IRDiscoveryError

    try:
        return build_ir(config, size_constants=size_constants)
    except (IRDiscoveryError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a model discovery cannot handle is a refusal (SW401), not a traceback
        import traceback

        last = traceback.extract_tb(e.__traceback__)[-1]
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise IRDiscoveryError(f"discovery failed on this model: {type(e).__name__}: {first[:200]} "
                               f"[{last.filename.rsplit('/', 1)[-1]}:{last.lineno}]",
                               module=type(config).__name__) from e


def _config_from_dict(d: dict):
    from transformers import AutoConfig

    from scaler_wizard.ir.config import decode_special_floats

    d = decode_special_floats(dict(d))
    mt = d.pop("model_type", None)
    if not mt:
        raise IRDiscoveryError("config has no model_type")
    try:
        return AutoConfig.for_model(mt, **{k: v for k, v in d.items() if k not in ("transformers_version",)})
    except (ValueError, KeyError) as e:
        if d.get("auto_map"):
            raise IRDiscoveryError(f"model_type {mt!r} needs custom code (auto_map in config.json); scaler-wizard "
                                   "does not run code shipped with a model") from e
        first = str(e).split(". ")[0][:200]  # transformers appends every model_type it knows
        raise IRDiscoveryError(f"transformers does not know model_type {mt!r}: {first}") from e


def _layer_lists(cfg: dict, n: int) -> tuple[str, ...]:
    return tuple(k for k, v in cfg.items() if isinstance(v, list) and len(v) == n and not k.startswith("_"))


def instantiate(ir: ModelIR, cfg: dict) -> ModelIR:
    """Re-index per-layer facts for the real depth and per-layer arrays of ``cfg``.

    Each real layer is mapped to the traced layer with the same signature (its per-layer array
    entries); tensors, norms and MoE facts list the real layers that have them. ``cfg`` must hold
    the per-layer arrays the IR was traced with (:func:`with_derived_arrays` adds the ones the config
    class derives); ValueError when a real layer's signature is not among the traced ones (the IR
    cannot describe that layer: the caller traces)."""
    from scaler_wizard.ir.trace import layer_signatures

    n = next((cfg[k] for k in (ir.layers_key,) + _LAYER_KEYS if isinstance(cfg.get(k), int)), ir.num_layers)
    # The depth as the IR's own config dict serialises it: a config class may write another number
    # than the depth of the model it builds (Dory stores each layer as an attention block and an
    # MLP block: config.json says 2 where the model has 1 layer). The dict's value is then no layer
    # count, and only the same serialised depth means the same layout.
    stored = next((ir.config[k] for k in (ir.layers_key,) + _LAYER_KEYS if isinstance(ir.config.get(k), int)),
                  ir.num_layers)
    same_arrays = all(cfg.get(k) == ir.config.get(k) for k in ir.layer_arrays)
    if stored != ir.num_layers:
        if n == stored and same_arrays:
            notes = tuple(x for x in ir.notes if not x.startswith("traced layer "))
            return replace(ir, config=cfg, notes=notes)
        raise ValueError(f"the config serialises its depth as {stored} for a model of {ir.num_layers} layers: "
                         f"a config with depth {n} cannot be re-indexed from it")
    if n == ir.num_layers and same_arrays:
        # the same layout: the traced facts stand as they are (layers told apart by a scalar key,
        # first_k_dense_replace, have no array signature to re-index by)
        notes = tuple(x for x in ir.notes if not x.startswith("traced layer "))
        return replace(ir, config=cfg, notes=notes)
    old_sigs, _ = layer_signatures(ir.config, ir.num_layers, ir.layer_arrays)
    new_sigs, _ = layer_signatures(cfg, n, ir.layer_arrays)
    untraced = sorted(set(new_sigs) - set(old_sigs), key=repr)
    if untraced:
        raise ValueError(f"layer signature(s) {untraced} not traced (traced: {sorted(set(old_sigs), key=repr)})")
    # traced-kind representative: old layer index -> signature; new layer -> old layers with that signature
    by_sig: dict[tuple, set[int]] = {}
    for i, s in enumerate(new_sigs):
        by_sig.setdefault(s, set()).add(i)

    def remap(layers):
        if layers is None:
            return None
        sigs = {old_sigs[i] for i in layers if i < len(old_sigs)}
        return tuple(sorted(i for s in sigs for i in by_sig.get(s, ())))

    tensors = tuple(replace(t, layers=remap(t.layers)) for t in ir.tensors)
    norms = tuple(replace(x, layers=remap(x.layers)) for x in ir.norms)
    moe = replace(ir.moe, layers=remap(ir.moe.layers) or ()) if ir.moe else None
    notes = tuple(x for x in ir.notes if not x.startswith("traced layer "))
    mixers = tuple(replace(m, layers=remap(m.layers) or ()) for m in ir.mixers)
    shapes = tuple(replace(a, layers=remap(a.layers) or ()) for a in ir.attention_shapes)
    return replace(ir, config=cfg, num_layers=n, tensors=tensors, norms=norms, moe=moe, notes=notes, mixers=mixers,
                   attention_shapes=shapes)


def model_ir_for(ref_or_config_dict: Any, *, use_cache: bool = True, size_constants: bool = True) -> ModelIR:
    """The IR of a model reference (path, GGUF, short name, hub id) or a config dict.

    ``size_constants=False`` is for callers that read only the sizes (groups, depth, parameter
    count: verification's re-trace of a grown model): a cached IR is used as usual, but on a miss the
    config is traced without the size-constant question (2-3 exports fewer) and, the IR being
    partial (``size_constants`` empty), nothing is written to the cache."""
    if isinstance(ref_or_config_dict, dict):
        cfg = ref_or_config_dict
    else:
        from scaler_wizard.ir.config import load_config_dict

        cfg, _ = load_config_dict(str(ref_or_config_dict))
    key = cache_key(cfg)
    path = cache_dir() / f"{key}.json"
    if use_cache and path.is_file():
        try:
            ir = ModelIR.from_json(path.read_text())
            return instantiate(ir, with_derived_arrays(ir, cfg))
        except (ValueError, KeyError, TypeError):
            pass  # a stale or corrupt entry, or layer kinds it was not traced with: trace again
    spath = cache_dir() / "structure" / f"{structure_key_of(cfg)}.json"
    if use_cache and spath.is_file():
        ir = _from_structure(spath, cfg)
        if ir is not None:
            return ir
    ir = discover(cfg, size_constants=size_constants)
    if use_cache and size_constants:
        derived = _derived_of(ir, cfg)
        if derived:
            _write(_derived_path(cfg), json.dumps(derived, sort_keys=True, default=str))
        _write(path, ir.to_json())
        _write(spath, json.dumps({"config": cfg, "ir": json.loads(ir.to_json())}, sort_keys=True, default=str))
    return ir


def _derived_of(ir: ModelIR, cfg: dict) -> dict[str, list]:
    """The per-layer arrays of a freshly traced ``ir`` (its config is the config class's ``to_dict``)
    that the raw ``cfg`` leaves to the class (``layer_types`` of a Qwen2 or Gemma-3 config written
    before transformers 4.53: derived from ``max_window_layers`` / ``sliding_window_pattern``)."""
    return {k: ir.config[k] for k in ir.layer_arrays
            if not isinstance(cfg.get(k), list) and isinstance(ir.config.get(k), list)}


def _derived_path(cfg: dict) -> Path:
    blob = json.dumps({"cfg": cfg, "tf": _transformers_version(), "fmt": IR_FORMAT_VERSION}, sort_keys=True, default=str)
    return cache_dir() / "derived" / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"


def with_derived_arrays(ir: ModelIR, cfg: dict) -> dict:
    """``cfg`` (a raw config dict) with the per-layer arrays of ``ir.layer_arrays`` that it leaves to
    the config class, as the class derives them for ``cfg``'s own depth and keys: a cached IR is
    re-indexed by these arrays (:func:`instantiate`) and the type checker re-indexes and re-summarises
    them for depth ops, so a derived ``layer_types`` must be as present as a stated one. Memoised on
    disk per raw config (written when the config is traced); a miss builds the config object
    (imports transformers and torch)."""
    missing = [k for k in ir.layer_arrays if not isinstance(cfg.get(k), list)]
    if not missing:
        return cfg
    path = _derived_path(cfg)
    derived = None
    try:
        derived = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(derived, dict) or any(k not in derived for k in missing):
        try:
            full = _config_from_dict(cfg).to_dict()
        except Exception as e:  # noqa: BLE001 - the config class refuses cfg: the caller traces (and reports)
            raise ValueError(f"config class refused the config: {e}") from e
        derived = {k: full[k] for k in missing if isinstance(full.get(k), list)}
        _write(path, json.dumps(derived, sort_keys=True, default=str))
    return {**cfg, **{k: v for k, v in derived.items() if k in missing}}


def structure_key_of(cfg: dict) -> str:
    """The structure cache key of a raw config dict (see :mod:`scaler_wizard.ir.structure`)."""
    from scaler_wizard.ir.structure import structure_key

    return structure_key(cfg, transformers_version=_transformers_version(), format_version=IR_FORMAT_VERSION)


def _from_structure(spath: Path, cfg: dict) -> ModelIR | None:
    """The IR cached for ``cfg``'s structure, re-bound to ``cfg``'s sizes and depth; None when the
    entry is unreadable or cannot be re-bound exactly."""
    from scaler_wizard.ir.model_ir import _ir_from_dict
    from scaler_wizard.ir.structure import rebind

    try:
        entry = json.loads(spath.read_text())
        old = _ir_from_dict(entry["ir"])
        ir = rebind(old, entry["config"], cfg)
        return None if ir is None else instantiate(ir, with_derived_arrays(ir, cfg))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass
