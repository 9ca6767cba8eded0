"""Expand-then-distill: continuation training of a grown student against a teacher's soft targets.

Loss (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network", sec. 2)::

    loss = (1 - alpha) * LM + alpha * T^2 * KL(p_teacher^T || p_student^T)

where ``LM`` is the usual next-token cross entropy, ``p^T = softmax(logits / T)`` and the KL is
summed over the vocabulary and averaged over the predicted positions (the ``seq_len - 1`` positions
the LM loss uses). The ``T^2`` factor keeps the gradient scale of the soft term independent of T.

The teacher (the un-grown original, or any model with the same tokenizer) runs without gradients,
in eval mode, in bf16 on a CUDA device that supports it (fp32 otherwise), as a plain module on every
rank: under DDP and DeepSpeed it is never wrapped or partitioned (it is loaded before the engine
exists). A teacher whose vocabulary differs from the student's is a UsageError before training.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from scaler_wizard.diagnostics import UsageError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over the vocabulary, mean over positions.

    Shapes: both ``[..., vocab]`` (same shape); returns a 0-d fp32 tensor (nats). Computed in fp32
    whatever the input dtype."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    # batchmean: sum over vocab, mean over the rows (positions)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (temperature ** 2)


def _vocab(tokenizer) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def check_teacher(teacher_dir: str | Path, student_config, student_tokenizer) -> None:
    """The teacher predicts over the same token ids as the student: same logits width and the same
    tokenizer vocabulary (token -> id). Raises UsageError naming the first difference."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tcfg = AutoConfig.from_pretrained(teacher_dir)
    except (OSError, ValueError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UsageError(f"--teacher {teacher_dir}: cannot read its config: {first[:300]}") from None
    tv, sv = getattr(tcfg, "vocab_size", None), getattr(student_config, "vocab_size", None)
    if tv != sv:
        raise UsageError(f"--teacher {teacher_dir}: its vocabulary has {tv} entries, the student's {sv}; "
                         "distillation needs the same tokenizer (token ids) in both models")
    try:
        ttok = AutoTokenizer.from_pretrained(teacher_dir)
    except (OSError, ValueError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UsageError(f"--teacher {teacher_dir}: cannot load its tokenizer: {first[:300]}") from None
    a, b = _vocab(ttok), _vocab(student_tokenizer)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        raise UsageError(f"--teacher {teacher_dir}: its tokenizer differs from the student's "
                         f"({len(a)} vs {len(b)} tokens; e.g. {', '.join(f'{k!r}->{i}' for k, i in diff)}); "
                         "distillation needs the same tokenizer in both models")


class Distiller:
    """Holds the teacher and mixes the two loss terms. ``loss(model, ids)`` returns
    ``(total, lm, kd)`` (0-d tensors; ``total`` carries the student's graph)."""

    def __init__(self, teacher_dir: str | Path, alpha: float, temperature: float):
        from transformers import AutoModelForCausalLM

        self.alpha, self.temperature = float(alpha), float(temperature)
        # loaded here, before any DeepSpeed engine or ZeRO-3 init context exists: a plain module
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.teacher.config.use_cache = False
        self.dtype = torch.float32

    def to(self, device: torch.device) -> "Distiller":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            self.dtype = torch.bfloat16
        self.teacher.to(device=device, dtype=self.dtype)
        return self

    def loss(self, model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = model(input_ids=ids, labels=ids)
        with torch.no_grad():
            t_logits = self.teacher(input_ids=ids).logits
        kd = kd_loss(out.logits[:, :-1], t_logits[:, :-1], self.temperature)
        total = (1.0 - self.alpha) * out.loss + self.alpha * kd
        return total, out.loss.detach(), kd.detach()
