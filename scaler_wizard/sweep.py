"""The family sweep: every causal-LM model type the installed transformers ships, grown by a fixed
set of plans, each cell classified (issue 10).

    from scaler_wizard import sweep
    families = sweep.causal_lm_families()                 # model types, sorted (~196 in transformers 5.24)
    cfg, overrides = sweep.tiny_config("bloom")           # a tiny config from the class defaults
    result = sweep.run_sweep(["bloom", "gptj"], ops=["hidden_tile"], workers=2, timeout=600)
    print(sweep.format_table(result))

A cell is one of

* ``exact``   -- ``api.apply(..., verify=True)`` landed an exact / exact-eps output that verified within
  tolerance, and the output reloads with ``AutoModelForCausalLM.from_pretrained``;
* ``approx``  -- the plan is declared approx; the drift (max relative logit difference) is reported;
* ``refused`` -- ``PlanError`` / ``UsageError`` with a diagnostic, and nothing was written at OUT;
* ``crash``   -- anything else: a traceback, a ``PassError`` (internal pass failure), an output that
  does not load, an exact plan whose output fails verification, a refusal that left files behind,
  or the family's worker process timing out / dying (reason ``timeout`` / ``worker died``).

Families whose tiny model cannot be built or run on CPU are not cells: they are listed in
``result["unbuildable"]`` with the exception type and first line of its message.

The tiny config is made generically: every integer key of the config class's defaults (and of its
sub-configs such as ``text_config``) whose *name* says it is a size is set by the rules in
``_SIZE_RULES`` (hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, ffn 96, vocab 128, 4 experts
top 2, 40 positions: every size distinct, so config keys bind to groups by value unambiguously); per-layer lists are cut to the layer count and special token ids above the
vocabulary are moved into it. ``OVERRIDES`` is the one per-family table, for what the generic rules
cannot know (empty entries are not kept).

Each family runs in its own process with a timeout; the worker streams one JSON line per cell so the
cells finished before a timeout are kept. :func:`run_sweep` keeps one warm *fork server* per worker
slot (``python -m scaler_wizard.sweep --serve``: torch, transformers and the compiler imported once,
:data:`WARM_MODULES`) and forks a fresh child from it per family -- each family is still isolated in
its own process (a crash, a hang or leaked state ends with it) but no longer pays the interpreter
start and the imports (5-9 s a family, measured). :func:`run_family` without a server starts a plain
``python -m scaler_wizard.sweep --worker`` subprocess as before.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# The fixed plan set: op id -> plan text. `upcycle` counts as "where a target exists": a family
# without a dense FFN to upcycle gets a refusal, which is the right cell for it.
OPS: dict[str, str] = {
    "hidden_tile": "widen hidden x2 tile",
    "hidden_lemon": "widen hidden x1.5 lemon",
    "ffn_net2net": "widen ffn x2 net2net",
    "heads_dup": "widen heads x2 dup",
    "kv_heads": "widen kv_heads x2",
    "head_dim": "widen head_dim x2",
    "insert_identity": "insert layer 1 identity",
    "insert_zero": "insert 1 layers after 0 zero",
    "insert_cancel": "insert layer 1 cancel",
    "duplicate": "duplicate layers 0..2",
    "stack": "stack x2",
    "vocab": "widen vocab by 64 mean",
    "upcycle": "upcycle ffn experts 4 top 2",
}

CATEGORIES = ("exact", "approx", "refused", "crash")
# Refusals raised by the compiler checking itself (conform: the grown config would not describe the
# grown tensors). They are PlanErrors, so `refused` by the rules above, but they mean discovery
# promised what lowering could not do: the table counts them apart.
SELF_CHECK_CODES = {"SW316"}

# (regex on the key name, value). First match wins; only integer keys are touched.
_SIZE_RULES: list[tuple[str, int]] = [
    (r"^(num_hidden_layers|n_layers?|num_layers|num_decoder_layers|decoder_layers|encoder_layers|num_encoder_layers)$", 2),
    (r"^(num_key_value_heads|n_head_kv|num_kv_heads|n_kv_heads|multi_query_group_num|num_key_value_groups)$", 2),
    (r"^(num_attention_heads|n_heads?|num_heads|decoder_attention_heads|encoder_attention_heads|attention_heads)$", 4),
    (r"^(qk_rope_head_dim|qk_nope_head_dim|rotary_dim|rotary_ndims|rope_dim)$", 8),
    (r"(^|_)head_dim$|^kv_channels$|^attention_head_size$|^head_size$", 16),
    (r"^(q_lora_rank|kv_lora_rank|.*lora_rank)$", 16),
    (r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_routed_experts)$", 4),
    (r"^(num_experts_per_tok|moe_topk|top_k|num_selected_experts|moe_top_k|num_experts_per_token)$", 2),
    # group-limited routing (DeepSeek-V3): the 4 experts in 2 groups, experts picked from 1 group
    (r"^n_group$", 2),
    (r"^topk_group$", 1),
    (r"(intermediate_size|^ffn_dim$|^n_inner$|^d_ff$|^ffn_hidden_size$|^inner_dim$|^intermediate_dim$|^d_inner$)", 96),
    (r"^(hidden_size|d_model|n_embd|embed_dim|model_dim|dim|word_embed_proj_dim|hidden_dim)$", 64),
    (r"^(vocab_size|padded_vocab_size|n_vocab)$", 128),
    (r"^(max_position_embeddings|n_positions|n_ctx|max_seq_len|seq_length|max_sequence_length|max_length)$", 40),
    (r"^(sliding_window|attention_window|window_size)$", 32),
]
# Any other integer key named like a size and larger than this is shrunk to _FALLBACK_VALUE.
_FALLBACK_PATTERN = r"(_size|_dim|_rank|_channels|_features)$"
_FALLBACK_OVER = 256
_FALLBACK_VALUE = 32

# Per-family overrides where the generic rules cannot know (kept short; each says why).
OVERRIDES: dict[str, dict[str, Any]] = {
}


def causal_lm_families() -> list[str]:
    """The model types of the installed transformers' causal-LM auto mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink_dict(d: dict, applied: dict, prefix: str = "") -> dict:
    """Overrides for one config dict: {key: new value}; ``applied`` records ``prefix+key: (old, new)``."""
    out: dict[str, Any] = {}
    layers_before = None
    for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool):
            layers_before = d[k]
            break
    for k, v in d.items():
        if isinstance(v, bool) or k.endswith("_token_id") or k.endswith("_token_ids"):
            continue
        if isinstance(v, int):
            new = None
            for pat, val in _SIZE_RULES:
                if re.search(pat, k):
                    new = val
                    break
            if new is None and re.search(_FALLBACK_PATTERN, k) and v > _FALLBACK_OVER:
                new = _FALLBACK_VALUE
            if new is not None and v > 0 and new != v:
                if re.search(r"kv_heads|key_value|n_head_kv|query_group", k) and v == 1:
                    continue  # multi-query attention stays multi-query
                if new > v and not re.search(r"vocab", k):
                    continue  # never grow a size the family keeps small
                out[k] = new
                applied[prefix + k] = (v, new)
        elif isinstance(v, list) and layers_before and len(v) == layers_before and layers_before > 2:
            out[k] = _two_layers(v)
            applied[prefix + k] = (f"list[{len(v)}]", out[k])
        elif isinstance(v, dict) and "model_type" in v:  # a sub-config (text_config, ...)
            sub = _shrink_dict(v, applied, prefix + k + ".")
            if sub:
                out[k] = {**v, **sub}
    # multi-head latent attention (DeepSeek-V2/V3: a kv_lora_rank) has no kv-head groups: its config
    # keeps kv heads equal to the heads, and so does the tiny one
    kv = next((k for k in ("num_key_value_heads",) if k in out), None)
    if kv and isinstance(d.get("kv_lora_rank"), int) and d.get(kv) == d.get("num_attention_heads"):
        out[kv] = out.get("num_attention_heads", d.get("num_attention_heads"))
        applied[prefix + kv] = (d[kv], out[kv])
    vocab = out.get("vocab_size", d.get("vocab_size"))
    if isinstance(vocab, int):
        for k, v in d.items():
            if k.endswith("_token_id") and isinstance(v, int) and not isinstance(v, bool) and v >= vocab:
                out[k] = min(vocab - 1, 2)
                applied[prefix + k] = (v, out[k])
            elif k.endswith("_token_id") and isinstance(v, list) and any(isinstance(x, int) and x >= vocab for x in v):
                out[k] = [x if not isinstance(x, int) or x < vocab else min(vocab - 1, 2) for x in v]
                applied[prefix + k] = (v, out[k])
    return out


def _two_layers(v: list) -> list:
    """A per-layer list cut to 2 layers, keeping each kind present (hybrids: one linear-attention and
    one full-attention layer rather than the first two, which may both be linear)."""
    kinds: list = []
    for x in v:
        if x not in kinds:
            kinds.append(x)
    if len(kinds) == 2:
        return sorted(kinds, key=v.index)
    return v[:2]


def tiny_config(model_type: str, *, derive: bool = False):
    """(config, applied) -- a tiny config of ``model_type`` made from its class defaults.

    ``applied`` maps each changed key (``text_config.hidden_size`` for sub-configs) to (old, new).
    ``derive``: leave the keys the class derives from others to the class (:func:`_leave_derived_keys`;
    :func:`build_tiny`'s second try). Raises whatever the config class raises when the shrunk values
    are inconsistent."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    default = CONFIG_MAPPING[model_type]()
    applied: dict[str, tuple] = {}
    kw = _shrink_dict(default.to_dict(), applied)
    for k, v in OVERRIDES.get(model_type, {}).items():
        applied[k] = ("override", v)
        kw[k] = v
    kw.pop("model_type", None)
    if derive:
        _leave_derived_keys(model_type, kw, applied)
    cfg = AutoConfig.for_model(model_type, **kw)
    return cfg, applied


def _leave_derived_keys(model_type: str, kw: dict, applied: dict) -> None:
    """Drop from ``kw`` the shrunk top-level keys the config class derives from other keys when
    they are not given (DeepSeek-V3's ``head_dim`` is ``qk_rope_head_dim``, ``qk_head_dim`` the sum of
    the rope and nope parts): built without the key, the class sets a value other than its default,
    so the class's rule, not the size table, gives it (``applied`` records the derived value). Only a
    second try: it also derives keys the table sets on purpose (kv heads below the heads)."""
    from transformers import AutoConfig

    for k in [k for k in applied if "." not in k and applied[k][0] != "override"]:
        trial = {x: v for x, v in kw.items() if x != k}
        try:
            with _quiet():
                derived = getattr(AutoConfig.for_model(model_type, **trial), k, None)
        except Exception:  # noqa: BLE001 - the class needs the key: keep the shrunk value
            continue
        if derived is not None and derived != applied[k][0]:
            kw.pop(k)
            applied[k] = (applied[k][0], derived)


def _quiet():
    import contextlib
    import logging
    import warnings

    @contextlib.contextmanager
    def cm():
        log = logging.getLogger("transformers")
        level = log.level
        log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                log.setLevel(level)
    return cm()


def build_tiny(model_type: str, out_dir: str | Path):
    """Build a seeded random fp32 tiny model of ``model_type``, run one forward, save it to ``out_dir``.
    Returns the applied overrides. Raises on any failure (the caller records it as unbuildable)."""
    import torch
    from transformers import AutoModelForCausalLM

    def build(derive):
        cfg, applied = tiny_config(model_type, derive=derive)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.eval()
        _perturb_stored_buffers(model)
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]]))
        return model, applied

    try:
        model, applied = build(False)
    except Exception as first:  # noqa: BLE001 - shrunk keys may contradict a rule of the class
        try:
            model, applied = build(True)  # e.g. DeepSeek-V3: head_dim is qk_rope_head_dim
        except Exception:  # noqa: BLE001
            raise first from None
    model.save_pretrained(str(out_dir))
    return applied


def _perturb_stored_buffers(model) -> None:
    """Move every floating persistent buffer off its initial value (a trained checkpoint's router
    ``e_score_correction_bias`` is not the zeros it starts from): a program that drops a stored
    buffer, or a verifier that rebuilds it from the config, then changes the function and the cell
    says so instead of passing on a default that happens to match."""
    import torch

    from scaler_wizard.ir.trace import persistent_buffers

    g = torch.Generator().manual_seed(1)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in persistent_buffers(model):
            mpath, _, attr = name.rpartition(".")
            b = mods[mpath]._buffers[attr]
            if b is not None and b.is_floating_point() and b.numel():
                scale = float(b.abs().mean()) * 0.1 + 0.05
                b.add_(torch.randn(b.shape, generator=g, dtype=b.dtype) * scale)


def _first_line(e: BaseException, limit: int = 300) -> str:
    s = str(e).strip().splitlines()
    line = s[0] if s else ""
    return f"{type(e).__name__}: {line}"[:limit]


def _plan_error_reason(e) -> str:
    diags = getattr(e, "diagnostics", None)
    if diags:
        d = diags[0]
        return f"{d.code}: {d.message}"[:300]
    return _first_line(e)


def run_cell(model_dir: str, op: str, plan: str, work: Path) -> dict:
    """Classify one (model, plan) cell. Returns {"op", "cell", "reason", "seconds", ...}."""
    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError, UsageError

    out = work / f"out-{op}"
    t0 = time.time()
    res: dict[str, Any] = {"op": op, "plan": plan}

    def done(cell, reason, **extra):
        res.update(cell=cell, reason=reason, seconds=round(time.time() - t0, 2), **extra)
        return res

    try:
        r = api.apply(plan, model=model_dir, out=str(out), verify=True)
    except (PlanError, UsageError) as e:
        if out.exists() or any(p.name.startswith(f".{out.name}") for p in work.iterdir()):
            return done("crash", f"refused but left files at OUT: {_plan_error_reason(e)}")
        diags = getattr(e, "diagnostics", None) or []
        return done("refused", _plan_error_reason(e), code=diags[0].code if diags else None)
    except Exception as e:  # noqa: BLE001 - a traceback is a crash cell
        import traceback

        tb = traceback.extract_tb(e.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        return done("crash", f"{_first_line(e)} [{where}]")
    ver = r.get("verification") or {}
    exactness = r.get("exactness") or "exact"
    drift = max((c.get("max_rel", 0.0) for c in ver.get("checks") or [] if isinstance(c, dict)), default=None)
    extra = {"exactness": exactness, "max_rel": drift}
    ir = ver.get("ir_check") or {}
    if ir.get("done") and not ir.get("passed"):
        extra["ir_mismatch"] = ir.get("mismatches")
    if not r.get("passed"):
        if ver.get("error"):
            return done("crash", f"{exactness} output does not load/run: {ver['error'][:250]}", **extra)
        return done("crash", f"{exactness} but fails verification: " + "; ".join(api.failed_checks(ver))[:250], **extra)
    # The landed output reloads.
    try:
        import torch
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(r["out"], dtype=torch.float32)
        del m
    except Exception as e:  # noqa: BLE001
        return done("crash", f"output does not reload: {_first_line(e)}", **extra)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if exactness == "approx":
        return done("approx", f"drift max_rel={drift:.2e}" if drift is not None else "drift not measured", **extra)
    return done("exact", f"{exactness}, max_rel={drift:.1e}" if drift is not None else exactness, **extra)


def worker(family: str, ops: list[str], stream) -> None:
    """Build ``family`` tiny and run every op; one JSON line per event on ``stream``."""
    work = Path(tempfile.mkdtemp(prefix=f"sw-sweep-{family}-"))
    try:
        model_dir = work / "model"
        t0 = time.time()
        try:
            applied = build_tiny(family, model_dir)
        except BaseException as e:  # noqa: BLE001 - recorded, not raised
            stream.write(json.dumps({"event": "unbuildable", "reason": _first_line(e)}) + "\n")
            stream.flush()
            return
        stream.write(json.dumps({"event": "built", "seconds": round(time.time() - t0, 2),
                                 "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in applied.items()}},
                                default=str) + "\n")
        stream.flush()
        for op in ops:
            stream.write(json.dumps({"event": "start", "op": op}) + "\n")
            stream.flush()
            cell = run_cell(str(model_dir), op, OPS[op], work)
            stream.write(json.dumps({"event": "cell", **cell}, default=str) + "\n")
            stream.flush()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# Imported once by each fork server (:class:`ForkServer`) before it forks the family workers: what
# every family's worker imports anyway (a module missing here is imported by the child as before).
WARM_MODULES = (
    "torch", "torch.export", "torch._dynamo", "transformers", "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto", "transformers.models.auto.configuration_auto", "safetensors.torch",
    "accelerate", "scaler_wizard.api", "scaler_wizard.ir.discovery.build", "scaler_wizard.compiler.conform",
    "scaler_wizard.runtime.execute", "scaler_wizard.runtime.verify", "scaler_wizard.runtime.layerwise",
)


def _worker_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])  # the worker imports this same package
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}


class ForkServer:
    """A warm ``python -m scaler_wizard.sweep --serve`` process (environment and interpreter of the
    caller at start) that forks one child per :meth:`run` request. One request at a time.

    The protocol is one JSON line each way: the request ``{"family", "ops", "log", "err"}``, the
    answers ``{"pid"}`` once the child is forked and ``{"rc"}`` when it exits (``-signal`` when
    killed). The child writes its events to ``log`` (as the ``--worker`` subprocess) and its stderr to
    ``err``."""

    def __init__(self, python: str = sys.executable):
        self.proc = subprocess.Popen([python, "-m", "scaler_wizard.sweep", "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_worker_env(),
                                     text=True, bufsize=1)
        self._buf = b""

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.proc.poll() is None

    def run(self, family: str, ops: list[str], log: str, err: str, timeout: float) -> int | str:
        """Run ``family`` in a forked child; its exit code, or ``"timeout"`` (the child was killed after
        ``timeout`` seconds, counted from the request: a cold server's imports count too).
        Raises OSError when the server itself is gone."""
        deadline = time.time() + timeout
        self.proc.stdin.write(json.dumps({"family": family, "ops": ops, "log": log, "err": err}) + "\n")
        self.proc.stdin.flush()
        pid = None
        while True:
            line = self._line(deadline)
            if line is None:  # past the deadline: kill the child (the server answers its rc next)
                if pid is None:
                    self.close()  # still importing or forking: the server goes, the caller starts another
                    return "timeout"
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if not self._line(None):
                    raise OSError("fork server died")
                return "timeout"
            if not line:
                raise OSError("fork server died")
            msg = json.loads(line)
            if "pid" in msg:
                pid = msg["pid"]
            elif "rc" in msg:
                return int(msg["rc"])

    def _line(self, deadline: float | None) -> str | None:
        """The server's next answer line; "" at end of output, None when ``deadline`` passes first.
        Reads the pipe's descriptor directly: a buffered reader could hold the ``rc`` line already
        read along with the ``pid`` line while ``select`` waits on the empty pipe."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            if deadline is not None:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
                if not ready:
                    return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return ""
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        """End the server (a child it forked that is still running is not waited for)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
    """The fork server's loop (``--serve``): import :data:`WARM_MODULES`, then per request line fork a
    child that runs :func:`worker` and answer its pid and exit code. Ends at end of input."""
    import importlib

    for m in WARM_MODULES:
        try:
            with _quiet():
                importlib.import_module(m)
        except Exception:  # noqa: BLE001 - a warm-up only: the child imports it again and reports
            pass
    _warm_export()
    for line in stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: one family, then exit without running the server's cleanup
            rc = 1
            try:
                err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(err, 2)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                with open(req["log"], "a") as stream:
                    worker(req["family"], req["ops"], stream)
                rc = 0
            except BaseException:  # noqa: BLE001 - reported on the child's stderr, as a subprocess would
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os._exit(rc)
        stdout.write(json.dumps({"pid": pid}) + "\n")
        stdout.flush()
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        stdout.write(json.dumps({"rc": rc}) + "\n")
        stdout.flush()


def _warm_export() -> None:
    """One meta-device export of the tiny Llama in the fork server, before any fork: the first
    torch.export of a process pays its lazy setup (about 2 s, measured), which each forked family
    then inherits done. Meta tensors only: no compute, no thread pool started before the forks."""
    try:
        from scaler_wizard.ir.trace import build_meta_model, export_model, reduced_config

        with _quiet():
            cfg, _ = tiny_config("llama")
            export_model(build_meta_model(reduced_config(cfg)[0]))
    except Exception:  # noqa: BLE001 - a warm-up only
        pass


def run_family(family: str, ops: list[str], timeout: float, python: str = sys.executable,
               server: ForkServer | None = None) -> dict:
    """Run one family in its own process: forked from ``server`` when given (a warm
    :class:`ForkServer`), else a fresh subprocess. Returns {"family", "built", "unbuildable", "cells",
    "seconds"}."""
    t0 = time.time()
    with tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False) as f:
        log = f.name
    status = "ok"
    if server is not None:
        with tempfile.NamedTemporaryFile("w+", suffix=".err", delete=False) as f:
            err = f.name
        try:
            rc = server.run(family, ops, log, err, timeout)
        except OSError as e:
            rc = f"worker died ({e})"
        tail = Path(err).read_text(errors="replace").strip().splitlines()
        os.unlink(err)
        if rc == "timeout":
            status = "timeout"
        elif isinstance(rc, str):
            status = rc
        elif rc != 0:
            status = f"worker died (rc {rc}): {tail[-1][:200] if tail else ''}"
    else:
        cmd = [python, "-m", "scaler_wizard.sweep", "--worker", family, "--ops", ",".join(ops), "--log", log]
        try:
            p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout, text=True,
                               env=_worker_env())
            if p.returncode != 0:
                tail = (p.stderr or "").strip().splitlines()
                status = f"worker died (rc {p.returncode}): {tail[-1][:200] if tail else ''}"
        except subprocess.TimeoutExpired:
            status = "timeout"
    events = []
    for line in Path(log).read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    os.unlink(log)
    res: dict[str, Any] = {"family": family, "built": False, "unbuildable": None, "cells": {}, "overrides": {},
                           "seconds": None}
    current = None
    for ev in events:
        if ev["event"] == "unbuildable":
            res["unbuildable"] = ev["reason"]
        elif ev["event"] == "built":
            res["built"] = True
            res["build_seconds"] = ev["seconds"]
            res["overrides"] = ev["overrides"]
        elif ev["event"] == "start":
            current = ev["op"]
        elif ev["event"] == "cell":
            res["cells"][ev["op"]] = {k: v for k, v in ev.items() if k not in ("event", "op")}
            current = None
    if status != "ok":
        if not res["built"] and res["unbuildable"] is None:
            res["unbuildable"] = f"{status} while building"
        elif res["built"]:
            for op in ops:
                if op not in res["cells"]:
                    why = status if op == current else f"not run ({status} on an earlier op)"
                    res["cells"][op] = {"cell": "crash", "reason": why}
    res["seconds"] = round(time.time() - t0, 1)
    return res


def run_sweep(families: list[str], ops: list[str] | None = None, *, workers: int = 2, timeout: float = 900,
              progress=None, warm: bool = True) -> dict:
    """Run the sweep. Returns {"transformers", "ops", "families": {family: run_family result}, "counts"}.
    ``warm``: fork each family from one of ``workers`` warm :class:`ForkServer` processes (started here,
    with this process's environment, and ended on return); else one fresh subprocess per family."""
    import transformers

    ops = list(ops or OPS)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; expected some of {', '.join(OPS)}")
    results: dict[str, dict] = {}
    nworkers = max(1, min(workers, len(families) or 1))
    servers: queue.Queue = queue.Queue()
    started: list[ForkServer] = []
    if warm and hasattr(os, "fork"):
        for _ in range(nworkers):
            started.append(ForkServer())
            servers.put(started[-1])

    def one(fam):
        server = servers.get() if started else None
        try:
            if server is not None and not server.alive():  # killed by a timeout while importing, or died
                server = ForkServer()
                started.append(server)
            r = run_family(fam, ops, timeout, server=server)
        finally:
            if server is not None:
                servers.put(server)
        if progress:
            progress(r)
        return r

    try:
        with ThreadPoolExecutor(max_workers=nworkers) as ex:
            for r in ex.map(one, families):
                results[r["family"]] = r
    finally:
        for s in started:
            s.close()
    return {"transformers": transformers.__version__, "ops": ops, "families": results, "counts": counts(results)}


def counts(results: dict) -> dict:
    c = {k: 0 for k in CATEGORIES}
    c["unbuildable"] = 0
    for r in results.values():
        if not r["built"]:
            c["unbuildable"] += 1
        for cell in r["cells"].values():
            c[cell["cell"]] += 1
    return c


def format_table(sweep: dict, reasons: bool = True) -> str:
    """The family x op table (cells by category), counts, then each crash / refusal with its reason."""
    ops = sweep["ops"]
    fams = sweep["families"]
    w = max([len(f) for f in fams] + [6])
    cw = max(len(o) for o in ops)
    lines = ["family".ljust(w) + " | " + " | ".join(o.ljust(cw) for o in ops)]
    lines.append("-" * len(lines[0]))
    for f, r in fams.items():
        if not r["built"]:
            lines.append(f.ljust(w) + " | (cannot be built tiny: " + str(r["unbuildable"])[:120] + ")")
            continue
        lines.append(f.ljust(w) + " | " + " | ".join(r["cells"].get(o, {}).get("cell", "-").ljust(cw) for o in ops))
    c = sweep["counts"]
    lines.append("")
    lines.append("counts: " + ", ".join(f"{k} {c[k]}" for k in (*CATEGORIES, "unbuildable")))
    selfcheck = sum(1 for r in fams.values() for cell in r["cells"].values()
                    if cell["cell"] == "refused" and cell.get("code") in SELF_CHECK_CODES)
    if selfcheck:
        lines.append(f"  of the refusals, {selfcheck} come from the compiler's own consistency check "
                     f"({', '.join(sorted(SELF_CHECK_CODES))}: discovery and lowering disagree -- bugs, not limits)")
    if reasons:
        for cat in ("crash", "refused", "approx"):
            rows = [(f, o, r["cells"][o]["reason"]) for f, r in fams.items() for o in ops
                    if o in r["cells"] and r["cells"][o]["cell"] == cat]
            if rows:
                lines.append("")
                lines.append(f"{cat} cells:")
                lines.extend(f"  {f} / {o}: {why}" for f, o, why in rows)
    return "\n".join(lines)


README_BEGIN = "<!-- family-sweep table: generated by benchmarks/family_sweep.py --markdown; do not edit -->"
README_END = "<!-- end of family-sweep table -->"


def markdown_table(sweep: dict) -> str:
    """The README's family table: families x ops (each cell exact / approx / refused / crash; a
    refusal from the compiler's own consistency check is marked ``refused*``), then the counts and
    the families that could not be built tiny. Deterministic for a given sweep JSON."""
    ops = sweep["ops"]
    fams = sweep["families"]
    lines = ["| family | " + " | ".join(ops) + " |", "| --- |" + " --- |" * len(ops)]
    for f in sorted(fams):
        r = fams[f]
        if not r["built"]:
            continue

        def cell(o, r=r):
            c = r["cells"].get(o)
            if c is None:
                return "-"
            return c["cell"] + ("*" if c["cell"] == "refused" and c.get("code") in SELF_CHECK_CODES else "")
        lines.append(f"| {f} | " + " | ".join(cell(o) for o in ops) + " |")
    c = counts(fams)
    lines.append("")
    lines.append("Cells: " + ", ".join(f"{k} {c[k]}" for k in CATEGORIES) + f" (transformers {sweep.get('transformers')}).")
    if any(c2.get("code") in SELF_CHECK_CODES for r in fams.values() for c2 in r["cells"].values()):
        lines.append(f"`refused*`: refused by the compiler's own consistency check ({', '.join(sorted(SELF_CHECK_CODES))}): "
                     "nothing is written, but discovery promised what lowering could not do (a bug, not a limit).")
    bad = sorted(f for f, r in fams.items() if not r["built"])
    if bad:
        lines.append("Cannot be built tiny: " + "; ".join(f"{f} ({fams[f]['unbuildable'][:80]})" for f in bad) + ".")
    return "\n".join(lines)


def readme_with_table(readme: str, sweep: dict) -> str:
    """``readme`` with the text between README_BEGIN and README_END replaced by markdown_table(sweep).
    Raises ValueError when the markers are missing."""
    i, j = readme.find(README_BEGIN), readme.find(README_END)
    if i < 0 or j < i:
        raise ValueError("README has no family-sweep markers")
    return readme[: i + len(README_BEGIN)] + "\n" + markdown_table(sweep) + "\n" + readme[j:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scaler_wizard.sweep")
    ap.add_argument("--worker", help="(internal) run one family and stream JSON lines to --log")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--log")
    ap.add_argument("--serve", action="store_true", help="(internal) a fork server: see ForkServer")
    a = ap.parse_args(argv)
    if a.serve:
        serve()
        return 0
    if not a.worker:
        ap.error("use benchmarks/family_sweep.py to run the sweep")
    with open(a.log, "a") as stream:
        worker(a.worker, a.ops.split(","), stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
