"""Names between the compiler and the files: the stored class of a checkpoint.

The IR (and so every TensorProgram) names tensors as transformers' head class holds them in memory
(``LlamaForCausalLM``: ``model.layers.0...``, ``lm_head.weight``; ``BertForMaskedLM``: ``bert.*``,
``cls.*``). A checkpoint saved from the headless base class (``LlamaModel``, ``BertModel``, as
sentence-embedding models ship) stores the base model's tensors without the ``base_model_prefix``
and has no head; BERT's base class adds a pooler that the masked-LM class lacks.

:func:`headless_prefix` discovers that from the config (``architectures`` names the family's base
class in transformers' ``MODEL_MAPPING_NAMES``) and the stored names (none under the prefix).
:func:`to_stored_class` rewrites a program for such a checkpoint: outputs of the head are dropped,
the prefix is stripped from the rest, and stored tensors the traced class does not have (the pooler)
are copied through when the plan leaves every dimension group at its size (refused otherwise,
naming them: the compiler knows no reader/writer roles for them).
"""

from __future__ import annotations

from typing import Any, Iterable


class StoredClassError(ValueError):
    """The checkpoint's stored class cannot be grown by this plan (message is user-facing)."""


def base_class_name(config: dict[str, Any]) -> str | None:
    """transformers' headless base class for the config's ``model_type`` (``LlamaModel``)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except ImportError:
        return None
    name = MODEL_MAPPING_NAMES.get(config.get("model_type"))
    return name if isinstance(name, str) else None


def headless_prefix(config: dict[str, Any], stored: Iterable[str]) -> str | None:
    """``base_model_prefix`` of the head class when the checkpoint holds the headless base class:
    ``architectures`` names the base class and no stored tensor is under the prefix. None otherwise."""
    arch = (config.get("architectures") or [None])[0]
    base = base_class_name(config)
    if not arch or arch != base:
        return None
    try:
        import transformers

        prefix = getattr(getattr(transformers, arch), "base_model_prefix", None)
    except (ImportError, AttributeError):
        return None
    if not prefix or any(n.startswith(prefix + ".") for n in stored):
        return None
    return prefix


def to_stored_class(program, reader, *, grows_width: bool) -> None:
    """Rewrite ``program`` (in place) for a headless checkpoint (``reader.base_prefix`` set).

    Raises :class:`StoredClassError` when the checkpoint stores tensors that the traced class does
    not have and the plan changes a dimension they may span."""
    from scaler_wizard.compiler.program import Load

    prefix = reader.base_prefix
    if not prefix:
        return
    dot = prefix + "."
    kept = {}
    for name, out in program.outputs.items():
        if not name.startswith(dot):
            continue  # the head: not part of the stored class
        out.name = name[len(dot):]
        kept[out.name] = out
    covered = set(kept)
    extra = [n for n in reader.names() if n not in covered]
    if extra and grows_width:
        raise StoredClassError(
            f"{reader.path} stores the headless {reader.config.get('architectures', ['?'])[0]} with "
            f"tensor(s) the traced class lacks ({', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}); "
            "their roles are unknown, so a plan that widens a dimension cannot grow them. Depth-only plans "
            "copy them through.")
    program.outputs.clear()
    program.outputs.update(kept)
    for n in extra:  # unchanged tensors of the stored class (BERT's pooler): the hidden state they read is kept
        program.copy_through(n, reader.shape(n), None)
    if program.outputs and not any(isinstance(n, Load) for n in program.nodes()):
        raise StoredClassError("nothing of the stored class is read")
    patch = program.config_patch
    if "architectures" in patch:  # upcycle names the new family's head class: keep the stored base class
        new_base = base_class_name({"model_type": patch.get("model_type", reader.config.get("model_type"))})
        if new_base:
            patch["architectures"] = [new_base]
