"""The model IR: what Scaler Wizard knows about a model's structure, discovered by tracing.

Pure data (frozen dataclasses, JSON round-trippable, no torch import) so it can be cached on
disk and read by ``check`` without importing torch.

Vocabulary
----------
* A **dimension group** is a set of (tensor, axis-factor) places that must change size together
  (Torch-Pruning's dependency graph, used for growth). Canonical names: ``hidden``, ``ffn``,
  ``heads``, ``kv_heads``, ``head_dim``, ``vocab``, ``experts``; ``const`` marks a fixed factor
  (the 3 of a fused qkv). ``layers`` is the depth pseudo-group.
* An **axis layout** says how one tensor axis is built from groups: a concatenation of segments,
  each segment a row-major product of factors (outermost first). Examples::

      q_proj.weight axis 0         [ (heads x head_dim) ]
      gpt2 c_attn.weight axis 1    [ (heads x head_dim) | (heads x head_dim) | (heads x head_dim) ]
      neox query_key_value axis 0  [ (heads x const(3) x head_dim) ]
      phi3 gate_up_proj axis 0     [ (ffn) | (ffn) ]

* An axis **role** says how the tensor uses that axis: ``out`` (writes the group: a Linear's
  rows, a bias, an embedding's columns), ``in`` (reads the group: a Linear's columns), ``elem``
  (elementwise on the group: norm gains/biases), ``index`` (rows looked up by id: embeddings),
  ``expert`` (a stacked experts axis).
* Tensor names are **templates**: per-layer tensors use ``{i}`` for the layer index
  (``model.layers.{i}.mlp.up_proj.weight``) and list the layers that have them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

IR_FORMAT_VERSION = 22  # 22: strided slices split an axis (GPT-OSS interleaved gate_up: ffn x const(2)), stacked experts' biases have role out, kind "scale" (a per-layer gain that only multiplies); 21: query_pre_attn_scalar == head_dim is the scale's source; 20: a unique-value binding another key moved is a coincidence (unbound); 19: RoPE found in any layer of the stack; 18: config ties (discovery.probe); 15: attention with sinks; 16: persistent buffers, size constants (merged as 17)

CANONICAL_GROUPS = ("hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab", "experts")


@dataclass(frozen=True)
class Factor:
    group: str  # a group name, or "const"
    size: int


@dataclass(frozen=True)
class Segment:
    factors: tuple[Factor, ...]

    @property
    def size(self) -> int:
        n = 1
        for f in self.factors:
            n *= f.size
        return n


@dataclass(frozen=True)
class Axis:
    segments: tuple[Segment, ...]
    role: str  # "out" | "in" | "elem" | "index" | "expert" | "other"

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def groups(self) -> tuple[str, ...]:
        seen: list[str] = []
        for s in self.segments:
            for f in s.factors:
                if f.group != "const" and f.group not in seen:
                    seen.append(f.group)
        return tuple(seen)


@dataclass(frozen=True)
class TensorInfo:
    name: str  # template, "{i}" for the layer index
    shape: tuple[int, ...]
    axes: tuple[Axis, ...]
    module: str  # owning module path template (e.g. "model.layers.{i}.self_attn.q_proj")
    module_type: str  # class name of the owning module (Linear, Conv1D, Embedding, LlamaRMSNorm, ...)
    kind: str  # "weight" | "bias" | "embedding" | "lm_head" | "norm_weight" | "norm_bias" | "router" | "buffer" (a persistent buffer: stored, carried) | "scale" (a per-layer elementwise gain, no norm's: Doge's residual scales) | "other"
    layers: tuple[int, ...] | None = None  # None for global tensors; else the layers that have it
    sublayer: str | None = None  # "attn" | "mlp" | "moe" | None
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def names(self) -> list[str]:
        if self.layers is None:
            return [self.name]
        return [self.name.replace("{i}", str(i)) for i in self.layers]


@dataclass(frozen=True)
class Group:
    name: str
    size: int
    config_key: str | None  # the config field it binds to, found by differential tracing
    derived: str | None = None  # when no key binds directly: e.g. "hidden_size // num_attention_heads"
    override_key: str | None = None  # a None-valued config key that, when set, fixes a derived size (n_inner)
    companion_keys: tuple[str, ...] = ()  # keys that must keep the group's value (OPT word_embed_proj_dim)
    per_layer: bool = True  # False for hidden/vocab (one value model-wide)
    members: tuple[tuple[str, int], ...] = ()  # (tensor template, axis index)
    fixed: str | None = None  # why the group cannot grow although a key binds it (a probe trace disagreed)


@dataclass(frozen=True)
class NormInfo:
    weight: str | None  # tensor template of the gain (None for parameter-free norms)
    bias: str | None
    kind: str  # "layernorm" | "rmsnorm" | "rmsnorm_1p" (Gemma's x * (1 + w))
    group: str  # the group normalised ("hidden", or "head_dim" for q/k norms)
    placement: str  # "pre" | "post" | "sandwich_pre" | "sandwich_post" | "final" | "qk" | "head_out" | "embed"
    # "head_out": over head_dim on the attention's output before o_proj (DiffLlama's subln)
    eps: float
    eps_key: str | None  # config key holding eps (shared by every norm that reads it)
    sublayer: str | None = None  # "attn" | "mlp" | None
    layers: tuple[int, ...] | None = None
    # a "final" norm whose output the LM head's projection reads through no other projection (the
    # one that can carry a tied head's split); False for a final norm before a head transform
    # (Megatron-BERT's encoder.ln, whose output a dense layer reads before the head's own LayerNorm)
    feeds_head: bool = False


@dataclass(frozen=True)
class RopeInfo:
    rotary_dim: int  # how many of head_dim's dimensions are rotated
    head_dim: int
    style: str  # "half" (rotate_half: pair i <-> i + rotary_dim/2) | "interleaved" (pairs 2i, 2i+1)
    theta: float | None = None
    partial_key: str | None = None  # config key for partial rotary (partial_rotary_factor, rotary_pct)
    rope_type: str = "default"  # transformers' rope_type: default | linear | dynamic | yarn | longrope | llama3 | ...
    attention_factor: float = 1.0  # multiplier the rotary module folds into cos and sin (scores see its square)
    per_frequency: tuple[str, ...] = ()  # rope parameter keys with one entry per rotary pair (longrope's factors)


@dataclass(frozen=True)
class AttentionInfo:
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float  # the softmax scale actually used
    # "head_dim" (1/sqrt(head_dim)) | "config:<key>" (1/sqrt(cfg[key])) | "config-value:<key>" (cfg[key]
    # itself: a literal multiplier, unchanged by head_dim growth) | "none"
    scaling_source: str
    q: str | None  # tensor templates (None when fused)
    k: str | None
    v: str | None
    o: str | None
    fused_qkv: str | None = None  # tensor template of a fused projection
    fused_layout: str | None = None  # "concat" ([q|k|v]) | "per_head" ([heads, 3, head_dim])
    rope: RopeInfo | None = None
    sliding_window: int | None = None


@dataclass(frozen=True)
class AttentionShape:
    """Layers whose attention has another shape than ``ModelIR.attention``'s (a layer kind with head
    counts / head dim of its own: sliding-window layers sized by ``swa_num_key_value_heads``). Their
    attention tensors are separate entries of the same templates, laid out with constant factors:
    no group grows them."""

    layers: tuple[int, ...]  # the real layers of this kind
    heads: int
    kv_heads: int
    head_dim: int
    kind: str = ""  # the per-layer config entries that tell the kind ("layer_types=hybrid")


@dataclass(frozen=True)
class MoEInfo:
    num_experts: int
    top_k: int
    renormalize: bool | None  # top-k weights renormalised to sum to 1 (None: unknown)
    router: str  # router weight template
    experts_key: str | None
    top_k_key: str | None
    layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class MixerInfo:
    """A token mixer in the layers that is not softmax attention (a hybrid's state-space, linear-
    attention or convolution block): a module whose ops combine positions of the sequence outside
    every recognised attention site."""

    module: str  # module path template ("model.layers.{i}.linear_attn")
    module_type: str  # its class name (Qwen3NextGatedDeltaNet, FalconH1Mixer, ...)
    layers: tuple[int, ...]  # the real layers that have it
    ops: tuple[str, ...]  # the sequence-mixing ops found in it (conv1d, cumsum, matmul of activations, ...)
    tensors: tuple[str, ...] = ()  # tensor templates owned by it


@dataclass(frozen=True)
class ResidualInfo:
    placement: str  # "pre" | "post" | "sandwich"
    writers: tuple[str, ...]  # tensor templates writing the stream (embed, o_proj, down_proj, ...)
    readers: tuple[str, ...]  # tensor templates reading it (q/k/v, gate/up, lm_head, ...)
    embed_scale: float | None = None  # multiplier applied to embeddings (Gemma: sqrt(hidden))
    embed_scale_source: str | None = None  # "sqrt(hidden_size)" when it follows the hidden size
    # modules applying a nonlinear elementwise function (gelu, tanh, ...) to a hidden-sized value: a
    # head transform's activation (BERT-style dense + act + LayerNorm before the LM head). Tiled
    # copies stay copies through it; a LEMON residue (the mean of the units) or a rescaled stream does not
    nonlinear: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelIR:
    model_type: str
    architecture: str  # the *ForCausalLM / *Model class traced
    config: dict[str, Any]  # the full config (to_dict), as given
    num_layers: int
    layers_key: str  # config key of the depth (num_hidden_layers, n_layer, ...)
    tensors: tuple[TensorInfo, ...]
    groups: dict[str, Group]
    norms: tuple[NormInfo, ...]
    attention: AttentionInfo | None
    residual: ResidualInfo
    moe: MoEInfo | None = None
    tied: tuple[tuple[str, ...], ...] = ()  # sets of tensor names that share storage
    layer_arrays: tuple[str, ...] = ()  # config keys holding one entry per layer (layer_types, ...)
    tp_plan: dict[str, str] | None = None  # config class's base_model_tp_plan, when it has one
    notes: tuple[str, ...] = ()  # facts worth printing that fit nowhere else
    traced_layers: int = 0  # depth of the reduced model actually traced
    mixers: tuple[MixerInfo, ...] = ()  # token mixers that are not attention (hybrids; empty for transformers)
    attention_shapes: tuple[AttentionShape, ...] = ()  # layer kinds whose attention has another shape
    # (config key, module, value, value with the key changed): float constants of the forward computed
    # from a size (discovery.constants: MiniCPM3's scale_depth / sqrt(num_hidden_layers))
    size_constants: tuple[tuple[str, str, float, float], ...] = ()
    # what the config builds differently from what the traced computation says (discovery.probe):
    # ("axis", tensor template, axis index, groups whose key sizes that axis in the config) and
    # ("exists", tensor template, group, "absent" | "new"): the tensor is absent from / new in the
    # model the config builds when the group's key is doubled
    config_ties: tuple[tuple, ...] = ()
    format_version: int = IR_FORMAT_VERSION

    # ------------------------------------------------------------------ queries
    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def total_params(self) -> int:
        """Parameter count of the real model (tied tensors counted once)."""
        tied_dupes = {n for s in self.tied for n in s[1:]}
        total = 0
        for t in self.tensors:
            if t.name in tied_dupes:
                continue
            total += t.numel * (1 if t.layers is None else len(t.layers))
        return total

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=str)

    @staticmethod
    def from_json(text: str) -> "ModelIR":
        return _ir_from_dict(json.loads(text))


def layer_kind(cfg: dict, arrays, layers) -> str:
    """The per-layer config entries shared by ``layers`` ("layer_types=sliding_attention"), for messages."""
    out = []
    for k in arrays:
        v = cfg.get(k)
        if isinstance(v, list) and layers and all(i < len(v) for i in layers) and len({repr(v[i]) for i in layers}) == 1:
            out.append(f"{k}={v[layers[0]]}")
    return ", ".join(out)


def _axis(d) -> Axis:
    return Axis(
        segments=tuple(Segment(tuple(Factor(**f) for f in s["factors"])) for s in d["segments"]),
        role=d["role"],
    )


def _tuple_or_none(x):
    return None if x is None else tuple(x)


def _deep_tuple(x):
    """JSON lists back to tuples, nested (``config_ties`` entries compare as the tuples discovery made)."""
    return tuple(_deep_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _ir_from_dict(d: dict) -> ModelIR:
    tensors = tuple(
        TensorInfo(
            **{
                **t,
                "shape": tuple(t["shape"]),
                "axes": tuple(_axis(a) for a in t["axes"]),
                "layers": _tuple_or_none(t["layers"]),
            }
        )
        for t in d["tensors"]
    )
    groups = {
        k: Group(
            **{
                **g,
                "members": tuple((m[0], m[1]) for m in g["members"]),
                "companion_keys": tuple(g.get("companion_keys", ())),
            }
        )
        for k, g in d["groups"].items()
    }
    norms = tuple(NormInfo(**{**n, "layers": _tuple_or_none(n["layers"])}) for n in d["norms"])
    att = d.get("attention")
    if att is not None:
        rope = att.get("rope")
        if rope:
            rope = RopeInfo(**{**rope, "per_frequency": tuple(rope.get("per_frequency", ()))})
        att = AttentionInfo(**{**att, "rope": rope or None})
    moe = d.get("moe")
    if moe is not None:
        moe = MoEInfo(**{**moe, "layers": tuple(moe["layers"])})
    r = d["residual"]
    residual = ResidualInfo(**{**r, "writers": tuple(r["writers"]), "readers": tuple(r["readers"]),
                               "nonlinear": tuple(r.get("nonlinear", ()))})
    return ModelIR(
        model_type=d["model_type"],
        architecture=d["architecture"],
        config=d["config"],
        num_layers=d["num_layers"],
        layers_key=d["layers_key"],
        tensors=tensors,
        groups=groups,
        norms=norms,
        attention=att,
        residual=residual,
        moe=moe,
        tied=tuple(tuple(s) for s in d["tied"]),
        layer_arrays=tuple(d["layer_arrays"]),
        tp_plan=d.get("tp_plan"),
        notes=tuple(d.get("notes", ())),
        traced_layers=d.get("traced_layers", 0),
        mixers=tuple(MixerInfo(**{**m, "layers": tuple(m["layers"]), "ops": tuple(m["ops"]),
                                  "tensors": tuple(m.get("tensors", ()))}) for m in d.get("mixers", ())),
        attention_shapes=tuple(AttentionShape(**{**a, "layers": tuple(a["layers"])})
                               for a in d.get("attention_shapes", ())),
        size_constants=tuple(tuple(f) for f in d.get("size_constants", ())),
        config_ties=tuple(_deep_tuple(t) for t in d.get("config_ties", ())),
        format_version=d.get("format_version", IR_FORMAT_VERSION),
    )
