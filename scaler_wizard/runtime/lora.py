"""LoRA during continuation training, through ``peft`` (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models": ``W x + (alpha / r) B A x`` with A ``[r, in]``, B ``[out, r]``, B = 0 at
the start, so the wrapped model starts exactly as the plain one).

Which modules get adapters comes from the model's IR, not from per-family name tables:

* ``q``, ``k``, ``v``, ``o``: the attention tensors the trace found (``AttentionInfo.q/k/v/o``; a
  fused qkv projection takes all three roles);
* ``up``, ``gate``, ``down``: the MLP matrices of each layer, by the groups their axes read and
  write: ``down`` reads the ``ffn`` group, ``up``/``gate`` write it. When a layer has two such
  writers, a probe on the real weights tells them apart: doubling the up projection doubles the input
  of ``down`` (it enters linearly), doubling the gate does not (it goes through the activation). A
  fused gate_up tensor (two ``ffn`` segments) takes both roles; a non-gated MLP has only ``up``.

Original tensors keep their values frozen under the adapters. Modules whose weights the growth record
marks ``new`` train fully (peft ``modules_to_save``) unless ``lora_new = "lora"``. On save the
checkpoint holds merged plain weights (``W + (alpha/r) B A``); with ``lora_merge = false`` the run's
``final/`` is a peft adapter directory that ``PeftModel.from_pretrained(base, final)`` loads as is.
"""

from __future__ import annotations


from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scaler_wizard.diagnostics import UsageError

ADAPTER_DIR = "adapter"
_PREFIX = "base_model.model."


@dataclass
class LoraPlan:
    targets: list[str]  # full module names that get adapters
    full: list[str]  # full module names trained fully (new tensors)
    roles: dict[str, list[str]]  # role -> module templates


def _expand(template: str, layers) -> list[str]:
    return [template] if layers is None else [template.replace("{i}", str(i)) for i in layers]


def _role_templates(ir, model) -> dict[str, list[tuple[str, tuple[int, ...] | None]]]:
    """role -> [(module template, layers)] from the IR (see the module docstring)."""
    roles: dict[str, list] = {r: [] for r in ("q", "k", "v", "o", "gate", "up", "down")}
    by_name = {}
    for t in ir.tensors:  # a template with one entry per layer kind: its module over all their layers
        prev = by_name.get(t.name)
        if prev is not None and prev.layers is not None and t.layers is not None:
            t = replace(t, layers=tuple(sorted(set(prev.layers) | set(t.layers))))
        by_name[t.name] = t
    att = ir.attention
    if att is not None:
        if att.fused_qkv and att.fused_qkv in by_name:
            t = by_name[att.fused_qkv]
            for r in ("q", "k", "v"):
                roles[r].append((t.module, t.layers))
        for r in ("q", "k", "v", "o"):
            name = getattr(att, r)
            if name and name in by_name:
                t = by_name[name]
                if (t.module, t.layers) not in roles[r]:
                    roles[r].append((t.module, t.layers))
    writers, readers = [], []
    for t in ir.tensors:
        if t.sublayer != "mlp" or t.kind != "weight" or len(t.axes) != 2:
            continue
        outs = [a for a in t.axes if a.role == "out"]
        ins = [a for a in t.axes if a.role == "in"]
        if outs and "ffn" in outs[0].groups():
            writers.append((t, sum(1 for s in outs[0].segments if any(f.group == "ffn" for f in s.factors))))
        elif ins and "ffn" in ins[0].groups():
            readers.append(t)
    for t in readers:
        roles["down"].append((t.module, t.layers))
    fused = [t for t, nseg in writers if nseg >= 2]
    single = [t for t, nseg in writers if nseg < 2]
    for t in fused:
        roles["gate"].append((t.module, t.layers))
        roles["up"].append((t.module, t.layers))
    if len(single) == 1:
        roles["up"].append((single[0].module, single[0].layers))
    elif len(single) == 2 and readers:
        up = _probe_up(model, single, readers[0])
        for t in single:
            roles["up" if t is up else "gate"].append((t.module, t.layers))
    elif single:
        raise UsageError(f"LoRA: cannot tell the MLP projections apart ({', '.join(t.module for t in single)})")
    return roles


@torch.no_grad()
def _probe_up(model, candidates, down):
    """Which of two ffn-writing matrices enters the down projection linearly (up, not gate)."""
    layer = next(iter(set(candidates[0].layers or ()) & set(candidates[1].layers or ()) & set(down.layers or ())),
                 None)
    if layer is None:
        raise UsageError("LoRA: the MLP projections are not in a common layer; cannot tell gate from up")
    mods = dict(model.named_modules())
    name = lambda t: t.module.replace("{i}", str(layer))  # noqa: E731
    seen: list[torch.Tensor] = []
    h = mods[name(down)].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        ids = torch.arange(1, 9).unsqueeze(0) % model.config.vocab_size
        was = model.training
        model.eval()
        model(input_ids=ids)
        base = seen.pop()
        linear = []
        for t in candidates:
            w = mods[name(t)].weight
            w.mul_(2.0)
            model(input_ids=ids)
            w.div_(2.0)
            linear.append(torch.allclose(seen.pop(), 2 * base, rtol=1e-4, atol=1e-6))
        model.train(was)
    finally:
        h.remove()
    if linear.count(True) != 1:
        raise UsageError("LoRA: probing the MLP could not tell gate from up (neither or both enter linearly)")
    return candidates[linear.index(True)]


def plan_lora(model, ir, recipe, record) -> LoraPlan:
    """Full module names to adapt and to train fully, for ``recipe.lora_targets``."""
    wanted = [r.strip() for r in recipe.lora_targets.split(",") if r.strip()]
    roles = _role_templates(ir, model)
    modules = dict(model.named_modules())
    new_modules = set()
    if record is not None:
        for n, t in record.tensors.items():
            if t.status == "new":
                new_modules.add(n.rsplit(".", 1)[0])
    targets: list[str] = []
    templates: dict[str, list[str]] = {}
    for r in wanted:
        templates[r] = sorted({m for m, _ in roles[r]})
        for m, layers in roles[r]:
            for full in _expand(m, layers):
                if full in modules and full not in targets:
                    targets.append(full)
    if not targets:
        raise UsageError(f"lora_targets `{recipe.lora_targets}`: no module of this model has these roles")
    full: list[str] = []
    if recipe.lora_new == "full" and new_modules:
        full = sorted(m for m in new_modules if m in modules)
        targets = [t for t in targets if t not in new_modules]
    return LoraPlan(targets, full, templates)


def wrap(model, model_dir: Path, recipe, record):
    """``model`` wrapped in a peft ``PeftModel`` with LoRA adapters (base frozen) and the new modules
    trainable; returns (peft_model, plan)."""
    from peft import LoraConfig, get_peft_model

    from scaler_wizard.ir import model_ir_for

    ir = model_ir_for(str(model_dir))
    lp = plan_lora(model, ir, recipe, record)
    cfg = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha or 2 * recipe.lora_r,
                     lora_dropout=recipe.lora_dropout, target_modules=lp.targets,
                     modules_to_save=lp.full or None, bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    pm.peft_config["default"].base_model_name_or_path = str(Path(model_dir).resolve())
    return pm, lp


def plain_name(name: str) -> str | None:
    """The plain model's parameter name of a peft parameter name; None for adapter (lora_*) tensors."""
    if ".lora_" in name:
        return None
    n = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
    return n.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """Plain weights with every adapter folded in (``W + scale * B A``); trained copies of
    ``modules_to_save`` replace their originals. peft's own ``get_delta_weight``."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, t in peft_model.state_dict().items():
        if ".original_module." in name:
            continue
        plain = plain_name(name)
        if plain is not None:
            out[plain] = t.detach().clone()
    for mname, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            plain = plain_name(mname + ".base_layer.weight")
            out[plain] = (out[plain] + m.get_delta_weight("default").to(out[plain].dtype)).contiguous()
    return out


def save(peft_model, out_dir: Path, merge: bool, tokenizer=None) -> None:
    """Merged plain weights into ``out_dir`` (a loadable HF dir), and with ``merge=False`` also the
    peft adapter (with the tokenizer) into ``out_dir/adapter``."""
    base = peft_model.get_base_model()
    base.save_pretrained(out_dir, state_dict=merged_state_dict(peft_model), safe_serialization=True)
    if not merge:
        peft_model.save_pretrained(out_dir / ADAPTER_DIR, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir / ADAPTER_DIR)

