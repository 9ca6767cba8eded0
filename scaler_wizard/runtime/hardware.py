"""Hardware-aware recommendations for continued training of a grown model
(``scaler-wizard check PLAN --hardware 8xH100-80GB``).

For the recipe's micro-batch and sequence length, every setup (one device, DDP, ZeRO-1/2/3, CPU
offload, gradient checkpointing, LoRA, smaller micro-batches with more accumulation) gets an
estimated peak memory per device; the first that fits in a fixed order of preference (fastest first)
is recommended, with the ``scaler-wizard train --emit-config`` line that writes its
accelerate/DeepSpeed config.

Memory model, in bytes (B = micro-batch, S = sequence length, h = hidden, f = ffn, a = heads,
L = layers, V = vocabulary, P = parameters):

* model states: mixed precision AdamW keeps 16 B/param on one device and under DDP (fp32 weights,
  fp32 grads, fp32 Adam m and v: what ``train`` holds, as it loads fp32 weights and autocasts);
  ZeRO-1: 4 + 4 + 8/N; ZeRO-2 and ZeRO-3 (with and without CPU offload): DeepSpeed's own estimators
  ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``
  (deepspeed.runtime.zero), which work from parameter counts alone.
* activations per layer: the tensors autograd keeps for the backward pass of a Hugging Face
  decoder layer with SDPA attention (no score matrix): the two norms' inputs and normalised outputs,
  q/k/v and their rotary copies, the attention output, the o/down projection inputs (about 16 SBh
  elements) and the MLP's gate, activation, up and product outputs (4 SBf, plus one SBf transient
  in the backward). Elements are 2 bytes under bf16/fp16 autocast, 4 in fp32. Logits, their fp32
  log-softmax and its gradient: 3 SBV fp32 values (12 SBV bytes). This is Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1: 34 SBh + 5 aS^2B
  bytes per layer for a GPT with fused kernels) redone for eager Hugging Face modules, and it is
  checked against measured peak RSS (tests/test_hardware.py). Gradient checkpointing keeps each
  layer's input (1 SBh element per layer) plus one layer's full set.
* LoRA: the frozen base in fp32 (4 B/param) plus 16 B per adapter parameter, r (in + out) per
  adapted matrix of the q, k, v, o, gate, up, down roles.

A setup fits when its estimate is at most 90 % of the device memory (``HEADROOM``). The estimate is
checked against a real CPU run's peak RSS in tests/test_hardware.py (the margin is stated there).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from scaler_wizard.diagnostics import UsageError

HEADROOM = 0.9
GiB = 1024 ** 3
# device memory of common accelerators (GB as sold), for `--hardware 8xH100` without a size
KNOWN_GPUS = {"H100": 80, "H200": 141, "A100": 80, "A10": 24, "A10G": 24, "L4": 24, "L40S": 48, "V100": 32,
              "T4": 16, "RTX4090": 24, "RTX3090": 24, "MI300X": 192, "MI250X": 128, "B200": 192}


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_bytes: int
    cpu_bytes: int | None = None
    name: str = "GPU"

    def describe(self) -> str:
        cpu = f", {_gib(self.cpu_bytes)} CPU RAM" if self.cpu_bytes else ""
        return f"{self.gpus} x {self.name} ({_gib(self.gpu_bytes)} each){cpu}"


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    largest_layer_params: int

    def lora_params(self, r: int, roles: tuple[str, ...]) -> int:
        """Adapter parameters: r (in + out) per adapted matrix, per layer."""
        h, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.ffn
        dims = {"q": h + q, "k": h + kv, "v": h + kv, "o": q + h, "gate": h + f, "up": h + f, "down": f + h}
        return self.layers * r * sum(dims[x] for x in roles)


@dataclass
class Setup:
    name: str
    processes: int
    micro_batch: int
    grad_accum: int
    device_bytes: int
    cpu_bytes: int = 0
    emit: str | None = None  # --emit-config kind
    offload: bool = False
    flags: list[str] = field(default_factory=list)  # train flags this setup needs
    fits: bool = False


def parse_bytes(text: str, flag: str) -> int:
    """``80GB``, ``80G``, ``80GiB``, ``512 GB`` -> bytes (GB read as GiB, as device memory is sold)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"{flag} {text!r}: expected a size like 80GB")
    unit = {"": GiB, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}[m.group(2).upper()]
    value = int(float(m.group(1)) * unit)
    if value <= 0:
        raise UsageError(f"{flag} {text!r}: must be positive")
    return value


def parse_hardware(spec: str | None, gpus: int | None = None, gpu_memory: str | None = None,
                   cpu_memory: str | None = None) -> Hardware:
    """``8xH100-80GB`` | ``8xH100`` | ``H100`` | ``--gpus 8 --gpu-memory 80GB``; raises UsageError."""
    n, name, mem = 1, "GPU", None
    if spec:
        m = re.fullmatch(r"\s*(?:(\d+)\s*[xX*]\s*)?([A-Za-z][A-Za-z0-9]*)(?:[-_ ]([0-9.]+\s*[KMGT]?i?B?))?\s*", spec)
        if not m:
            raise UsageError(f"--hardware {spec!r}: expected COUNTxNAME-MEMORY, e.g. 8xH100-80GB")
        n = int(m.group(1) or 1)
        name = m.group(2).upper()
        if m.group(3):
            mem = parse_bytes(m.group(3), "--hardware")
        elif name in KNOWN_GPUS:
            mem = KNOWN_GPUS[name] * GiB
        else:
            raise UsageError(f"--hardware {spec!r}: unknown device {name}; give its memory, e.g. {n}x{name}-80GB")
    if gpus is not None:
        n = gpus
    if gpu_memory is not None:
        mem = parse_bytes(gpu_memory, "--gpu-memory")
    if mem is None:
        raise UsageError("--gpus needs --gpu-memory (or use --hardware 8xH100-80GB)")
    if n < 1:
        raise UsageError(f"--gpus must be >= 1, got {n}")
    return Hardware(n, mem, parse_bytes(cpu_memory, "--cpu-memory") if cpu_memory else None, name)


def shape_of(rp) -> ModelShape:
    """The grown model's shape from a resolved plan (predicted sizes, no weights)."""
    ir, sizes = rp.ir, dict(rp.sizes_after)

    def size(g: str, default: int = 0) -> int:
        return int(sizes.get(g, ir.groups[g].size if g in ir.groups else default))

    att = ir.attention
    heads = size("heads", att.heads if att else 1)
    head_dim = size("head_dim", att.head_dim if att else 0)
    hidden = size("hidden")
    layers = len(rp.layer_map)
    params = rp.costs_after.params
    embed = size("vocab") * hidden
    per_layer = max(1, (params - embed) // max(layers, 1))
    return ModelShape(params, layers, hidden, size("ffn", 4 * hidden), heads, size("kv_heads", heads), head_dim,
                      size("vocab"), max(per_layer, embed))


def activation_bytes(s: ModelShape, micro_batch: int, seq: int, *, checkpointing: bool, fp32: bool) -> int:
    """Peak activation memory of one forward/backward in bytes (see the module docstring)."""
    sbh, sbf = seq * micro_batch * s.hidden, seq * micro_batch * s.ffn
    elem = 4 if fp32 else 2
    layer = elem * (16 * sbh + 5 * sbf)
    total = (elem * sbh * s.layers + layer) if checkpointing else layer * s.layers
    return int(total + 12 * seq * micro_batch * s.vocab)


def _deepspeed_estimators():
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def model_state_bytes(kind: str, s: ModelShape, n: int, *, offload: bool = False) -> tuple[int, int]:
    """(device bytes, CPU bytes) of weights, gradients and AdamW state per device for one setup kind:
    single | ddp | zero1 | zero2 | zero3."""
    p = s.params
    if kind in ("single", "ddp"):
        return 16 * p, 0
    if kind == "zero1":
        return 8 * p + (8 * p) // n, 0
    z2, z3 = _deepspeed_estimators()
    if kind == "zero2":
        cpu, gpu = z2(p, num_gpus_per_node=n, num_nodes=1, cpu_offload=offload)
        return gpu, cpu
    if kind == "zero3":
        cpu, gpu, _ = z3(p, s.largest_layer_params, num_gpus_per_node=n, num_nodes=1, cpu_offload=offload,
                         cpu_offload_params=offload, zero_init=True)
        return gpu, cpu
    raise ValueError(kind)


def setups(s: ModelShape, hw: Hardware, recipe) -> list[Setup]:
    """Every setup, in order of preference (fastest first), with its estimate and fit."""
    fp32 = recipe.precision == "fp32"
    seq = recipe.max_seq_len
    global_batch = recipe.batch_size * recipe.grad_accum
    n = hw.gpus
    roles = tuple(r.strip() for r in recipe.lora_targets.split(",") if r.strip())
    lora_r = recipe.lora_r or 16
    out: list[Setup] = []
    mbs = [recipe.batch_size]
    while mbs[-1] > 1:
        mbs.append(max(1, mbs[-1] // 2))
    kinds = [("single", 1, None)] if n == 1 else [("ddp", n, "ddp"), ("zero1", n, "zero1")]
    kinds += [("zero2", n, "zero2"), ("zero3", n, "zero3")]
    for mb in mbs:
        accum = max(1, -(-global_batch // mb))
        for gc in (False, True):
            act = activation_bytes(s, mb, seq, checkpointing=gc, fp32=fp32)
            flags = (["--gradient-checkpointing"] if gc else []) + \
                ([f"--batch-size {mb}", f"--grad-accum {accum}"] if mb != recipe.batch_size else [])
            for kind, procs, emit in kinds:
                for off in ((False, True) if kind in ("zero2", "zero3") else (False,)):
                    dev, cpu = model_state_bytes(kind, s, procs, offload=off)
                    label = {"single": "one device", "ddp": f"DDP x{procs}", "zero1": f"ZeRO-1 x{procs}",
                             "zero2": f"ZeRO-2 x{procs}", "zero3": f"ZeRO-3 x{procs}"}[kind]
                    label += " + CPU offload" if off else ""
                    label += " + grad ckpt" if gc else ""
                    out.append(Setup(f"{label}, micro-batch {mb}", procs, mb, accum, dev + act, cpu, emit, off,
                                     list(flags)))
            # LoRA (frozen base in fp32 + adapters with their AdamW state), plain DDP
            dev = 4 * s.params + 16 * s.lora_params(lora_r, roles) + act
            extra = [] if recipe.lora_r else [f"--lora-r {lora_r}"]
            out.append(Setup(f"LoRA r={lora_r}{' x' + str(n) if n > 1 else ''}{' + grad ckpt' if gc else ''}, "
                             f"micro-batch {mb}", n, mb, accum, dev, 0, "ddp" if n > 1 else None, False,
                             extra + list(flags)))
    for st in out:
        st.fits = st.device_bytes <= HEADROOM * hw.gpu_bytes and \
            (hw.cpu_bytes is None or st.cpu_bytes <= HEADROOM * hw.cpu_bytes)
    if recipe.lora_r:  # a LoRA recipe: only LoRA setups apply
        out = [st for st in out if st.name.startswith("LoRA")]
    return out


def recommend(all_setups: list[Setup]) -> Setup | None:
    return next((st for st in all_setups if st.fits), None)


def what_would_fit(s: ModelShape, hw: Hardware, recipe) -> str:
    """For the warning when nothing fits: the device count (same memory), or the device memory,
    that the leanest full-training setup (ZeRO-3, offload, checkpointing, micro-batch 1) needs."""
    act = activation_bytes(s, 1, recipe.max_seq_len, checkpointing=True, fp32=recipe.precision == "fp32")
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        dev, _ = model_state_bytes("zero3", s, n)
        if dev + act <= HEADROOM * hw.gpu_bytes:
            return f"{n} devices of {_gib(hw.gpu_bytes)} with ZeRO-3 and gradient checkpointing at micro-batch 1"
    dev, _ = model_state_bytes("zero3", s, hw.gpus, offload=True)
    return f"devices with at least {_gib(int((dev + act) / HEADROOM) + 1)} each (ZeRO-3 with CPU offload)"


def _gib(b: int | None) -> str:
    return "?" if b is None else f"{b / GiB:.1f} GiB"


def render(s: ModelShape, hw: Hardware, recipe, all_setups: list[Setup], best: Setup | None,
           show_all: bool = False) -> str:
    """The table (setups that fit, then the nearest that do not) and the recommendation."""
    lines = [f"training memory on {hw.describe()}: grown model {s.params:,} parameters, micro-batch "
             f"{recipe.batch_size} x {recipe.max_seq_len} tokens, grad accumulation {recipe.grad_accum}"]
    rows = all_setups if show_all else [st for st in all_setups if st.micro_batch == recipe.batch_size]
    width = max(len(st.name) for st in rows)
    lines.append(f"  {'setup':<{width}}  {'per device':>11}  {'CPU RAM':>10}  fits")
    for st in rows:
        lines.append(f"  {st.name:<{width}}  {_gib(st.device_bytes):>11}  "
                     f"{_gib(st.cpu_bytes) if st.cpu_bytes else '-':>10}  {'yes' if st.fits else 'no'}")
    if best is not None:
        lines.append(f"recommended: {best.name} ({_gib(best.device_bytes)} per device)")
        lines.append("  " + launch_line(best))
    return "\n".join(lines)


def launch_line(st: Setup) -> str:
    flags = " ".join(st.flags)
    train = f"scaler-wizard train MODEL_DIR --data ... -o RUN_DIR {flags}".rstrip()
    if st.emit is None:
        return train
    cfg = f"scaler-wizard train --emit-config {st.emit} --num-processes {st.processes}" + \
        (" --offload" if st.offload else "") + " -o cfg"
    return f"{cfg} && accelerate launch --config_file cfg/accelerate_{st.emit}.yaml -m scaler_wizard train " \
        f"MODEL_DIR --data ... -o RUN_DIR {flags}".rstrip()


# --------------------------------------------------------------------------- apply / verify
def _human(b: int) -> str:
    from scaler_wizard.compiler.predict import human

    return human(b, "B")


_LAYER = re.compile(r"\.(\d+)\.")


def _layer_split(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(largest decoder layer's elements, elements outside the layers) of a set of tensor shapes."""
    per: dict[int, int] = {}
    rest = 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        m = _LAYER.search(name)
        if m:
            per[int(m.group(1))] = per.get(int(m.group(1)), 0) + n
        else:
            rest += n
    return max(per.values(), default=0), rest


def verify_bytes(shapes_a: dict, shapes_b: dict, vocab: int, *, n_seqs: int = 4, seq_len: int = 32) -> int:
    """Layer-wise verification (runtime/verify.py): one decoder layer (two where the next is read
    ahead: a layer of at most ``LayerwiseModel.READ_AHEAD_MAX_BYTES`` in fp32) plus the tensors
    outside the layers (embeddings, head, final norm) of the larger model in fp32, and both models'
    fp32 logits of ``n_seqs`` x ``seq_len`` tokens (and the padded/KV-cache batches: x4)."""
    from scaler_wizard.runtime.layerwise import LayerwiseModel

    la, ra = _layer_split(shapes_a)
    lb, rb = _layer_split(shapes_b)
    layer = 4 * max(la, lb)
    held = 2 if 0 < layer <= LayerwiseModel.READ_AHEAD_MAX_BYTES else 1
    return held * layer + 4 * max(ra, rb) + 2 * 4 * 4 * n_seqs * seq_len * vocab


def apply_memory_line(rp, verify: bool) -> str:
    """One line: what ``apply`` will hold (streaming: 3 x the largest tensor in fp32; then the
    layer-wise verification)."""
    line = f"apply: needs about {_human(rp.costs_after.apply_peak_bytes)} to write (3 x the largest tensor in fp32)"
    if verify:
        ir, sizes = rp.ir, rp.sizes_after
        from scaler_wizard.compiler.predict import predict_shapes

        after = {}
        for t in predict_shapes(ir, sizes, rp.layer_map):
            for i in range(t.count):
                after[t.name.replace("{i}", str(i))] = t.shape
        before = {n: t.shape for t in ir.tensors for n in t.names()}
        vocab = int(sizes.get("vocab", ir.groups["vocab"].size if "vocab" in ir.groups else 0))
        line += f", about {_human(verify_bytes(before, after, vocab))} to verify (layer by layer, fp32)"
    return line


def verify_memory_line(out_dir: str, against: str) -> str | None:
    """One line for ``verify``: the estimate from both checkpoints' headers (None when unreadable)."""
    from scaler_wizard.runtime.checkpoint import CheckpointError, open_checkpoint

    shapes = []
    try:
        for ref in (out_dir, against):
            r = open_checkpoint(ref)
            try:
                shapes.append({n: tuple(r.shape(n)) for n in r.names()})
            finally:
                r.close()
    except (CheckpointError, OSError, ValueError):
        return None
    import json
    from pathlib import Path

    try:
        vocab = int(json.loads((Path(out_dir) / "config.json").read_text()).get("vocab_size") or 0)
    except (OSError, ValueError):
        vocab = 0
    return f"verify: needs about {_human(verify_bytes(shapes[0], shapes[1], vocab))} (layer by layer, fp32)"
