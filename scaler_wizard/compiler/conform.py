"""The output config must describe the output tensors: checked before anything is written.

The grown model is loaded by transformers from the config the compiler writes, so that config must
re-derive every tensor's shape. This module predicts the written config (the input config.json +
the plan's config patch), builds the class ``from_pretrained`` would pick on the meta device from
exactly that config, and compares every tensor name and shape with the program's outputs.

Settling (:func:`settle`, run by ``check`` / ``compile`` / ``apply`` through the frontend):

* a key the tensors depend on that the input left implicit is written explicitly when the output
  config would re-derive it wrongly (``head_dim`` missing from a Llama-2 config when hidden grows;
  an override such as GPT-J's ``n_inner``);
* a key whose value merely coincides with a grown group's size (GPT-2 ``n_positions == n_embd``;
  ``num_key_value_heads == num_attention_heads``) is confirmed by building: it follows the group
  only when the model built with it unchanged does not match the program and the model built with
  it changed does. A key the plan did not grow never changes otherwise.
* anything still different is a compile-time error (SW316) naming the config key(s) whose value
  gives the wrong size, raised before any byte is written.

Verdicts are cached on disk (next to the IR cache, keyed by the input config, the plan's sizes and
layer map, the predicted patch and the transformers version), so a warm ``check`` imports neither
torch nor transformers. :func:`program_tensors` is the one place that says which names and shapes
a program writes (in-memory names today).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from scaler_wizard.diagnostics import Diagnostic, PlanError
from scaler_wizard.grammar import ast as A

# 2: headless base-class inputs compared as the traced class; 3: keyed by the tensors compared;
# 4: check dry-runs the on-disk naming (SW373); 5: derived list keys re-derived
CONFORM_FORMAT = 5
_SKIP_SUFFIX = ("_token_id", "_token_ids")


# ---------------------------------------------------------------------------- tensors on each side
def program_tensors(prog) -> dict[str, tuple[int, ...]]:
    """Names and shapes the program writes (transformers' in-memory names). The one function to
    adapt if the writer's on-disk naming changes."""
    return {name: tuple(o.node.shape) for name, o in prog.outputs.items()}


def predicted_tensors(rp) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes the program will write, predicted from the IR, the grown group sizes and the
    layer map without lowering (the passes' postconditions hold the program to these shapes); tied
    duplicates are listed too. None when the plan renames tensors (``upcycle``: dense -> experts) or
    grows a table whose row count no group describes (``extend context`` on OPT's length + 2 rows)."""
    from scaler_wizard.compiler.predict import tensor_shape

    if any(o.kind == "upcycle" or (o.kind == "extend" and o.group not in rp.ir.groups and o.group != "context")
           for o in rp.ops):
        return None
    out: dict[str, tuple[int, ...]] = {}
    for t in rp.ir.tensors:
        shape = tuple(tensor_shape(t, rp.sizes_after))
        if t.layers is None:
            out[t.name] = shape
            continue
        have = set(t.layers)
        for j, src in enumerate(rp.layer_map):
            if src.src in have:
                out[t.name.replace("{i}", str(j))] = shape
    for tset in rp.ir.tied:
        known = next((out[n] for n in tset if n in out), None)
        if known is not None:
            for n in tset:
                out.setdefault(n, known)
    return out


_OPTIONAL = "\0optional"  # marks a persistent buffer in the tied map of expected_tensors
_CLASS_CACHE: dict[tuple, Any] = {}
_MODEL_CACHE: dict[str, tuple[dict, dict] | str] = {}


def base_class_name(config: dict) -> str | None:
    """transformers' headless base class for the config's ``model_type`` (``LlamaModel``)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except ImportError:
        return None
    name = MODEL_MAPPING_NAMES.get(config.get("model_type"))
    return name if isinstance(name, str) else None


def causal_class_names() -> set[str]:
    """The names of transformers' causal-LM classes (AutoModelForCausalLM's mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        out.update(v if isinstance(v, (list, tuple)) else [v])
    return out


def model_class_for_config(cfg: dict):
    """The class ``from_pretrained`` would build for ``cfg`` (the loader's rule: the class named by
    ``architectures`` when it is a transformers class that is not a causal LM -- BERT's masked LM --
    else AutoModelForCausalLM's pick for the model type). Cached per (architecture, model type)."""
    key = ((cfg.get("architectures") or [None])[0], cfg.get("model_type"))
    if key not in _CLASS_CACHE:
        import transformers
        from transformers import AutoModelForCausalLM

        arch = key[0]
        cls = None
        if arch and arch not in causal_class_names() and hasattr(transformers, arch):
            cls = getattr(transformers, arch)
        _CLASS_CACHE[key] = cls or AutoModelForCausalLM
    return _CLASS_CACHE[key]


class _Quiet:
    """transformers' logger at ERROR: the validation warnings it prints for the input config
    (token ids outside a tiny vocabulary, ...) are not this check's findings."""

    def __enter__(self):
        import logging

        self.log = logging.getLogger("transformers")
        self.level = self.log.level
        self.log.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.log.setLevel(self.level)
        return False


def config_object(cfg: dict):
    """transformers' config object for a config dict, as ``from_pretrained`` would read it."""
    from transformers import AutoConfig

    d = {k: v for k, v in cfg.items() if k not in ("transformers_version",)}
    mt = d.pop("model_type")
    with _Quiet():
        return AutoConfig.for_model(mt, **d)


def expected_tensors(cfg: dict) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(name -> shape, tied duplicate -> canonical name) of the model transformers builds from
    ``cfg`` on the meta device: parameters and persistent buffers, as ``state_dict`` names them.
    Raises ValueError with transformers' message when the config does not build."""
    key = json.dumps(cfg, sort_keys=True, default=str)
    hit = _MODEL_CACHE.get(key)
    if hit is None:
        try:
            hit = _build(cfg)
        except Exception as e:  # noqa: BLE001 - transformers' validation: the config itself is the problem
            hit = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if len(_MODEL_CACHE) > 64:
            _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = hit
    if isinstance(hit, str):
        raise ValueError(hit)
    return hit


def _build(cfg: dict):
    import torch

    conf = config_object(cfg)
    cls = model_class_for_config(cfg)
    with _Quiet(), torch.device("meta"):
        model = cls.from_config(conf) if hasattr(cls, "from_config") else cls._from_config(conf)
    shapes: dict[str, tuple[int, ...]] = {}
    canon: dict[str, str] = {}
    by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = by_id.setdefault(id(p), name)
        if first != name:
            canon[name] = first
        shapes[name] = tuple(p.shape)
    from scaler_wizard.ir.trace import persistent_buffers

    for name, shape in persistent_buffers(model).items():  # checked when written, not required
        shapes[name] = shape
        canon[name] = _OPTIONAL
    return shapes, canon


def compare(expected: dict[str, tuple[int, ...]], tied: dict[str, str], got: dict[str, tuple[int, ...]]) -> list[tuple]:
    """Differences as (kind, name, expected shape, got shape): kind 'shape', 'missing' (the config's
    model has it, the program does not write it) or 'extra'. A tied duplicate may be written or not."""
    diffs = []
    for name, shape in got.items():
        want = expected.get(name)
        if want is None:
            diffs.append(("extra", name, None, shape))
        elif tuple(want) != tuple(shape):
            diffs.append(("shape", name, tuple(want), tuple(shape)))
    for name, shape in expected.items():
        if name in got:
            continue
        src = tied.get(name)
        if src == _OPTIONAL:  # a buffer the model computes when the checkpoint lacks it
            continue
        if src is not None and (src in got or any(tied.get(n) == src and n in got for n in expected)):
            continue
        if any(tied.get(n) == name and n in got for n in got):
            continue
        diffs.append(("missing", name, tuple(shape), None))
    return sorted(diffs, key=lambda d: (d[0], d[1]))


# ---------------------------------------------------------------------------- settling the config
def _int_keys(cfg: dict) -> dict[str, int]:
    return {k: v for k, v in cfg.items()
            if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_") and not k.endswith(_SKIP_SUFFIX)}


def _template(ir, name: str):
    """The IR template a concrete tensor name instantiates (``layers.3.`` -> ``layers.{i}.``)."""
    import re

    m = re.search(r"\.(\d+)\.", name)
    layer = int(m.group(1)) if m else None
    for cand in {name, re.sub(r"\.(\d+)\.", ".{i}.", name, count=1)}:
        hits = [t for t in ir.tensors if t.name == cand]
        # a template with one entry per layer kind: the entry of this layer's kind
        for t in hits:
            if t.layers is None or layer in t.layers:
                return t
        if hits:
            return hits[0]
    return None


def _render(ir, d: tuple, cfg_full: dict, new_sizes: dict) -> str:
    """One difference in words, naming the config key whose value gives the wrong size."""
    kind, name, want, got = d
    if kind == "shape":
        t = _template(ir, name)
        culprits, keys = [], []
        if t is not None and t.axes:
            for a, (w, g) in enumerate(zip(want, got)):
                if w == g or a >= len(t.axes):
                    continue
                for grp in t.axes[a].groups():
                    gi = ir.groups.get(grp)
                    k = gi and (gi.config_key or gi.override_key)
                    if not k:
                        continue
                    keys.append(f"`{k}` = {cfg_full.get(k)}")
                    if cfg_full.get(k) != new_sizes.get(grp):
                        culprits.append(f"`{k}` = {cfg_full.get(k)} where the tensors need {new_sizes.get(grp)}")
        why = "; ".join(dict.fromkeys(culprits or keys))
        return (f"{name}: the grown config builds {list(want)}, the program writes {list(got)}"
                + (f" ({why})" if why else " (internal error: no config key explains it; please report)"))
    if kind == "missing":
        return (f"{name}: the grown config's model has {list(want)}, the program does not write it "
                "(internal error: please report)")
    return (f"{name}: the program writes {list(got)}, the grown config's model has no such tensor "
            "(internal error: please report)")


def _full_dict(cfg: dict) -> dict:
    try:
        return config_object(cfg).to_dict()
    except Exception:  # noqa: BLE001
        return dict(cfg)


def settle_config(ir, input_cfg: dict, patch: dict, old_sizes: dict, new_sizes: dict, tensors: dict,
                  companions: dict[str, str]) -> tuple[dict, list[str], list[str]]:
    """Find the config the grown tensors need. Returns (patch to write, notes, errors).

    ``patch``: the type checker's changes; ``companions``: key -> group for keys that follow a
    group only if building confirms it (reverted to their input value first); ``tensors``: the
    program's outputs (name -> shape)."""
    patch = dict(patch)
    notes: list[str] = []
    for k in companions:
        if k in input_cfg:
            patch[k] = input_cfg[k]
        else:
            patch.pop(k, None)
    changed = {g: (old_sizes[g], new_sizes[g]) for g in new_sizes if g in old_sizes and old_sizes[g] != new_sizes[g]}
    bound = {g.config_key for g in ir.groups.values() if g.config_key} | \
            {g.override_key for g in ir.groups.values() if g.override_key} | {ir.layers_key}

    def built(p):
        cfg = dict(input_cfg)
        cfg.update(p)
        return cfg

    # 1. keys bound to a group that the output config would re-derive to another value: write them
    try:
        full = config_object(built(patch)).to_dict()
    except Exception:  # noqa: BLE001 - reported by the comparison below
        full = {}
    for g in ir.groups.values():
        for k in (g.config_key, g.override_key if g.override_key in patch else None):
            if not k or g.name not in new_sizes or k not in full:
                continue
            if full.get(k) != new_sizes[g.name] and k not in patch:
                patch[k] = new_sizes[g.name]
                notes.append(f"`{k}` = {new_sizes[g.name]} written explicitly (the input config left it implicit: "
                             f"transformers would derive {full.get(k)})")

    def diffs_of(p):
        try:
            exp, tied = expected_tensors(built(p))
        except ValueError as e:
            return [("config", str(e), None, None)]
        return compare(exp, tied, tensors)

    diffs = diffs_of(patch)
    # 2. keys whose value coincides with a grown group's old size: candidates, confirmed by building
    if diffs:
        cands: list[tuple[str, int]] = []
        for k, g in companions.items():
            if g in changed:
                cands.append((k, changed[g][1]))
        for k, v in _int_keys(input_cfg).items():
            if k in bound or k in patch and k not in companions:
                continue
            for g, (old, new) in changed.items():
                if v == old and (k, new) not in cands:
                    cands.append((k, new))
        while diffs and cands:
            best = None
            for k, v in cands:
                d2 = diffs_of({**patch, k: v})
                if len(d2) < len(diffs) and (best is None or len(d2) < len(best[2])):
                    best = (k, v, d2)
            if best is None:
                break
            k, v, diffs = best
            patch[k] = v
            cands = [c for c in cands if c[0] != k]
            notes.append(f"`{k}` follows the grown group ({input_cfg.get(k)} -> {v}): confirmed by building the "
                         "output model (unchanged, its tensors would not match)")
    errors = []
    if diffs:
        if diffs[0][0] == "config":
            errors.append(f"transformers refuses the grown config: {diffs[0][1]}")
        else:
            full = _full_dict(built(patch))
            errors = [_render(ir, d, full, new_sizes) for d in diffs[:6]]
            if len(diffs) > 6:
                errors.append(f"... and {len(diffs) - 6} more")
    if not errors:
        _rederive_lists(input_cfg, patch, notes)
    return patch, notes, errors


def _rederive_lists(input_cfg: dict, patch: dict, notes: list[str]) -> None:
    """Re-derive list-valued keys the config class computes from others (Zamba-2's
    ``hybrid_layer_ids``, the indices of ``layers_block_type``'s hybrid layers): config.json stores
    them and transformers reads the stored value back, so a depth plan that moves the hybrid layers
    must write the grown value. A key counts as derived when the input config built without it gives
    its stored value; the grown config built without it gives the value written."""
    for k, v in input_cfg.items():
        if not isinstance(v, list) or k in patch or k in ("architectures",):
            continue
        try:
            derived = getattr(config_object({x: y for x, y in input_cfg.items() if x != k}), k, None)
            if derived != v:
                continue
            grown = {**input_cfg, **patch}
            grown.pop(k)
            new = getattr(config_object(grown), k, None)
        except Exception:  # noqa: BLE001 - the class needs the key: not derived
            continue
        if isinstance(new, (list, tuple)) and list(new) != v:
            patch[k] = list(new)
            notes.append(f"`{k}` = {list(new)} re-derived from the grown config (was {v}: transformers derives "
                         "it from other keys, and would read the stored value back)")


# ---------------------------------------------------------------------------- the compiler's hook
def _cache_path(key: str) -> Path:
    from scaler_wizard.ir import cache_dir

    return cache_dir().parent / "conform" / f"{key}.json"


def _tensors_digest(tensors: dict[str, tuple[int, ...]]) -> str:
    return hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in tensors.items())).encode()).hexdigest()[:32]


def _tensors_structure(tensors: dict[str, tuple[int, ...]], depth: int) -> list:
    """The compared tensors with sizes and depth symbolic: each name with its layer index as ``{i}``,
    its rank, and whether it occurs once, in every layer of the output or in some."""
    import re

    seen: dict[tuple[str, int], int] = {}
    for name, shape in tensors.items():
        k = (re.sub(r"\.(\d+)\.", ".{i}.", name, count=1), len(shape))
        seen[k] = seen.get(k, 0) + 1
    return sorted([t, r, "every" if c == depth else "one" if c == 1 else "some"] for (t, r), c in seen.items())


def _key(input_cfg, rp, companions, source: str, tensors: dict[str, tuple[int, ...]]) -> str:
    """The verdict's key: everything it depends on, the tensors compared included (a verdict is
    about these tensors: an IR that predicts others must not reuse it)."""
    from scaler_wizard.ir import _transformers_version

    blob = json.dumps({"src": source, "tensors": _tensors_digest(tensors), "in": input_cfg, "after": rp.config_after, "sizes": rp.sizes_after,
                       "map": [[s.src, s.init] for s in rp.layer_map], "ops": [[o.kind, o.group, o.method, o.new_size,
                                                                           sorted(o.options)] for o in rp.ops],
                       "comp": companions, "tf": _transformers_version(), "fmt": CONFORM_FORMAT},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _structure_key(input_cfg, rp, companions, source: str, tensors: dict[str, tuple[int, ...]]) -> str:
    """The verdict's key with every size symbolic (:mod:`scaler_wizard.ir.structure`): the input
    config's structure, the plan's ops, the kinds of layers the depth map makes, and which of the
    input's integers and the grown sizes and config values coincide, and the compared tensors'
    names, ranks and per-layer presence (:func:`_tensors_structure`). Only a plain verdict is stored
    under it: the type checker's patch with its companion keys back at their input values, no
    note, no error (nothing that building the model decided)."""
    from scaler_wizard.ir import structure_key_of
    from scaler_wizard.ir.structure import _LAYER_KEYS, _classes, _int_paths, _leaves

    diff = {k: after for k, (_, after) in rp.config_diff().items()}
    after = _leaves({k: v for k, v in diff.items() if k not in _LAYER_KEYS})
    leaves = _leaves(input_cfg)
    ints = [leaves[p] for p in _int_paths(leaves)] + [after[p] for p in _int_paths(after)] + \
        [rp.sizes_after[g] for g in sorted(rp.sizes_after)] + [g.size for _, g in sorted(rp.ir.groups.items())]
    blob = json.dumps({"src": source, "tensors": _tensors_structure(tensors, len(rp.layer_map)),
                       "in": structure_key_of(input_cfg), "after": sorted(after),
                       "ints": _classes([v for v in ints if isinstance(v, int) and not isinstance(v, bool)]),
                       "map": sorted({(s.src is None, s.init) for s in rp.layer_map}, key=str),
                       "ops": [[o.kind, o.group, o.method, sorted(o.options)] for o in rp.ops],
                       "comp": companions, "fmt": CONFORM_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def input_config(rp) -> dict:
    """The config the writer starts from (config.json as stored, or the GGUF header's)."""
    try:
        from scaler_wizard.ir.config import load_config_dict

        cfg, _ = load_config_dict(str(rp.model_ref))
        return dict(cfg)
    except Exception:  # noqa: BLE001 - a config dict or an unreadable ref: the IR's copy
        return dict(rp.ir.config)


def _companions(rp) -> dict[str, str]:
    """Keys the type checker moved with a group only because their value equals the group's size."""
    out = {}
    for g in rp.ir.groups.values():
        for k in g.companion_keys:
            out[k] = g.name
    return out


_DEPTH_KINDS = ("insert", "duplicate", "stack")


def _stmt(op) -> str:
    """The statement an op comes from, as the plan writes it (an implied op names its statement)."""
    text = op.text.split("  #")[0]
    m = re.search(r"# implied by `(.*)`$", op.text)
    return m.group(1) if m else text


def _culprit(rp, error: str, prefix, use_cache: bool):
    """The op of the plan statement that makes ``rp`` fail to conform.

    ``prefix(dropped)``: the ResolvedPlan of the same plan without the statements at the indices
    ``dropped`` (check's frontend passes one): the plan's growth statements are conformed as
    prefixes, shortest first; the last statement of the first prefix that fails is the culprit (the
    statement that makes a conforming plan fail, alone or with those before it). Without ``prefix``
    (compile / apply, which check has passed) or for a one-statement plan: the first depth op when
    the error is about the layers' layout (a config transformers refuses, a per-layer tensor one side
    lacks, a tensor sized by the depth), else the first op."""
    idxs = list(dict.fromkeys(o.index for o in rp.ops))
    first = lambda i: next(o for o in rp.ops if o.index == i)  # noqa: E731
    if prefix is not None and len(idxs) > 1:
        for k in range(1, len(idxs)):
            try:
                sub = prefix(set(idxs[k:]))
            except PlanError:  # the prefix alone does not type-check: it says nothing
                continue
            try:
                conform(sub, use_cache=use_cache)
            except PlanError:
                return first(idxs[k - 1])
        return first(idxs[-1])
    depth = next((o for o in rp.ops if o.kind in _DEPTH_KINDS), None)
    if depth is not None and (error.startswith("transformers refuses") or _KIND_ERROR.match(error)
                              or _depth_scaled(rp, error) is not None):
        return depth
    return rp.ops[0]


_KIND_ERROR = re.compile(r"^(\S+?)\.(\d+)\.(\S+): (the program writes \[[^\]]*\], the grown config's model has no such "
                         r"tensor|the grown config's model has \[[^\]]*\], the program does not write it)")
_SHAPE_ERROR = re.compile(r"^(\S+): the grown config builds \[([^\]]*)\], the program writes \[([^\]]*)\]")


def _layer_kind_refusal(rp, op, error: str) -> str | None:
    """SW368's message when a depth op's first mismatch is a per-layer tensor that one side has and
    the other lacks: the grown config lays the layers' kinds out by a rule of its own (ModernBERT's
    first layer without attn_norm, a dense prefix), which the copied layer does not follow."""
    if op.kind not in _DEPTH_KINDS:
        op = next((o for o in rp.ops if o.kind in _DEPTH_KINDS), None)
    m = _KIND_ERROR.match(error)
    if op is None or m is None:
        return None
    layer, rest = int(m.group(2)), m.group(3)
    src = rp.layer_map[layer].src if layer < len(rp.layer_map) else None
    has = "writes" in m.group(4)
    return (f"`{_stmt(op)}`: the layers of `{rp.ir.model_type}` differ in kind and the config lays "
            f"the kinds out by a rule of its own: the grown layer {layer} (from layer {src}) "
            f"{'has' if has else 'lacks'} `{rest}`, where the grown config's model puts a layer that "
            f"{'lacks' if has else 'has'} it")


def _depth_scaled(rp, error: str) -> tuple[str, int, int, int] | None:
    """(name, axis, program's size, grown config's size) when the first mismatch is a tensor outside
    the layers whose axis holds one slice per layer: its size is the input depth times a slice, and
    the grown config's model sizes it by the grown depth (Gemma-4's ``embed_tokens_per_layer``,
    [vocab, layers x per-layer width])."""
    m = _SHAPE_ERROR.match(error)
    old, new = rp.ir.num_layers, len(rp.layer_map)
    if m is None or not old or new == old:
        return None
    name = m.group(1)
    t = _template(rp.ir, name)
    if t is not None and t.layers is not None or re.search(r"\.\d+\.", name) and t is None:
        return None
    try:
        want = [int(x) for x in m.group(2).split(",") if x.strip()]
        got = [int(x) for x in m.group(3).split(",") if x.strip()]
    except ValueError:
        return None
    for a, (w, g) in enumerate(zip(want, got)):
        if w != g and g % old == 0 and w == g // old * new:
            return name, a, g, w
    return None


def _depth_scaled_refusal(rp, op, error: str) -> str | None:
    """SW371's message: depth growth of a model with a tensor outside the layers sized by the depth."""
    hit = _depth_scaled(rp, error)
    if hit is None or op.kind not in _DEPTH_KINDS:
        return None
    name, axis, got, want = hit
    old, new = rp.ir.num_layers, len(rp.layer_map)
    return (f"`{_stmt(op)}`: `{name}` (outside the layers) holds one slice per layer along its axis {axis} "
            f"({old} layers x {got // old} = {got}); the grown config's model sizes it by the depth ({new} layers: "
            f"{want}), and growing such a tensor with the layers is not supported")


def _config_refusal(rp, op, error: str) -> str | None:
    """SW372's message: transformers' config class refuses the config of the grown depth. Its
    validation checks how the config lays the layers out (Gemma-4's per-layer overrides, equal within
    each ``layer_types`` kind; Dory's layer counts, which must add up to the depth), and the layout
    the depth op makes breaks that rule."""
    if not error.startswith("transformers refuses the grown config:") or op.kind not in _DEPTH_KINDS:
        return None
    raw = error.split(":", 1)[1].strip()
    from scaler_wizard.compiler.typecheck.depth import PER_LAYER_DICTS

    keys = [k for k in rp.config_diff() if k in rp.ir.layer_arrays or k in PER_LAYER_DICTS]
    return (f"`{_stmt(op)}`: depth growth to {len(rp.layer_map)} layers where `{rp.ir.model_type}`'s config lays "
            f"the layers out by a rule transformers validates: the grown layout"
            + (f" ({', '.join(f'`{k}`' for k in keys[:4])} re-laid out with the layers)" if keys else "")
            + f" breaks that rule, so transformers refuses the grown config (it says: {raw})")


_DISK = "on disk: "


def disk_naming_error(cfg: dict, tensors: dict[str, tuple[int, ...]]) -> str | None:
    """Why the writer could not store ``tensors`` under the names ``save_pretrained`` of the class
    built from ``cfg`` writes (transformers' reverse weight conversion applies an op that
    :func:`scaler_wizard.runtime.naming.disk_layout` cannot express as program ops), or None: what
    ``apply`` would find when it writes, found by ``check`` from the predicted tensors. Nothing is
    built for the many classes whose conversion table is empty (a cached fact)."""
    from scaler_wizard.runtime.naming import DiskNamingError, disk_layout, meta_model_for, saves_memory_names

    if saves_memory_names(cfg):
        return None
    try:
        model = meta_model_for(cfg)
    except Exception:  # noqa: BLE001 - a config transformers refuses is the comparison's finding
        return None
    try:
        disk_layout(model, tensors)
    except DiskNamingError as e:
        return _DISK + str(e)
    return None


def _disk_refusal(rp, op, error: str) -> str | None:
    """SW373's message: the grown tensors cannot be stored under the names transformers saves."""
    if not error.startswith(_DISK):
        return None
    return (f"`{_stmt(op)}`: the grown tensors cannot be stored under the names transformers saves "
            f"`{rp.ir.model_type}` with (the writer {error[len(_DISK):]}): a model written in memory names "
            "would not load as the family's checkpoints do")


def _hybrid_refusal(rp, op, error: str) -> str | None:
    """SW366's message when the first mismatch is a tensor of a hybrid's non-attention token mixer
    (``ModelIR.mixers``): the grown config re-sizes the block by rules discovery does not know (its
    inner sizes follow a key the plan changes), so the plan is refused as a hybrid, not as a bug."""
    ir = rp.ir
    name = error.split(":", 1)[0].strip()
    t = _template(ir, name)
    tpl = t.name if t is not None else re.sub(r"\.(\d+)\.", ".{i}.", name, count=1)
    for mx in ir.mixers:
        if tpl in mx.tensors or tpl.startswith(mx.module + ".") and t is None:
            from scaler_wizard.compiler.typecheck.attention import _mixer_phrase

            return (f"`{_stmt(op)}`: `{ir.model_type}` is a hybrid: {_mixer_phrase(mx)}; the grown config would "
                    f"re-size that block's `{name}`, whose sizes follow the config in a way discovery does not know")
    return None


def conform(rp, *, prog=None, sources=None, use_cache: bool = True, prefix=None):
    """``rp`` with a config_after whose model has exactly the program's tensors, or PlanError SW316
    (SW366 / SW368 / SW371 / SW372 where the cause is a known limit), positioned at the statement
    that causes it (:func:`_culprit`).

    ``prog``: the lowered program (``compile``/``apply``: its outputs are compared); without it
    (``check``) the tensors predicted from the IR are, and a plan whose tensor names only lowering
    knows (``upcycle``) is left to ``compile``. ``prefix(dropped)``: the same plan resolved without
    the statements at the indices ``dropped`` (check passes it to find the culprit statement)."""
    if not rp.ops:
        return rp
    tensors = program_tensors(prog) if prog is not None else predicted_tensors(rp)
    if tensors is None:
        return rp
    input_cfg = input_config(rp)
    companions = _companions(rp)
    key = _key(input_cfg, rp, companions, "program" if prog is not None else "predicted", tensors)
    path = _cache_path(key)
    verdict = None
    if use_cache and path.is_file():
        try:
            verdict = json.loads(path.read_text())
        except (OSError, ValueError):
            verdict = None
    spath = _cache_path("structure-" + _structure_key(input_cfg, rp, companions,
                                                      "program" if prog is not None else "predicted", tensors))
    if verdict is None:
        patch = {k: after for k, (_, after) in rp.config_diff().items() if k in rp.config_after}
        removed = [k for k, (_, after) in rp.config_diff().items() if k not in rp.config_after]
        # keys the type checker moved only because their value equals a group's size go back to
        # their input value first (settle_config's first step, which needs no model)
        plain = dict(patch)
        for k in companions:
            if k in input_cfg:
                plain[k] = input_cfg[k]
            else:
                plain.pop(k, None)
        if use_cache and spath.is_file():
            # the same structure (config and plan, sizes symbolic) conformed as it stood: so does this one
            verdict = {"patch": plain, "removed": removed, "notes": [], "errors": []}
    if verdict is None:
        old_sizes = {k: g.size for k, g in rp.ir.groups.items()}
        # The program's tensors are the traced class's (LlamaForCausalLM); a checkpoint stored from the
        # headless base class (architectures: LlamaModel) is renamed to it only when written (apply's
        # to_stored_class), so the config is checked against the traced class.
        cmp_cfg = input_cfg
        arch = (input_cfg.get("architectures") or [None])[0]
        if arch and arch == base_class_name(input_cfg) and rp.ir.architecture and rp.ir.architecture != arch:
            cmp_cfg = {**input_cfg, "architectures": [rp.ir.architecture]}
        new_patch, notes, errors = settle_config(rp.ir, cmp_cfg, patch, old_sizes, dict(rp.sizes_after),
                                                 tensors, companions)
        if not errors and prog is None and cmp_cfg is input_cfg:  # apply renames its program the same way
            out_cfg = {**input_cfg, **new_patch}
            for k in removed:
                out_cfg.pop(k, None)
            disk = disk_naming_error(out_cfg, tensors)
            errors = [disk] if disk else []
        verdict = {"patch": new_patch, "removed": removed, "notes": notes, "errors": errors}
        if use_cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(verdict, sort_keys=True, default=str))
                os.replace(tmp, path)
                if new_patch == plain and not notes and not errors:
                    spath.write_text("{}\n")
            except OSError:
                pass
    if verdict["errors"]:
        op = _culprit(rp, verdict["errors"][0], prefix, use_cache)
        span = op.span if op.span is not None else A.Span()
        named = (
            ("SW368", _layer_kind_refusal, "nothing was written; width growth and depth growth that keeps every "
                                           "layer's kind in place are unaffected"),
            ("SW371", _depth_scaled_refusal, "nothing was written; width growth is unaffected (depth growth would "
                                             "have to grow the per-layer slices of that tensor, which no rule does yet)"),
            ("SW372", _config_refusal, "nothing was written; width growth is unaffected, and so is depth growth that "
                                       "keeps the config's layer layout valid"),
            ("SW373", _disk_refusal, "nothing was written; the writer follows transformers' slices, reshapes, "
                                     "permutes, concatenations and zero padding; please report the family"),
            ("SW366", _hybrid_refusal, "nothing was written; ops that leave the sizes this block reads as they are "
                                       "(widen ffn, insert / duplicate / stack layers, vocab: `scaler-wizard check` "
                                       "says which) are unaffected"),
        )
        for code, refusal, help_text in named:  # a self-check failure whose cause is a known limit
            message = refusal(rp, op, verdict["errors"][0])
            if message is not None:
                err = PlanError([Diagnostic(
                    code, message, span, help=help_text,
                    notes=tuple(re.sub(r" \(internal error[^)]*\)", "", e) for e in verdict["errors"]))])
                err.sources = sources or {}
                raise err
        err = PlanError([Diagnostic(
            "SW316", f"`{_stmt(op)}`: the grown config would not describe the grown tensors: " + verdict["errors"][0], span,
            help="transformers re-derives tensor shapes from config.json; this plan cannot be written so that they "
                 "match (nothing was written)",
            notes=tuple(verdict["errors"][1:]))])
        err.sources = sources or {}
        raise err
    # config_before is what the writer starts from (the input's config.json), so that the diff --
    # what the program patches -- holds every key written explicitly.
    after = dict(input_cfg)
    after.update(verdict["patch"])
    for k in verdict.get("removed", ()):
        after.pop(k, None)
    return replace(rp, config_before=input_cfg, config_after=after, config_notes=tuple(verdict["notes"]))
