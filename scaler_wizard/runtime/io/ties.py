"""Tied weights: which output embedding is absent from the files because it is the input one."""

from __future__ import annotations


def find_ties(reader) -> None:
    """Map absent tied output-embedding names to their stored input embedding."""
    if not reader.config.get("tie_word_embeddings", True):
        return
    try:
        pairs = tied_pairs(reader.config)
    except Exception:  # unknown architecture: fall back on the common names
        pairs = []
        emb = next((n for n in reader._infos if n.endswith(("embed_tokens.weight", "wte.weight",
                                                          "word_embeddings.weight", "embed_in.weight"))), None)
        if emb is not None:
            pairs = [("lm_head.weight", emb)]
    have = set(reader._infos) | set(reader.aliases)
    for absent, stored in pairs:
        if absent in reader._infos and stored in reader._infos:
            if _class_ties(reader.config):  # else both are the model's own tensors (BigBird-Pegasus, Inkling)
                _check_both_stored(reader, absent, stored)
        elif absent not in have and stored in have:
            reader.tied[absent] = stored
        elif stored not in have and absent in have:
            reader.tied[stored] = absent


def _check_both_stored(reader, a: str, b: str) -> None:
    """A config that ties ``a`` to ``b`` while the files store both with different values: transformers
    then loads them untied (it warns), so treating them as tied would change the function. Compared
    byte by byte in 64 MB blocks (safetensors files only; memory stays one block)."""
    from scaler_wizard.runtime.io.errors import CorruptCheckpointError

    ia, ib = reader._infos[a], reader._infos[b]
    if not (ia.file and ib.file):
        return  # in-memory sources (.bin: both names share one storage; GGUF)
    if ia.dtype != ib.dtype:
        return  # not comparable byte by byte; left as before
    same = ia.shape == ib.shape
    if same:
        block = 64 << 20
        with open(ia.file, "rb") as fa, open(ib.file, "rb") as fb:
            for off in range(0, ia.offsets[1] - ia.offsets[0], block):
                n = min(block, ia.offsets[1] - ia.offsets[0] - off)
                fa.seek(ia.offsets[0] + off)
                fb.seek(ib.offsets[0] + off)
                if fa.read(n) != fb.read(n):
                    same = False
                    break
    if not same:
        raise CorruptCheckpointError(
            f"{reader.path}: config.json sets `tie_word_embeddings` (true or absent), but the files store both "
            f"{a!r} and {b!r} with different values (transformers would load them untied); set "
            "`tie_word_embeddings: false` in config.json (or drop the stored copy) and run again")


def tied_pairs(config: dict) -> list[tuple[str, str]]:
    """:func:`_tied_pairs_from_model`, cached per config structure and transformers version
    (runtime/io/facts.py): the parameter names depend on which modules the class builds, not on
    sizes. A class that cannot be built raises (nothing cached)."""
    from scaler_wizard.runtime.io.facts import cached_fact, structure_of

    def valid(v) -> bool:
        return isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                           for p in v)

    got = cached_fact("ties", structure_of(config), lambda: [list(p) for p in _tied_pairs_from_model(config)], valid)
    return [(a, b) for a, b in got]


def _class_ties(config: dict) -> bool:
    """Whether transformers' model class, built from ``config`` (class defaults included), really ties
    its output embedding to its input embedding: the same Parameter after ``tie_weights()``. A config
    may leave ``tie_word_embeddings`` to a class default, or a class may tie other modules than its
    input / output embeddings (BigBird-Pegasus): only a real tie makes two different stored copies
    a contradiction. Cached per config structure; False when the class cannot be built."""
    from scaler_wizard.runtime.io.facts import cached_fact, structure_of

    def compute() -> bool:
        try:
            model = _meta_model(config)
            model.tie_weights()
            out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
            return bool(out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight)
        except Exception:  # noqa: BLE001 - not known to tie: nothing is refused on its account
            return False

    return bool(cached_fact("class-ties", structure_of(config), compute, lambda v: isinstance(v, bool)))


def _meta_model(config: dict):
    """The causal-LM class of ``config`` (a raw config dict) built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    cfg.pop("transformers_version", None)
    conf = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf)


def _tied_pairs_from_model(config: dict) -> list[tuple[str, str]]:
    """(output embedding name, input embedding name) from the real model class, built on the meta device."""
    model = _meta_model(config)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None:
        return []
    mod_names = {id(m): n for n, m in model.named_modules()}
    out_name = mod_names[id(out_emb)] + ".weight"
    in_name = mod_names[id(in_emb)] + ".weight"
    return [(out_name, in_name)] if out_name != in_name else []
