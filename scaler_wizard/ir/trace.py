"""Trace a Hugging Face model built from its config on the meta device with torch.export.

The model is built with the fewest layers that cover every distinct layer signature (per-layer
config arrays such as ``layer_types``, index lists such as ``mlp_only_layers``); ``layer_map``
records, for each traced layer, the real layers that share its signature.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from scaler_wizard.ir.errors import IRDiscoveryError

SEQ_LEN = 7  # odd prime: never equal to a model dimension of the tiny configs


@dataclass
class Traced:
    config: Any  # the reduced config actually traced
    model: Any  # the meta model (reduced)
    exported: Any  # torch.export.ExportedProgram
    num_layers: int  # real depth
    layers_key: str
    layer_map: dict[int, tuple[int, ...]]  # traced layer -> real layers with the same signature
    layer_arrays: tuple[str, ...]
    layer_list_path: str | None  # module path of the ModuleList holding the layers ("model.layers")
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tied_sets: list[tuple[str, ...]] = field(default_factory=list)
    param_modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (module path, type)
    # persistent buffers (``state_dict`` names them and save_pretrained stores them: DeepSeek-V3's
    # router ``e_score_correction_bias``, Gemma-4's ``layer_scalar``): name -> shape; their module in
    # ``param_modules``. Non-persistent buffers (RoPE's ``inv_freq``) are computed, never stored.
    buffer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def layers_key_of(config) -> str:
    amap = getattr(config, "attribute_map", {}) or {}
    return amap.get("num_hidden_layers", "num_hidden_layers")


def _num_layers(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise IRDiscoveryError("config has no integer num_hidden_layers", module=type(config).__name__)
    return n


def _array_kinds(cfg: dict, num_layers: int) -> list[tuple[str, str]]:
    """Config arrays indexed by layer: ``per_layer`` lists of length num_layers and ``index_list``
    lists of layer indices (mlp_only_layers). Ambiguous for one layer: see reduced_config."""
    out = []
    for k, v in sorted(cfg.items()):
        if k.startswith("_") or not isinstance(v, list) or num_layers <= 1:
            continue
        ints = bool(v) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < num_layers for x in v)
        if ints and "layers" in k and not k.endswith("types"):
            out.append((k, "index_list"))
        elif len(v) == num_layers:
            out.append((k, "per_layer"))
    return out


def _signatures(cfg: dict, num_layers: int, kinds: list[tuple[str, str]]) -> list[tuple]:
    return [
        tuple(repr(cfg[k][i]) if kind == "per_layer" else (i in cfg[k]) for k, kind in kinds)
        for i in range(num_layers)
    ]


def layer_signatures(cfg: dict, num_layers: int, keys=None) -> tuple[list[tuple], tuple[str, ...]]:
    """Per-layer signature from config arrays, and the names of those arrays (only ``keys`` when
    given: the arrays discovery established as per-layer)."""
    kinds = _array_kinds(cfg, num_layers)
    if keys is not None:
        kinds = [(k, kind) for k, kind in kinds if k in keys]
    return _signatures(cfg, num_layers, kinds), tuple(k for k, _ in kinds)


def _per_layer_by_construction(config) -> tuple[str, ...]:
    """Per-layer lists of a 1-layer config, told apart by the config class itself: rebuilt with two
    layers and without the list, which lists does it re-create with two entries?"""
    cfg = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if isinstance(cfg.get(k), int)), None)
    found = []
    for k, v in sorted(cfg.items()):
        if key is None or not isinstance(v, list) or len(v) != 1:
            continue
        trial = {kk: vv for kk, vv in cfg.items() if kk != k}
        trial[key] = 2
        try:
            rebuilt = type(config)(**trial)
        except Exception:  # noqa: BLE001 - the class needs the list: it is not a derived per-layer array
            continue
        again = getattr(rebuilt, k, None)
        if isinstance(again, list) and len(again) == 2:
            found.append(k)
    return tuple(found)


def _fixed_length_lists(config, keys: list[str]) -> set[str]:
    """Of the lists whose length equals the layer count, those the config class itself makes with
    that same length when rebuilt with one layer more and without the list (Falcon-H1's
    ``time_step_limit`` pair and ``mlp_multipliers``: two entries whatever the depth, a per-layer
    array only by coincidence of a 2-layer config)."""
    cfg = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if isinstance(cfg.get(k), int)), None)
    out = set()
    if key is None:
        return out
    for k in keys:
        trial = {kk: vv for kk, vv in cfg.items() if kk != k}
        trial[key] = cfg[key] + 1
        try:
            rebuilt = type(config)(**trial)
        except Exception:  # noqa: BLE001 - the class needs the list: no evidence either way
            continue
        again = getattr(rebuilt, k, None)
        if isinstance(again, (list, tuple)) and len(again) == len(cfg[k]):
            out.add(k)
    return out


def reduced_config(config):
    """A copy of ``config`` with the fewest layers covering every distinct layer signature."""
    n = _num_layers(config)
    cfg = config.to_dict()
    kinds = _array_kinds(cfg, n)
    if n == 1:
        # One layer: a list of length 1 may be per-layer (layer_types) or not (architectures).
        kinds = [(k, "per_layer") for k in _per_layer_by_construction(config)]
    else:
        fixed = _fixed_length_lists(config, [k for k, kind in kinds if kind == "per_layer"])
        kinds = [(k, kind) for k, kind in kinds if k not in fixed]
    arrays = tuple(k for k, _ in kinds)
    sigs = _signatures(cfg, n, kinds)
    shapes = _layer_structures(config, n)
    if shapes is not None:  # layers told apart by a scalar key (first_k_dense_replace): their tensors differ
        sigs = [(s, shapes[i]) for i, s in enumerate(sigs)]
    keep: list[int] = []
    seen: dict[tuple, int] = {}
    for i, s in enumerate(sigs):
        if s not in seen:
            seen[s] = len(keep)
            keep.append(i)
    if shapes is not None and keep != list(range(len(keep))):
        # a reduced config re-creates the kept layers only through the arrays; a scalar key lays out
        # a prefix of the real layers as it lays out the whole: trace the prefix up to the last new kind
        trial = _reduce(config, cfg, kinds, keep)
        if _layer_structures(trial, len(keep)) != [shapes[i] for i in keep]:
            keep = list(range(keep[-1] + 1))
    first = {}
    for j, i in enumerate(keep):
        first.setdefault(sigs[i], j)
    layer_map: dict[int, tuple[int, ...]] = {j: () for j in range(len(keep))}
    for i in range(n):
        j = keep.index(i) if i in keep else first[sigs[i]]
        layer_map[j] += (i,)
    red = _reduce(config, cfg, kinds, keep)
    red.use_cache = False
    _static_rope(red)
    return red, layer_map, arrays, n


def _reduce(config, cfg: dict, kinds, keep: list[int]):
    red = copy.deepcopy(config)
    red.num_hidden_layers = len(keep)
    for k, kind in kinds:
        v = cfg[k]
        if kind == "per_layer":
            setattr(red, k, [v[i] for i in keep])
        else:
            setattr(red, k, [j for j, i in enumerate(keep) if i in v])
    return red


def _layer_structures(config, n: int) -> list[tuple] | None:
    """Per layer, the sorted (relative name, shape) of its parameters in the model built from
    ``config`` on the meta device; None when it cannot be built or has no layer list of depth n."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_meta_model(config)
    except Exception:  # noqa: BLE001 - no evidence: the arrays alone decide
        return None
    path = find_layer_list(model, n)
    if path is None:
        return None
    layers = model.get_submodule(path)
    return [tuple(sorted((name, tuple(p.shape)) for name, p in layer.named_parameters())) for layer in layers]




def _static_rope(config) -> None:
    """Dynamic NTK rope re-computes its frequencies in Python when a sequence outgrows the cache (a
    data-dependent branch torch.export cannot trace). Shapes and the graph do not depend on it: the
    reduced config traces with the default rope; discovery reads the real type from the config."""
    for key in ("rope_parameters", "rope_scaling"):
        d = getattr(config, key, None)
        if not isinstance(d, dict):
            continue
        d = copy.deepcopy(d)
        for sub in [d] + [v for v in d.values() if isinstance(v, dict)]:
            t = sub.get("rope_type", sub.get("type"))
            if isinstance(t, str) and "dynamic" in t:
                sub["rope_type"] = "default"
                sub.pop("type", None)
                sub.pop("factor", None)
        setattr(config, key, d)


def build_meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = copy.deepcopy(config)
    if getattr(config, "model_type", None) in ("mixtral", "qwen2_moe", "qwen3_moe") or hasattr(config, "num_local_experts") or hasattr(config, "num_experts"):
        config._experts_implementation = "batched_mm"
    errors = []
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    autos = (AutoModelForCausalLM, AutoModelForMaskedLM)
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and getattr(config, "is_decoder", None) is False:
        autos = (AutoModelForMaskedLM, AutoModelForCausalLM)  # an encoder: trace its masked-LM head
    with torch.device("meta"):
        for auto in autos:
            try:
                model = auto.from_config(config, dtype=torch.float32)
                break
            except ValueError as e:  # unrecognized configuration class for this auto class
                errors.append(str(e).splitlines()[0])
        else:
            raise IRDiscoveryError(
                f"no causal-LM or masked-LM class for model_type {config.model_type!r}: {errors[-1] if errors else ''}",
                module=type(config).__name__,
            )
    model.eval()
    return model


def export_model(model, seq_len: int = SEQ_LEN):
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            out = self.m(input_ids=input_ids, use_cache=False) if _accepts_use_cache(self.m) else self.m(input_ids=input_ids)
            return out.logits

    import torch.fx.config as fx_config

    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    # Discovery reads each node's target, arguments, shapes and ``nn_module_stack``, never its Python
    # ``stack_trace``: recording one per node (a traceback extracted and symbolised per op) is 25-45 %
    # of an export (measured on tiny Llama / Qwen3-Next), so it is switched off for the export.
    before = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    import warnings

    try:
        with warnings.catch_warnings():
            # Phi-3's longrope rotary module assigns ``long_inv_freq`` in forward: torch.export warns
            # once per trace (4 UserWarnings on stderr per `check`); shapes are unaffected
            warnings.filterwarnings("ignore", message=r"The tensor attribute .* was assigned during export")
            return torch.export.export(LogitsOnly(model), (ids,), strict=False)
    except Exception as e:  # noqa: BLE001 - report which model failed and why
        raise IRDiscoveryError(f"torch.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                               module=type(model).__name__) from e
    finally:
        fx_config.do_not_emit_stack_traces = before


def _accepts_use_cache(model) -> bool:
    import inspect

    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def find_layer_list(model, depth: int) -> str | None:
    import torch

    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == depth:
            nparams = sum(1 for _ in mod.parameters())
            if best is None or nparams > best[1]:
                best = (name, nparams)
    return best[0] if best else None


def trace_config(config) -> Traced:
    red, layer_map, arrays, n = reduced_config(config)
    model = build_meta_model(red)
    ep = export_model(model)
    t = Traced(
        config=red,
        model=model,
        exported=ep,
        num_layers=n,
        layers_key=layers_key_of(config),
        layer_map=layer_map,
        layer_arrays=arrays,
        layer_list_path=find_layer_list(model, red.num_hidden_layers),
    )
    by_id: dict[int, list[str]] = {}
    mods = dict(model.named_modules())
    for name, p in model.named_parameters(remove_duplicate=False):
        t.param_shapes[name] = tuple(p.shape)
        by_id.setdefault(id(p), []).append(name)
        mpath = name.rsplit(".", 1)[0] if "." in name else ""
        t.param_modules[name] = (mpath, type(mods.get(mpath)).__name__)
    t.tied_sets = [tuple(v) for v in by_id.values() if len(v) > 1]
    t.buffer_shapes = persistent_buffers(model)
    for name in t.buffer_shapes:
        mpath = name.rsplit(".", 1)[0] if "." in name else ""
        t.param_modules[name] = (mpath, type(mods.get(mpath)).__name__)
    return t


def persistent_buffers(model) -> dict[str, tuple[int, ...]]:
    """name -> shape of ``model``'s persistent buffers (the buffers ``state_dict`` holds)."""
    non_persistent = set()
    for mname, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{mname}.{b}" if mname else b)
    return {name: tuple(b.shape) for name, b in model.named_buffers() if name not in non_persistent}


_LAYER_RE_CACHE: dict[str, re.Pattern] = {}


def split_layer(name: str, layer_list_path: str | None) -> tuple[str, int | None]:
    """``model.layers.3.mlp.up_proj.weight`` -> (``model.layers.{i}.mlp.up_proj.weight``, 3)."""
    if not layer_list_path:
        return name, None
    pat = _LAYER_RE_CACHE.get(layer_list_path)
    if pat is None:
        pat = _LAYER_RE_CACHE[layer_list_path] = re.compile(r"^" + re.escape(layer_list_path) + r"\.(\d+)(\.|$)")
    m = pat.match(name)
    if not m:
        return name, None
    return layer_list_path + ".{i}" + name[m.end(1):], int(m.group(1))
