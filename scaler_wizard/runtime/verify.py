"""Runtime verification: does the grown model compute what the original computed?

:func:`compare_models` runs both models in float32, eval mode, on

* seeded random token ids (``n_random`` sequences of ``seq_len``, default 2 x 32),
* the given ``texts`` (tokenised one by one, no padding),
* one padded batch ``pad_len`` wide (default ``seq_len``): random sequences 2.. cut shorter,
  right-padded, and the same sequences left-padded (``position_ids`` follow the mask), compared
  only at real (non-pad) positions (checks ``padding_right`` and ``padding_left``); as wide as the
  random ids (the default), its rows run in the random ids' forward, after theirs,
* incremental decoding with the KV cache on the first two random sequences, compared with the
  grown model's own full forward and with the original: where the random ids' forward can stand
  in for the prefill (see :func:`compare_models`), its cache cut to all but the last ``kv_steps``
  (2) tokens, which are decoded token by token with ``past_key_values``; otherwise a prefill of
  half the tokens, the tokens up to the last ``kv_steps`` in one forward through the cache, then
  those token by token,
* seeded random ``token_type_ids`` when the model has more than one token type (BERT),

Models load with their own class when ``config.architectures`` names one that is not a causal LM
(``BertForMaskedLM``: its MLM head is what gets compared), otherwise with AutoModelForCausalLM. The
KV-cache checks need a causal decoder; for other models they are skipped and a note says so.

Model directories (safetensors) run layer by layer (:mod:`scaler_wizard.runtime.layerwise`): the
real transformers modules, one decoder layer's weights in float32 at a time, each model read once,
one model after the other (only logits kept in between); memory is about one decoder layer plus
the input or output embedding plus activations, whatever the model size. Python modules, GGUF
files and models whose decoder layers cannot be found run whole (a note says which and why).

and reports, per check: max |grown - original| over logits, the same divided by max |original logit|,
and the mean KL(original || grown) of next-token distributions. When the vocabulary grew, only the
original vocabulary slice of the logits is compared (and both softmaxes are taken over it).

The sample size (default 64 random positions, a padded batch of 2 x 32 with 48 real positions,
and 64 decoded: 192 token positions per model) is set by cost, not by statistics: every position of every check passes
through every weight of the model, so a construction that is not function-preserving (a wrong
split, a missing scale, a broken head or layer) moves essentially every position's logits, and a
handful of positions detects it as surely as hundreds (tests/test_verify_layerwise.py: a broken
layer, a 1 % change of one head). Verification costs about ``2 x parameters x 192`` float32 FLOPs
per model (``x 132`` where the decoding's prefill is cut from the random ids' forward, see
:func:`compare_models`), plus one pass over every weight per forward: three per decoder layer
(random ids with the padded rows, two single-token steps; five with a separate prefill and a
cached middle, one more with a padded batch narrower than the random ids),
each a matrix product of a few dozen rows or fewer, which float32 BLAS runs far below its peak; the
earlier sample (4 x 32 random ids, two padded batches of 4 x 32, four single-token steps over four
rows: 416 positions) made verifying a 1.1B model 10x slower than writing it. What no small sample
covers is every embedding row: 64 random ids draw at most 64 rows of a 32k vocabulary (the earlier
sample 128); the constructions treat all rows alike, so a wrong one shows in whichever rows are
drawn. Pass more (``n_random``, ``seq_len``, ``pad_len``, ``texts``) when the cost is no concern.

Tolerance (``rtol``, default 1e-5): a check passes when ``max_abs <= rtol * max|original logit|``.
Why 1e-5: an exact growth re-associates float32 sums (split columns, tiled rows, a different
reduction length in matmuls and norms). Each re-associated reduction adds a relative error of a few
units of float32 roundoff (u = 6e-8) times sqrt(length); across a few dozen layers and with
softmax/normalisation in between this stays in the 1e-7 .. 1e-6 range on real models, so 1e-5
(~170 u) passes every exact construction while a real functional change (a wrong sign, an unsplit
copy, a dropped bias: relative errors 1e-3 and up) fails by orders of magnitude. ``exact-eps``
plans need a looser bound (eps / mean-square of the residual stream), ``approx`` plans are reported
with their measured drift rather than judged.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from scaler_wizard.compiler.conform import causal_class_names

# KV-cache decoding runs on the first KV_ROWS random sequences. Two, not one: with a batch of one,
# Gemma-2's single-token steps after a reused identical prefix differ from recomputing every layer
# by a few float32 ulps (2e-7; cause not found, tests/test_verify_prefix.py), with two they are
# bitwise equal as the reuse promises.
KV_ROWS = 2
DEFAULT_RTOL = 1e-5


@dataclass
class CheckResult:
    name: str
    max_abs: float
    max_rel: float
    mean_kl: float
    max_logit: float
    tol: float
    n_positions: int
    passed: bool

    def line(self) -> str:
        return (f"{'PASS' if self.passed else 'FAIL'} {self.name:<24} max|d|={self.max_abs:.3e} "
                f"rel={self.max_rel:.3e} KL={self.mean_kl:.3e} (tol {self.tol:.3e}, {self.n_positions} positions)")


@dataclass
class VerifyReport:
    checks: list[CheckResult] = field(default_factory=list)
    rtol: float = DEFAULT_RTOL
    vocab_compared: int = 0
    vocab_grown: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=float("nan"))

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.checks), default=float("nan"))

    @property
    def mean_kl(self) -> float:
        """Largest mean KL over the checks (each check's KL is a mean over its positions)."""
        return max((c.mean_kl for c in self.checks), default=float("nan"))

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "max_abs": self.max_abs, "max_rel": self.max_rel, "mean_kl": self.mean_kl,
                "rtol": self.rtol, "vocab_compared": self.vocab_compared, "vocab_grown": self.vocab_grown,
                "checks": [asdict(c) for c in self.checks], "notes": list(self.notes)}

    def summary(self) -> str:
        head = (f"verify: {'PASS' if self.passed else 'FAIL'} max|d|={self.max_abs:.3e} rel={self.max_rel:.3e} "
                f"KL={self.mean_kl:.3e} (rtol {self.rtol:g}; vocab compared {self.vocab_compared}"
                f"{'' if self.vocab_grown == self.vocab_compared else f' of {self.vocab_grown}'})")
        return "\n".join([head] + ["  " + c.line() for c in self.checks] + [f"  note: {n}" for n in self.notes])


# ------------------------------------------------------------------------------------------------ helpers


def resolve_model_path(m) -> "Path":
    """A model reference as a path: directories and files as given, short names such as
    ``SmolLM2-135M`` through the IR front end (the GGUF a package ships), a directory holding a
    single .gguf as that file."""
    from pathlib import Path

    p = Path(m)
    if not p.exists():
        from scaler_wizard.ir.config import resolve_short_name

        p = resolve_short_name(str(m)) or p
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            p = ggufs[0]
    return p


def load_tokenizer(m):
    from transformers import AutoTokenizer

    p = resolve_model_path(m)
    if p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                          "tokenizer.model", "vocab.json")):
        # (transformers' own message for this is six lines about sentencepiece and tiktoken)
        raise ValueError(f"{p} has no tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model or "
                         "vocab.json) to encode the texts with")
    return AutoTokenizer.from_pretrained(str(p))


def model_class_for(path) -> Any:
    """AutoModelForCausalLM, or the model's own class when ``config.architectures`` names a
    transformers class that is not a causal LM (an encoder's masked-LM head: BertForMaskedLM).
    Loading BERT through AutoModelForCausalLM would build BertLMHeadModel instead."""
    import json

    import transformers
    from transformers import AutoModelForCausalLM

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return AutoModelForCausalLM
    arch = (cfg.get("architectures") or [None])[0]
    if arch and arch not in causal_class_names() and hasattr(transformers, arch):
        return getattr(transformers, arch)
    return AutoModelForCausalLM


def is_headless(model) -> bool:
    """The family's headless base class (LlamaModel, BertModel): it returns hidden states, not logits."""
    from scaler_wizard.runtime.naming import base_class_name

    return type(model).__name__ == base_class_name({"model_type": getattr(model.config, "model_type", None)})


def is_causal_lm(model) -> bool:
    """A causal decoder (the KV-cache checks apply): its class is one of transformers' causal LMs, or
    the headless base class of a decoder-only family (LlamaModel: a causal LM without its head)."""
    if type(model).__name__ in causal_class_names():
        return True
    if is_headless(model):
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        mt = model.config.model_type
        return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return False


def has_kv_cache(model) -> bool:
    """The model's forward takes a KV cache (``past_key_values`` or ``cache``): incremental decoding
    can be checked. OpenAI GPT, a causal LM, has none."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "past_key_values" in params or "cache" in params


def _scores(out):
    """Logits, or the last hidden states of a headless base class."""
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).float()


def load_model(m, dtype=None):
    """A model in float32 eval mode: loads a directory, or copies a module that is not float32."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(m, (str, os.PathLike)):
        path = resolve_model_path(m)
        if path.suffix == ".gguf":  # dequantised by transformers
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        else:  # the model's own class for a non-causal architecture (BertForMaskedLM), see model_class_for
            model = model_class_for(path).from_pretrained(str(path), dtype=torch.float32)
    else:
        model = m
        if any(p.dtype != torch.float32 for p in model.parameters()):
            model = copy.deepcopy(model).float()
    return model.eval()


def _vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
        else int(model.config.vocab_size)


def compare_logits(name: str, grown, orig, mask=None, *, rtol: float = DEFAULT_RTOL, vocab: int | None = None
                   ) -> CheckResult:
    """Compare two logit tensors [B, T, V] at positions where ``mask`` is 1 (all if None)."""
    import torch

    v = vocab or orig.shape[-1]
    g = grown[..., :v].double()
    o = orig[..., :v].double()
    if mask is not None:
        sel = mask.bool()
        g, o = g[sel], o[sel]
    else:
        g, o = g.reshape(-1, v), o.reshape(-1, v)
    if o.numel() == 0:
        raise ValueError(f"{name}: nothing to compare")
    max_logit = o.abs().max().item()
    diff = (g - o).abs()
    max_abs = diff.max().item() if torch.isfinite(diff).all() else float("inf")
    lo = torch.log_softmax(o, -1)
    lg = torch.log_softmax(g, -1)
    kl = (lo.exp() * (lo - lg)).sum(-1).mean().item()
    tol = rtol * max(max_logit, 1e-30)
    max_rel = max_abs / max(max_logit, 1e-30)
    return CheckResult(name, max_abs, max_rel, max(kl, 0.0), max_logit, tol, int(o.shape[0]),
                       bool(math.isfinite(max_abs) and max_abs <= tol))


def _forward(model, ids, mask=None, position_ids=None, token_type_ids=None):
    import torch

    with torch.no_grad():
        kw: dict[str, Any] = {"use_cache": False} if is_causal_lm(model) else {}
        if mask is not None:
            kw["attention_mask"] = mask
        if position_ids is not None:
            kw["position_ids"] = position_ids
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return _scores(model(input_ids=ids, **kw))


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward_with_cache(model, ids, mask=None, position_ids=None):
    """(scores [B, T, V], the KV cache the forward wrote) of a forward over ``ids`` [B, T] with
    ``use_cache`` (and the optional ``mask`` / ``position_ids`` [B, T])."""
    import torch

    kw = _cache_kw(model)
    extra = {k: v for k, v in (("attention_mask", mask), ("position_ids", position_ids)) if v is not None}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **extra)
    return _scores(out), (getattr(out, kw, None) if kw in out else out.past_key_values)


def kv_decode_logits(model, ids, prefill: int, steps: int = 0, *, prefilled=None):
    """Logits for every position of ``ids`` [B, T]: full forward on ids[:, :prefill] with the cache,
    then one token at a time through ``past_key_values`` (``steps`` > 0: only the last ``steps``
    tokens one at a time, those between them and the prefill in one forward through the cache;
    :func:`scaler_wizard.runtime.layerwise.decode_schedule`).

    ``prefilled``: (logits [B, prefill, V], cache holding ``prefill`` positions of B rows) from a
    forward over more tokens, cut (``Job.prefill_from``): the decoding continues from them, with no
    prefill forward."""
    import torch

    from scaler_wizard.runtime.layerwise import decode_schedule

    kw = _cache_kw(model)
    chunks, past = [], None
    schedule = decode_schedule(ids.shape[1], prefill, steps)
    if prefilled is not None:
        chunks, past = [prefilled[0]], prefilled[1]
        schedule = schedule[1:]
    with torch.no_grad():
        for a, b in schedule:
            out = model(input_ids=ids[:, a:b], use_cache=True, **({kw: past} if a else {}))
            past = getattr(out, kw, None) if kw in out else out.past_key_values
            chunks.append(_scores(out))
    return torch.cat(chunks, dim=1)


def padded_batch(ids, lengths: Sequence[int], side: str, pad_id: int = 0, width: int | None = None):
    """Rows of ``ids`` cut to ``lengths`` and padded on ``side`` to ``width`` (default: the longest)
    -> (ids, mask, position_ids), each [len(lengths), width]."""
    import torch

    T = max(lengths) if width is None else width
    B = len(lengths)
    out = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, L in enumerate(lengths):
        if side == "right":
            out[b, :L] = ids[b, :L]
            mask[b, :L] = 1
        else:
            out[b, T - L:] = ids[b, :L]
            mask[b, T - L:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return out, mask, pos


# ------------------------------------------------------------------------------------------------ compare


def idle_threads() -> int | None:
    """torch threads for a verification run: torch's default (one per core) lowered to the cores
    not busy with other work (CPUs minus the cores busy now, :func:`busy_cores`, at least 1). None when the user
    chose (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set): then torch's setting stands.

    Why: fp32 GEMM threads spin while waiting for each other; on a machine whose cores are taken,
    2 threads measured 2x the CPU and more wall time than 1 (README, Figures)."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return None
    import torch

    busy = busy_cores()
    if busy is None:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), int(cpus - busy + 0.5)))


def busy_cores(window: float = 0.25) -> float | None:
    """Cores busy with other work now: the non-idle share of every CPU's time over ``window``
    seconds of ``/proc/stat`` (this process sleeps meanwhile), times the CPU count; where there is
    no /proc/stat, the 1-minute load average. Not the load average first: it remembers the last
    minute, so a verification right after the write (or after another command of a benchmark)
    saw the machine's past work and ran with one thread on an idle machine."""
    import time

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v), idle

    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return None
    if t1 <= t0:
        return 0.0
    n = os.cpu_count() or 1
    return n * (1.0 - (i1 - i0) / (t1 - t0))


class torch_threads:
    """``with torch_threads(n):`` torch's intra-op threads set to ``n`` (None: unchanged), restored after."""

    def __init__(self, n: int | None):
        self.n, self.old = n, None

    def __enter__(self):
        import torch

        if self.n is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import torch

        if self.old is not None:
            torch.set_num_threads(self.old)
        return False


def _whole_model_logits(model, jobs) -> dict:
    """The jobs of :mod:`scaler_wizard.runtime.layerwise` run on a whole model in memory. A job
    that gives another's prefill (``Job.prefill_from``) runs with the cache, which is cut to the
    prefill for that job's decoding (as the layer-wise run does, layer by layer)."""
    from scaler_wizard.runtime.layerwise import cut_cache_layer, prefill_sources

    sources = prefill_sources(jobs)
    out: dict = {}
    prefilled: dict = {}
    for j in jobs:
        if j.prefill > 0:
            pre = prefilled.pop(j.name, None)
            if j.prefill_from is not None and pre is None:  # the model's own cache cannot be cut
                out[j.name] = kv_decode_logits(model, j.input_ids, j.prefill, j.steps)
            else:
                out[j.name] = kv_decode_logits(model, j.input_ids, j.prefill, j.steps, prefilled=pre)
        elif j.name in sources:
            d = sources[j.name]
            B = d.input_ids.shape[0]
            out[j.name], cache = _forward_with_cache(model, j.input_ids, j.attention_mask, j.position_ids)
            try:
                for layer in cache.layers:
                    cut_cache_layer(layer, d.prefill, B)
                prefilled[d.name] = (out[j.name][:B, :d.prefill], cache)
            except (AttributeError, ValueError):
                pass
        else:
            out[j.name] = _forward(model, j.input_ids, j.attention_mask, j.position_ids, j.token_type_ids)
    return out


class _Side:
    """One model of a comparison: layer by layer from its directory (default), or whole in memory
    (modules, GGUF files, models the layer-wise path cannot drive, ``layerwise=False``)."""

    def __init__(self, m, layerwise: bool | None):
        self.lw = self.whole = None
        self.why_whole = None
        if layerwise is not False and isinstance(m, (str, os.PathLike)):
            from scaler_wizard.runtime.layerwise import LayerwiseModel, LayerwiseUnsupported

            try:
                self.lw = LayerwiseModel(resolve_model_path(m))
            except LayerwiseUnsupported as e:
                if layerwise:
                    raise ValueError(f"cannot verify layer by layer: {e}") from None
                self.why_whole = str(e)
        elif layerwise and not isinstance(m, (str, os.PathLike)):
            raise ValueError("layer-by-layer verification needs model directories")
        if self.lw is not None and is_headless(self.lw.model):  # hidden states, not logits: the whole-model path
            self.why_whole = f"{type(self.lw.model).__name__} is a headless base class"
            self.lw.close()
            self.lw = None
        if self.lw is None:
            self.whole = load_model(m)
        self.model = self.lw.model if self.lw is not None else self.whole
        self.config = self.model.config
        self.causal = is_causal_lm(self.model)

    def vocab(self) -> int:
        return self.lw.vocab() if self.lw is not None else _vocab(self.whole)

    def logits(self, jobs, **run_kw) -> dict:
        if self.lw is None:
            return _whole_model_logits(self.whole, jobs)
        from scaler_wizard.runtime.layerwise import LayerwiseUnsupported

        try:
            return self.lw.run(jobs, **run_kw)
        except LayerwiseUnsupported as e:  # found only while running (a layer skipped, no cache)
            self.why_whole = str(e)
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
            # The layer-by-layer replay of the model's own forward failed: a state passed from layer
            # to layer besides the hidden states (ZAYA's router states; GLM-MoE-DSA's layers return
            # their indexer's top-k for the next layer, which the pass-through stand-ins do not) is
            # recorded from the stand-in pass and does not fit. The whole-model forward is the
            # reference: it decides (a model that is really broken fails there too, with its own error).
            self.why_whole = f"the layer-by-layer run failed ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        path = self.lw.reader.path
        self.lw.close()
        self.lw = None
        self.whole = load_model(path)
        return _whole_model_logits(self.whole, jobs)

    def release(self) -> None:
        if self.lw is not None:
            self.lw.close()
        self.lw = self.whole = self.model = None


def compare_models(
    grown,
    original,
    *,
    texts: Sequence[str] | None = None,
    tokenizer=None,
    seed: int = 0,
    n_random: int = 2,
    seq_len: int = 32,
    pad_len: int | None = None,
    rtol: float = DEFAULT_RTOL,
    check_kv: bool = True,
    check_padding: bool = True,
    max_text_tokens: int = 256,
    layerwise: bool | None = None,
    reuse_prefix: bool = True,
    kv_steps: int = 2,
    byte_comparisons=None,
) -> VerifyReport:
    """Compare a grown model with its original (directories or modules). See the module docstring.

    ``layerwise``: None (default) runs model directories layer by layer
    (:mod:`scaler_wizard.runtime.layerwise`: memory bounded by about one decoder layer in float32
    plus activations, two where the next layer is read ahead, each model read once), and modules /
    GGUF files / models that path cannot drive whole in memory (a note says so); True requires the layer-wise path (ValueError when it
    cannot run); False loads both models whole (the reference the layer-wise path is tested against).
    One model is run after the other; only the logits are kept between them.

    KV-cache decoding (``check_kv``) with a prefill forward of its own: the first half of the
    random ids is the prefill, the last ``kv_steps`` tokens are decoded one at a time, and the
    tokens between go through the cache in one forward (0: every token after the prefill one at a
    time). Each forward of a few rows streams every weight of the model, so on large models they
    dominate the cost; the cache is written by a multi-token forward, read and extended by a
    multi-token forward and by single-token decoding, every position is compared (with the model's
    full forward and with the original), and the prefill ends at the same position (so
    length-dependent RoPE, longrope's switch past ``original_max_position_embeddings``, is crossed
    inside the cached decoding).

    The prefill is no forward of its own where it need not be (``Job.prefill_from``): the random
    ids' forward runs with the cache, which is cut to the prefill's positions and rows, and the
    decoding continues from it (the prefill positions' logits are the full forward's). The prefill
    then ends ``kv_steps`` tokens before the end: no cached multi-token middle (on the 1.1B
    benchmark model its 28 rows cost half the random ids' 128-row forward, a quarter of the
    decoder layers' arithmetic, for the one path the single steps do not take: a chunk reading a
    cache). Sound where
    a forward over more tokens writes the same keys and values for the first positions as one over
    those alone (:func:`scaler_wizard.runtime.layerwise.prefill_from_longer_refused`: plain or
    unfilled sliding-window cache layers, no length-dependent RoPE; otherwise the separate prefill
    as before). One forward per layer fewer: on a 1.1B model each forward streams the layer's
    weights through a GEMM of a few dozen rows, which float32 BLAS runs at a fraction of its speed.

    ``reuse_prefix`` (layer by layer only): the grown model's leading decoder layers that are
    byte-identical to the original's (same weights, same config for them, checked from the files:
    :func:`scaler_wizard.runtime.layerwise.identical_prefix`) and whose inputs are bitwise the
    original's (checked while running) are not computed a second time: running the same code on
    the same weights and inputs gives the same bits, so their outputs (and KV-cache entries) are
    taken from the original's run. A depth plan that inserts layers after the first k keeps k
    layers identical. ``False`` computes every layer of both models (a note says what was reused).
    ``byte_comparisons``: a :class:`scaler_wizard.runtime.layerwise.ByteComparisons` holding
    comparisons of the two models' files made before (apply makes them while the imports run)."""
    with _frozen_heap():
        return _compare_models(grown, original, texts=texts, tokenizer=tokenizer, seed=seed, n_random=n_random,
                               seq_len=seq_len, pad_len=pad_len, rtol=rtol, check_kv=check_kv,
                               check_padding=check_padding, max_text_tokens=max_text_tokens, layerwise=layerwise,
                               reuse_prefix=reuse_prefix, kv_steps=kv_steps, byte_comparisons=byte_comparisons)


@contextlib.contextmanager
def _frozen_heap():
    """The objects alive on entry (torch's and transformers' modules, classes and tables: several
    hundred thousand) are left out of the garbage collector's full collections until exit
    (``gc.freeze`` / ``gc.unfreeze``); what is allocated inside is collected as usual. A full
    collection walks the whole heap (0.04-0.3 s each once transformers is imported, measured on the
    1.1B depth plan of benchmarks/apply_speed.py, where the six seen all fell during the imports,
    now paused: api._warm_verifier); this keeps any that a verification's allocations trigger from
    walking the imported heap. Nested uses leave the outer freeze in charge."""
    import gc

    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _compare_models(grown, original, *, texts, tokenizer, seed, n_random, seq_len, pad_len, rtol, check_kv,
                    check_padding, max_text_tokens, layerwise, reuse_prefix, kv_steps,
                    byte_comparisons) -> VerifyReport:
    import torch

    from scaler_wizard.runtime.layerwise import Job

    o = _Side(original, layerwise)
    g = _Side(grown, layerwise)
    v_orig, v_grown = o.vocab(), g.vocab()
    v = min(v_orig, v_grown)
    rep = VerifyReport(rtol=rtol, vocab_compared=v, vocab_grown=v_grown)
    if v_grown != v_orig:
        rep.notes.append(f"vocabulary {v_orig} -> {v_grown}: comparing the first {v} logits (softmax over them)")
    ids_v = v
    if is_headless(o.model) and is_headless(g.model):
        # no logits: compare the last hidden states; widening keeps the original units first (copies after)
        v = int(o.config.hidden_size)
        rep.notes.append(f"headless {type(o.model).__name__}: comparing last hidden states (the first {v} units; "
                         "the KL column is over those units, not a vocabulary)")

    # the jobs: (check name, job name for grown, job name for original, mask)
    jobs: list = []
    plan: list = []
    gen = torch.Generator().manual_seed(seed)
    causal = g.causal and o.causal
    kv_check = False
    if n_random > 0:
        ids = torch.randint(0, ids_v, (n_random, seq_len), generator=gen)
        P = min(seq_len, pad_len if pad_len is not None else seq_len)
        if check_padding and n_random >= 2 and P >= 4:
            # One batch: random rows 1.. cut shorter than P, right-padded, then the same rows
            # left-padded, all P wide; each check is judged at its own rows' real positions.
            lengths = [max(2, P - (P * k) // (2 * n_random)) for k in range(1, n_random)]
            parts = [padded_batch(ids[1:], lengths, side, width=P) for side in ("right", "left")]
            pids, mask, pos = (torch.cat([a[i] for a in parts]) for i in range(3))
            half = len(lengths)
            if P == seq_len:
                # As wide as the random ids (the default): both in one forward, the random rows first,
                # unmasked at positions 0.. (one pass over the weights per layer fewer; the KV prefill
                # is still cut from the random rows, see prefill_sources).
                base = torch.arange(seq_len).expand(n_random, seq_len)
                jobs.append(Job("random_ids", torch.cat([ids, pids]), torch.cat([torch.ones_like(base), mask]),
                                torch.cat([base, pos])))
                rows_mask = torch.zeros(n_random + 2 * half, seq_len, dtype=torch.long)
                rows_mask[:n_random] = 1
                plan.append(("random_ids", "random_ids", "random_ids", rows_mask))
                pad_job, first = "random_ids", n_random
                mask = torch.cat([torch.zeros_like(base), mask])
            else:
                jobs.append(Job("random_ids", ids))
                plan.append(("random_ids", "random_ids", "random_ids", None))
                jobs.append(Job("padding", pids, mask, pos))
                pad_job, first = "padding", 0
            for side, start in (("right", first), ("left", first + half)):
                only = torch.zeros_like(mask)
                only[start:start + half] = mask[start:start + half]
                plan.append((f"padding_{side}", pad_job, pad_job, only))
        else:
            jobs.append(Job("random_ids", ids))
            plan.append(("random_ids", "random_ids", "random_ids", None))
        n_types = int(getattr(o.config, "type_vocab_size", 0) or 0)
        if n_types > 1:  # token type embeddings write the residual stream too (BERT)
            tt = torch.randint(0, n_types, ids.shape, generator=gen)
            jobs.append(Job("token_type_ids", ids, token_type_ids=tt))
            plan.append(("token_type_ids", "token_type_ids", "token_type_ids", None))
        if check_kv and seq_len >= 2 and not causal:
            rep.notes.append(f"KV-cache checks skipped: {type(o.model).__name__} is not a causal LM (no incremental decoding)")
        if check_kv and seq_len >= 2 and causal and not (has_kv_cache(o.model) and has_kv_cache(g.model)):
            rep.notes.append(f"KV-cache checks skipped: {type(o.model).__name__} has no KV cache (its forward takes no "
                             "past_key_values: every forward recomputes the whole prefix)")
        elif check_kv and seq_len >= 2 and causal:
            # the cache of the random ids' forward, cut to the prefill, stands for a prefill forward
            # where it holds what that forward would write (both models' configs say so)
            from scaler_wizard.runtime.layerwise import prefill_from_longer_refused

            cut = not any(prefill_from_longer_refused(side.config, seq_len) for side in (o, g))
            # cut: the cache comes from the random ids' forward, so a prefill up to the single-token
            # steps costs nothing; a cached multi-token forward between them would cost a pass over
            # every weight at about twice a single step's time (float32 BLAS on a few rows), for
            # the one path (a chunk reading a cache) the steps do not take
            prefill = max(1, seq_len - kv_steps) if cut and kv_steps > 0 else max(1, seq_len // 2)
            jobs.append(Job("kv_decode", ids[:KV_ROWS], prefill=prefill, steps=kv_steps,
                            prefill_from="random_ids" if cut else None))
            kv_check = True

    text_jobs: list[str] = []
    if texts:
        tok = tokenizer
        if tok is None:
            src = original if isinstance(original, (str, os.PathLike)) else grown
            if not isinstance(src, (str, os.PathLike)):
                raise ValueError("texts given but no tokenizer: pass tokenizer= or model directories")
            tok = load_tokenizer(src)
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=max_text_tokens)["input_ids"]
            enc = enc[:, :max_text_tokens]
            if enc.numel() == 0:
                continue
            if int(enc.max()) >= v:
                rep.notes.append("a text produced token ids outside the compared vocabulary; skipped")
                continue
            name = f"text{len(text_jobs)}"
            jobs.append(Job(name, enc))
            text_jobs.append(name)
    if not jobs:
        raise ValueError("nothing to compare: n_random=0 and no texts")

    share = 0
    if reuse_prefix and o.lw is not None and g.lw is not None:
        from scaler_wizard.runtime.layerwise import identical_prefix

        share, why_end = identical_prefix(o.lw, g.lw, byte_comparisons)
    lo = o.logits(jobs, capture=share) if share else o.logits(jobs)  # the original decodes with its cache too
    o_why = o.why_whole
    prefix = getattr(o.lw, "captured", None) if share and o.lw is not None else None
    o.release()
    lg = g.logits(jobs, reuse=prefix) if prefix is not None else g.logits(jobs)
    if prefix is not None and g.lw is not None:
        if g.lw.reused_layers:
            rep.notes.append(f"the first {g.lw.reused_layers} decoder layers of the grown model are byte-identical to "
                             "the original's and got bitwise the same inputs: their outputs were taken from the "
                             "original's run (reuse_prefix=False computes them again)")
        elif g.lw.reuse_note:
            rep.notes.append(g.lw.reuse_note)
    del prefix
    g_why = g.why_whole
    g.release()
    for who, why in (("original", o_why), ("grown", g_why)):
        if why:
            rep.notes.append(f"{who} model verified whole in memory: {why}")

    for check, gname, oname, mask in plan:
        ref = lg[oname.split("@")[0]] if oname.endswith("@grown") else lo[oname]
        rep.checks.append(compare_logits(check, lg[gname], ref, mask, rtol=rtol, vocab=v))
    if kv_check:
        # the decoded sequence is the first random one: its full-forward logits are row 0 of random_ids
        self_check = compare_logits("kv_cache_vs_full", lg["kv_decode"], lg["random_ids"][:KV_ROWS], rtol=rtol, vocab=v)
        orig_self = compare_logits("kv_cache_vs_full", lo["kv_decode"], lo["random_ids"][:KV_ROWS], rtol=rtol, vocab=v)
        kv_ref = lo["random_ids"][:KV_ROWS]
        if self_check.passed or orig_self.passed:
            rep.checks.append(self_check)
        else:
            # The original itself decodes differently from its full forward (longrope switching to
            # long factors past original_max_position_embeddings, dynamic NTK re-basing): the grown
            # model is held to the original's cached decoding instead.
            rep.notes.append(f"kv_cache_vs_full not judged: the original's own cached decoding differs from its full "
                             f"forward (rel {orig_self.max_rel:.3g}; position-dependent RoPE frequencies), grown rel "
                             f"{self_check.max_rel:.3g}; kv_cache_vs_original compares the two cached decodings")
            kv_ref = lo["kv_decode"]
        rep.checks.append(compare_logits("kv_cache_vs_original", lg["kv_decode"], kv_ref, rtol=rtol, vocab=v))

    worst: CheckResult | None = None
    for name in text_jobs:
        c = compare_logits("texts", lg[name], lo[name], rtol=rtol, vocab=v)
        if worst is None:
            worst = c
        else:  # aggregate: worst abs/rel, mean of KL weighted by positions
            kl = (worst.mean_kl * worst.n_positions + c.mean_kl * c.n_positions) / (worst.n_positions + c.n_positions)
            ml = max(worst.max_logit, c.max_logit)
            ma = max(worst.max_abs, c.max_abs)
            worst = CheckResult("texts", ma, max(worst.max_rel, c.max_rel), kl, ml, rtol * ml,
                                worst.n_positions + c.n_positions, worst.passed and c.passed)
    if worst is not None:
        rep.checks.append(worst)
    if not rep.checks:
        raise ValueError("nothing to compare: n_random=0 and no texts")
    return rep


def save_and_reload(model, *, seed: int = 0, seq_len: int = 16, batch: int = 2, tmp_dir: str | None = None,
                    rtol: float = 0.0) -> CheckResult:
    """Save ``model`` with save_pretrained, load it back with AutoModelForCausalLM, compare logits.
    A faithful round trip is bit-identical, hence the default ``rtol=0``."""
    import torch
    from transformers import AutoModelForCausalLM

    m = load_model(model)
    ids = torch.randint(0, _vocab(m), (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        m.save_pretrained(d)
        back = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        res = compare_logits("save_and_reload", _forward(back, ids), _forward(m, ids), rtol=rtol)
    if rtol == 0.0:
        res.passed = res.max_abs == 0.0
    return res


# ------------------------------------------------------------------------------------------------ symmetry


@dataclass
class SymmetryGroup:
    slices: list[str]
    initially_equal: bool
    max_diff_after: float
    broken: bool


@dataclass
class SymmetryReport:
    groups: list[SymmetryGroup]
    steps: int
    optimizer: str
    loss_before: float
    loss_after: float

    @property
    def passed(self) -> bool:
        """Every group of copies differs after training."""
        return all(g.broken for g in self.groups)

    def assert_broken(self) -> None:
        bad = [g for g in self.groups if not g.broken]
        if bad:
            raise AssertionError("copies still identical after "
                                 f"{self.steps} {self.optimizer} step(s): " + "; ".join(" == ".join(g.slices) for g in bad))

    def to_dict(self) -> dict:
        return {"passed": self.passed, "steps": self.steps, "optimizer": self.optimizer,
                "loss_before": self.loss_before, "loss_after": self.loss_after,
                "groups": [asdict(g) for g in self.groups]}


def _as_index(spec):
    """(name, axis, start, stop) or (name, index tuple) -> (name, index tuple, label)."""
    if len(spec) == 4 and all(isinstance(x, int) for x in spec[1:]):
        name, axis, start, stop = spec
        idx = (slice(None),) * axis + (slice(start, stop),)
        return name, idx, f"{name}[axis {axis}: {start}:{stop}]"
    name, idx = spec
    if not isinstance(idx, tuple):
        idx = (idx,)
    return name, idx, f"{name}{list(idx)}"


def symmetry_check(model, duplicated_groups, steps: int = 1, *, optimizer: str = "adamw", lr: float = 1e-3,
                   seed: int = 0, batch_size: int = 2, seq_len: int = 16, input_ids=None) -> SymmetryReport:
    """Train a copy of ``model`` for ``steps`` optimizer steps (LM loss on seeded random ids, no dropout)
    and report whether parameter slices that started as identical copies now differ.

    ``duplicated_groups``: a list of groups, each a list of slice specs that should hold copies:
    ``(param_name, axis, start, stop)`` or ``(param_name, index_tuple)``; all slices of a group must have
    the same shape. ``optimizer``: 'adamw' or 'sgd'. The passed model is not modified."""
    import torch

    m = load_model(model)
    if is_headless(m):
        raise ValueError(f"the symmetry check trains with an LM loss; {type(m).__name__} has no head")
    m = copy.deepcopy(m)
    m.eval()  # no dropout: dropout noise would break symmetry for the wrong reason
    params = dict(m.named_parameters())
    groups = []
    for grp in duplicated_groups:
        specs = [_as_index(s) for s in grp]
        for name, _, _ in specs:
            if name not in params:
                raise KeyError(f"symmetry_check: no parameter {name!r}")
        groups.append(specs)

    def values(specs):
        return [params[n].detach()[idx].clone() for n, idx, _ in specs]

    def max_pair_diff(vals):
        ref = vals[0]
        for v in vals[1:]:
            if v.shape != ref.shape:
                raise ValueError(f"symmetry_check: slices of one group differ in shape: {tuple(ref.shape)} vs {tuple(v.shape)}")
        return max((v - ref).abs().max().item() for v in vals[1:]) if len(vals) > 1 else 0.0

    before = [max_pair_diff(values(s)) for s in groups]
    if input_ids is None:
        input_ids = torch.randint(0, _vocab(m), (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    if optimizer == "adamw":
        opt = torch.optim.AdamW(m.parameters(), lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    loss_before = loss = None
    for _ in range(steps):
        opt.zero_grad()
        loss = m(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        if loss_before is None:
            loss_before = loss.item()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss_after = m(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item()
    out = []
    for specs, b in zip(groups, before):
        after = max_pair_diff(values(specs))
        out.append(SymmetryGroup([lbl for _, _, lbl in specs], b == 0.0, after, after > 0.0))
    return SymmetryReport(out, steps, optimizer, float(loss_before), float(loss_after))
