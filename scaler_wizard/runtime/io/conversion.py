"""transformers' checkpoint conversion table, applied to a reader's stored names.

transformers 5 renames some weights between disk and memory and builds others from several stored
tensors (legacy per-expert MoE layouts -> stacked ``experts.gate_up_proj``). :func:`find_aliases`
applies transformers' own table (``transformers.conversion_mapping``): renames become
``reader.aliases``; converters (``MergeModulelist``, ``Concatenate``, ...) become ``reader.virtual``
tensors whose shape and dtype come from running the converter on meta tensors (no data read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scaler_wizard.runtime.io.header import TensorInfo


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
    needs_model: bool = False  # an op sizes its outputs by the model's parameters (Split)

    @property
    def stored(self) -> list[str]:
        return [n for _, names in self.sources for n in names]


def converter_model(reader):
    """The checkpoint's class built on the meta device from its config (cached on the reader): the
    model argument of conversion ops that size their outputs by the model's parameters (``Split``:
    Sarvam-MoE's fused ``query_key_value`` rows split by q / k / v sizes). None when it cannot be built."""
    if not hasattr(reader, "_converter_model"):
        try:
            from scaler_wizard.runtime.naming import meta_model_for

            reader._converter_model = meta_model_for(reader.config)
        except Exception:  # noqa: BLE001 - no model: such ops stay unconverted
            reader._converter_model = None
    return reader._converter_model


def _run_converter(converter, layer_name: str, sources, load, model=None) -> dict[str, Any]:
    """Run a transformers WeightConverter the way ``convert_and_load_state_dict_in_model`` does:
    collect the tensors per source pattern (in load order), then ``converter.convert(layer_name)``
    (which applies the operations in order and expands target patterns to full names).
    ``load(name)`` gives the stored tensor (real, or a meta tensor for shapes); with ``model``, its
    config goes with it, as the loader passes both (Inkling-2's ``Inkling2UnpadVocab`` reads the
    text config's ``unpadded_vocab_size`` and the parameter's dtype)."""
    import copy as _copy

    conv = _copy.deepcopy(converter)  # convert() consumes the collected tensors; keep the table clean
    for pattern, names in sources:
        for n in names:
            conv.add_tensor(layer_name, n, pattern, load(n))
    if model is None:
        return conv.convert(layer_name)
    return conv.convert(layer_name, model=model, config=getattr(model, "config", None))


def find_aliases(reader) -> None:
    """transformers 5 renames some weights between disk and memory (GPT-NeoX stores
    ``embed_out`` for the module ``lm_head``) and merges others (Mixtral's legacy
    ``block_sparse_moe.experts.E.w1/w3`` -> stacked ``mlp.experts.gate_up_proj``). Expose the
    in-memory names, which the IR uses, through transformers' own conversion table, applied as
    its loader does (every renaming in turn, then at most one converter per stored key):
    renames become ``aliases``, converters become lazy ``virtual`` tensors.

    Whether the table has entries for the checkpoint's class is a cached fact
    (:mod:`scaler_wizard.runtime.io.facts`): for the many families without entries, nothing of
    transformers (nor torch) is imported."""
    arch = (reader.config.get("architectures") or [None])[0]
    model_type = reader.config.get("model_type")
    if not has_conversions(arch, model_type):
        return
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter, WeightRenaming, apply_converters, apply_renamings, dot_natural_key,
        )
    except ImportError:  # an older transformers: names on disk are names in memory
        return
    transforms = (arch and get_checkpoint_conversion_mapping(arch)) or get_checkpoint_conversion_mapping(
        model_type
    ) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    # target key -> (converter, {source pattern -> stored names})
    groups: dict[str, tuple[Any, dict[str, list[str]]]] = {}
    # transformers collects a converter's tensors in natural key order (expert 2 before 10)
    for stored in sorted(reader._infos, key=dot_natural_key):
        model_name = apply_renamings(stored, renamings)
        target, pattern = apply_converters(model_name, converters) if converters else (model_name, None)
        if pattern is not None and target not in reader._infos:
            conv = next(c for c in converters if pattern in c.source_patterns)
            groups.setdefault(target, (conv, {}))[1].setdefault(pattern, []).append(stored)
        elif model_name != stored and model_name not in reader._infos:
            reader.aliases[model_name] = stored
    for target, (conv, by_pattern) in groups.items():
        add_virtual(reader, conv, target, by_pattern)
    # ties were found under stored names; make them reachable under model names too
    for absent, stored in list(reader.tied.items()):
        renamed = apply_renamings(absent, renamings)
        if renamed != absent:
            reader.tied[renamed] = stored


def has_conversions(arch: str | None, model_type: str | None) -> bool:
    """Whether transformers' checkpoint conversion table has entries for the class ``arch`` (an
    ``architectures`` entry) or, failing that, ``model_type`` (cached per transformers version)."""
    def compute() -> bool:
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        except ImportError:
            return False
        return bool((arch and get_checkpoint_conversion_mapping(arch)) or get_checkpoint_conversion_mapping(model_type))

    from scaler_wizard.runtime.io.facts import cached_fact

    return bool(cached_fact("conversion", [arch, model_type], compute, lambda v: isinstance(v, bool)))


def add_virtual(reader, conv, layer_name: str, by_pattern: dict[str, list[str]]) -> None:
    """Shapes/dtypes of a converter's outputs from running it on meta tensors (headers only)."""
    import torch

    # keep the converter's pattern order (Concatenate relies on it), not dict insertion order
    sources = tuple((p, tuple(by_pattern[p])) for p in conv.source_patterns if p in by_pattern)

    def meta(n: str):
        i = reader._infos[n]
        return torch.empty(i.shape, dtype=getattr(torch, i.dtype), device="meta")

    model = None
    try:
        outs = _run_converter(conv, layer_name, sources, meta)
    except Exception as e:  # an op needing the model or a config object (Split, Chunk by config)
        model = converter_model(reader)
        try:
            if model is None:
                raise e
            outs = _run_converter(conv, layer_name, sources, meta, model=model)
        except Exception as e2:  # noqa: BLE001
            reader.unconverted.append((conv, f"{type(e2).__name__}: {e2}"))
            return
    for name, t in outs.items():
        if name in reader._infos:
            continue
        info = TensorInfo(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), "")
        reader.virtual[name] = VirtualTensor(name, conv, layer_name, sources, info, needs_model=model is not None)
