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


from scaler_wizard.compiler.conform import base_class_name  # noqa: F401 (re-exported)

class StoredClassError(ValueError):
    """The checkpoint's stored class cannot be grown by this plan (message is user-facing)."""


def _class_facts(config: dict[str, Any]) -> dict[str, Any]:
    """{"base": the family's headless base class name, "prefix": the ``base_model_prefix`` of the
    head class (``architectures`` when it names a head, else the causal / masked-LM class of the
    ``model_type``)} from transformers' auto mappings; cached per (architectures, model_type,
    transformers version) so a reader needs no import of transformers (runtime/io/facts.py)."""
    arch = (config.get("architectures") or [None])[0]
    mt = config.get("model_type")

    def compute() -> dict[str, Any]:
        try:
            import transformers
            from transformers.models.auto.modeling_auto import (
                MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES)
        except ImportError:
            return {"base": None, "prefix": None}
        base = base_class_name(config)
        head = arch if arch and arch != base else None
        if head is None:  # the class the IR is traced from (see scaler_wizard.ir.trace.build_meta_model)
            head = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt) or MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(mt)
        prefix = getattr(getattr(transformers, head, None), "base_model_prefix", None) if isinstance(head, str) else None
        return {"base": base, "prefix": prefix if isinstance(prefix, str) else None}

    from scaler_wizard.runtime.io.facts import cached_fact

    def valid(v) -> bool:
        return isinstance(v, dict) and set(v) == {"base", "prefix"} and all(
            x is None or isinstance(x, str) for x in v.values())

    return cached_fact("classes", [arch if isinstance(arch, str) else None, mt], compute, valid)


def headless_prefix(config: dict[str, Any], stored: Iterable[str]) -> str | None:
    """``base_model_prefix`` of the head class when the checkpoint holds the headless base class:
    ``architectures`` names the base class and no stored tensor is under the prefix. None otherwise."""
    arch = (config.get("architectures") or [None])[0]
    if not arch or arch != _class_facts(config)["base"]:
        return None
    return missing_prefix(config, stored)


def missing_prefix(config: dict[str, Any], stored: Iterable[str]) -> str | None:
    """The head class's ``base_model_prefix`` when no stored tensor carries it: a base class saved
    headless, or a head-class checkpoint stored in the base model's names (the hub's ``gpt2`` keeps
    ``h.0.attn...`` for ``GPT2LMHeadModel``, whose tied head has no tensor of its own); transformers
    adds the prefix on load, and so does the reader. None when the names carry it."""
    prefix = _class_facts(config)["prefix"]
    stored = list(stored)
    if not prefix or not stored or any(n.startswith(prefix + ".") for n in stored):
        return None
    return prefix


def to_stored_class(program, reader, *, traced: set[str], grows_width: bool) -> None:
    """Rewrite ``program`` (in place) for a headless checkpoint (``reader.base_prefix`` set).

    ``traced``: the in-memory names of the traced (head) class. Raises :class:`StoredClassError` when
    the checkpoint stores tensors that the traced class does not have and the plan changes a
    dimension they may span."""
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
    extra = [n for n in reader.names() if dot + n not in traced]
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


# ------------------------------------------------------------------------------ names on disk (§5)


class DiskNamingError(ValueError):
    """transformers' reverse weight conversion uses an operation this module cannot express as program ops."""


def _tracked_mode(nodes: dict[int, Any], keep: list):
    """A TorchFunctionMode that runs tensor functions on meta tensors and records, for every result, the
    program node computing it from the nodes of its inputs (only ops that move values: views, slices,
    indexing, gathers, concatenations; zeros for padding)."""
    import torch
    from torch.overrides import TorchFunctionMode

    from scaler_wizard.compiler import program as P

    def node_of(t):
        return nodes.get(id(t)) if isinstance(t, torch.Tensor) else None

    def record(t, n):
        if isinstance(t, torch.Tensor) and n is not None and tuple(t.shape) == tuple(n.shape):
            nodes[id(t)] = n
            keep.append(t)  # ids stay unique while the mode lives

    def dim_of(args, kwargs, pos, ndim, default=0):
        d = kwargs.get("dim", args[pos] if len(args) > pos else default)
        return d % ndim if ndim else 0

    def pieces(x, n, outs, d):
        start = 0
        for o in outs:
            size = o.shape[d]
            record(o, P.Slice(n, d, start, start + size))
            start += size

    def getitem(x, n, idx, out):
        """``x[idx]`` as program ops: basic slices (step >= 1), integers, one ``...`` and at most one
        list of integers (a gather that keeps its axis: Inkling-2-Loop's ``queries[:, [0, 3]]``).
        None for any other index (the result then stays unknown)."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if sum(i is Ellipsis for i in idx) > 1 or sum(isinstance(i, (list, tuple)) for i in idx) > 1:
            return None
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (x.dim() - len(idx) + 1) + idx[k + 1:]
        if len(idx) > x.dim():
            return None
        node, dropped = n, False
        for a, i in enumerate(idx):
            size = x.shape[a]
            if isinstance(i, slice):
                start, stop, step = i.indices(size)
                if step < 1:
                    return None
                if (start, stop, step) != (0, size, 1):
                    node = P.Slice(node, a, start, max(start, stop), step)
            elif isinstance(i, int) and not isinstance(i, bool) and -size <= i < size:
                node, dropped = P.Slice(node, a, i % size, i % size + 1), True
            elif isinstance(i, (list, tuple)) and i and all(
                    isinstance(v, int) and not isinstance(v, bool) and -size <= v < size for v in i):
                node = P.Index(node, a, tuple(v % size for v in i))
            else:
                return None
        return P.Reshape(node, out.shape) if dropped else node

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = getattr(func, "__name__", "")
            x = args[0] if args else None
            n = node_of(x)
            try:
                if name in ("new_zeros", "zeros", "zeros_like"):  # padding (Inkling-2's unembedding rows)
                    if isinstance(out, torch.Tensor):
                        record(out, P.Zeros(tuple(out.shape)))
                elif name == "__getitem__" and n is not None and isinstance(out, torch.Tensor):
                    got = getitem(x, n, args[1], out)
                    if got is not None:
                        record(out, got)
                elif name in ("contiguous", "clone", "detach", "to", "float") and n is not None:
                    if isinstance(out, torch.Tensor) and out.dtype == x.dtype:
                        record(out, n)
                elif name in ("chunk", "split", "tensor_split", "unbind") and n is not None:
                    d = dim_of(args, kwargs, 2 if name != "unbind" else 1, x.dim())
                    if name == "unbind":
                        for i, o in enumerate(out):
                            record(o, P.Reshape(P.Slice(n, d, i, i + 1), o.shape))
                    else:
                        pieces(x, n, out, d)
                elif name in ("squeeze", "unsqueeze", "reshape", "view", "flatten", "unflatten", "view_as",
                              "reshape_as") and n is not None:
                    record(out, P.Reshape(n, out.shape))
                elif name in ("transpose", "swapaxes", "swapdims", "t", "permute") and n is not None:
                    if name == "t":
                        dims = tuple(reversed(range(x.dim())))
                    elif name == "permute":
                        dims = tuple(args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1])
                    else:
                        a, b = (kwargs.get("dim0", args[1]), kwargs.get("dim1", args[2]))
                        p = list(range(x.dim()))
                        p[a % x.dim()], p[b % x.dim()] = p[b % x.dim()], p[a % x.dim()]
                        dims = tuple(p)
                    record(out, P.Permute(n, tuple(d % x.dim() for d in dims)))
                elif name in ("cat", "concat", "concatenate", "stack"):
                    ts = list(args[0] if args else kwargs["tensors"])
                    d = dim_of(args, kwargs, 1, out.dim())
                    if name != "stack":  # an empty piece (padding of no rows) adds nothing
                        ts = [t for t in ts if not (isinstance(t, torch.Tensor) and t.dim() == out.dim()
                                                    and t.shape[d] == 0)] or ts[:1]
                    ns = [node_of(t) for t in ts]
                    if ts and all(m is not None for m in ns):
                        if name == "stack":
                            ns = [P.Reshape(m, t.shape[:d] + (1,) + t.shape[d:]) for m, t in zip(ns, ts)]
                        record(out, ns[0] if len(ns) == 1 else P.Concat(tuple(ns), d))
            except Exception:  # noqa: BLE001 - an unexpected signature: the result stays unknown (checked below)
                pass
            return out

    return Mode()


def disk_layout(model, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None):
    """What ``model.save_pretrained`` writes for tensors named and shaped as in memory (``shapes``):
    {disk name: program node over ``Load``-free placeholders}. Runs transformers' own
    ``revert_weight_conversion`` on meta tensors while recording the ops it applies.

    Returns (layout, sources): ``layout[disk_name]`` is a node whose leaves are ``Load(memory_name)``
    placeholders; callers substitute the memory tensors' real nodes."""
    import torch

    from scaler_wizard.compiler import program as P

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers writes what it holds
        return {n: P.Load(n, s) for n, s in shapes.items()}
    nodes: dict[int, Any] = {}
    keep: list = []
    sd = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, device="meta")
        nodes[id(t)] = P.Load(name, shape)
        keep.append(t)
        sd[name] = t
    with _tracked_mode(nodes, keep):
        out = revert_weight_conversion(model, sd)
    layout = {}
    for name, t in out.items():
        n = nodes.get(id(t))
        if n is None or tuple(n.shape) != tuple(t.shape):
            raise DiskNamingError(f"cannot follow transformers' reverse conversion to {name!r} {tuple(t.shape)}")
        layout[name] = n
    return layout


def meta_model_for(config: dict[str, Any]):
    """The output class (``architectures``; a causal LM otherwise) built on the meta device from ``config``."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from scaler_wizard.ir.config import decode_special_floats

    # config.json's form: non-finite floats are {"__float__": "Infinity"} objects (Falcon-H1's time_step_limit)
    cfg = {k: decode_special_floats(v) for k, v in config.items() if k not in ("transformers_version",)}
    conf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        return cls(conf) if cls is not None else AutoModelForCausalLM.from_config(conf)


def saves_memory_names(config: dict[str, Any]) -> bool:
    """Whether ``save_pretrained`` of the class built from ``config`` writes every tensor under its
    in-memory name and shape: transformers' reverse conversion (``revert_weight_conversion``) takes
    its quick exit because the model's conversion mapping, without legacy renamings and prefix
    changes, is empty. Cached per config structure and transformers version (runtime/io/facts.py);
    False when the class cannot be built (the caller then reports why)."""
    def compute() -> bool:
        try:
            model = meta_model_for(config)
        except Exception:  # noqa: BLE001 - to_disk_names builds it again and reports the error
            return False
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange
        except ImportError:  # an older transformers writes what it holds (as disk_layout assumes)
            return True
        if getattr(model, "_weight_conversions", None) is not None:
            return False
        convs = [x for x in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(x, PrefixChange)]
        return not convs

    from scaler_wizard.runtime.io.facts import cached_fact, structure_of

    try:
        key = structure_of(config)
    except Exception:  # noqa: BLE001 - an odd config: no cache, the full path decides
        return False
    return bool(cached_fact("disk", key, compute, lambda v: isinstance(v, bool)))


def to_disk_names(program, config: dict[str, Any]):
    """A copy of ``program`` whose outputs have the names and shapes ``save_pretrained`` of the output
    class writes (per-expert tensors, ``embed_out``, ...), each computed from the in-memory output's
    node by the moves transformers' reverse conversion applies (slices, reshapes, permutes, concats),
    so the executor still streams one output at a time. The program itself is left unchanged (its
    in-memory names are what the growth record and training use)."""
    import copy

    from scaler_wizard.compiler import program as P

    if saves_memory_names(config):  # nothing to rename: no model built, no torch imported
        return program
    try:
        model = meta_model_for(config)
    except Exception as e:  # noqa: BLE001 - transformers refuses the output config: say so, never a traceback
        raise DiskNamingError(f"the output class cannot be built from the output config: {type(e).__name__}: {e}")
    layout = disk_layout(model, {n: o.node.shape for n, o in program.outputs.items()})
    if set(layout) == set(program.outputs) and all(
            isinstance(v, P.Load) and v.name == k for k, v in layout.items()):
        return program
    memo: dict[str, Any] = {}

    def subst(node):
        if isinstance(node, P.Load):
            return program.outputs[node.name].node
        got = memo.get(node.digest)
        if got is not None:
            return got
        kids = node.children()
        if not kids:  # a constant (the zero rows of a padding)
            return node
        if isinstance(node, P.Concat):
            new = P.Concat(tuple(subst(k) for k in kids), node.axis)
        else:
            new = copy.copy(node)
            object.__setattr__(new, "x", subst(node.x))
            new.__post_init__()
        memo[node.digest] = new
        return new

    disk = P.TensorProgram(config_patch=dict(program.config_patch), metadata=dict(program.metadata), seed=program.seed)
    for name, node in layout.items():
        src = next((n for n in _leaves(node)), None)
        o = program.outputs[src] if src is not None else None
        if isinstance(node, P.Load):
            disk.outputs[name] = P.Output(name, o.node, o.exactness, o.status, o.original_region, o.explain)
        else:
            disk.add(name, subst(node), exactness=o.exactness if o else "exact",
                     status=o.status if o else "new", explain=(o.explain if o else "") + f" [stored as {name}]")
    return disk


def _leaves(node):
    from scaler_wizard.compiler import program as P

    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, P.Load):
            yield n.name
        stack.extend(n.children())
