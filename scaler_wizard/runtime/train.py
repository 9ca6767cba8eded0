"""Continuation training: one code path for one process and many, through accelerate.

``train(model_dir, run_dir, recipe)`` runs AdamW with warmup + cosine decay, gradient
accumulation, optional gradient checkpointing and bf16/fp16 autocast, parameter groups from the
growth record (freeze the original tensors, or a separate learning rate for new ones), a
sequence-length curriculum, periodic held-out loss/perplexity, atomic checkpoints, exact resume
and the capability-retention breaker. Launch it in one process, or under ``torchrun`` /
``accelerate launch`` (DDP, DeepSpeed ZeRO 1-3, FSDP2 on GPUs): the loop is the same.

Run directory::

    RUN_DIR/metrics.jsonl          one JSON object per logged step (``step``, ``loss``, ...)
    RUN_DIR/loss.png               train / eval loss
    RUN_DIR/checkpoint-<step>/     a loadable HF model dir + training_state/ + trainer_state.json
    RUN_DIR/final/                 the result (after a breaker trip: the last good weights)
    RUN_DIR/summary.json           how the run ended

Exit status of the command (see ``scaler_wizard.commands.train``): 0 done, 2 bad input,
3 the breaker tripped and the run was rolled back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scaler_wizard.diagnostics import UsageError
from scaler_wizard.runtime.data import eval_blocks, prepare_data
from scaler_wizard.runtime.growth_record import SIDECAR, GrowthRecord
from scaler_wizard.runtime.recipe import TrainRecipe

EXIT_BREAKER = 3
STATE_FILE = "trainer_state.json"
METRICS = "metrics.jsonl"
_HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


@dataclass
class TrainResult:
    status: str  # "completed" | "stopped" | "breaker"
    step: int
    run_dir: Path
    final_dir: Path | None
    baseline_ppl: float | None = None
    last_eval_ppl: float | None = None
    restored: str | None = None
    reason: str | None = None
    tokens_per_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_BREAKER if self.status == "breaker" else 0


# --------------------------------------------------------------------------- helpers
def lr_lambda(recipe: TrainRecipe):
    """Multiplier of the peak LR for optimizer step index i (0-based): linear warmup, cosine decay
    to ``min_lr_ratio``."""
    warm, total, floor = recipe.warmup_steps, recipe.steps, recipe.min_lr_ratio

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        progress = min(1.0, (i - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(run_dir).glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if tail.isdigit() and (p / STATE_FILE).is_file():
            out.append((int(tail), p))
    return sorted(out)


def _resolve_precision(precision: str) -> str:
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if precision == "fp32":
        return "no"
    if precision == "fp16" and not cuda:
        raise UsageError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def _deepspeed_plugin(config: str | dict | None, recipe: TrainRecipe):
    if config is None:
        return None
    from accelerate.utils import DeepSpeedPlugin

    if not isinstance(config, dict):
        try:
            config = json.loads(Path(config).read_text())
        except OSError as e:
            raise UsageError(f"cannot read DeepSpeed config {config}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"DeepSpeed config {config}: invalid JSON: {e.msg} (line {e.lineno})") from None
    return DeepSpeedPlugin(hf_ds_config=config)


def _fill_deepspeed_auto(accelerator, recipe: TrainRecipe) -> None:
    """Concrete values for the "auto" entries accelerate would otherwise take from a DataLoader."""
    plugin = accelerator.state.deepspeed_plugin
    cfg = plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", recipe.batch_size),
                       ("gradient_accumulation_steps", recipe.grad_accum),
                       ("gradient_clipping", recipe.max_grad_norm)):
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    cfg["train_batch_size"] = recipe.batch_size * recipe.grad_accum * accelerator.num_processes
    if cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        cfg["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)


def _is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def _zero_stage(accelerator) -> int:
    if not _is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


class _Frozen:
    """Keeps the original part of grown tensors bit-identical: the gradient of the region is
    zeroed by a hook (so Adam moments stay zero there) and, after each optimizer step, the region
    is copied back from a saved copy (undoing decoupled weight decay and any other drift)."""

    def __init__(self):
        self.regions: list[tuple[torch.nn.Parameter, tuple[slice, ...], torch.Tensor]] = []

    def add(self, p: torch.nn.Parameter, sl: tuple[slice, ...]) -> None:
        self.regions.append((p, sl, p.detach()[sl].clone()))

        def hook(g, sl=sl):
            g = g.clone()
            g[sl] = 0
            return g

        p.register_hook(hook)

    @torch.no_grad()
    def restore(self) -> None:
        for p, sl, saved in self.regions:
            p[sl] = saved.to(p.device, p.dtype)


def _param_groups(model, recipe: TrainRecipe, record: GrowthRecord | None, plain=lambda n: n):
    """AdamW groups: (new | other) x (decay | no decay); frozen tensors get no gradient. ``plain``
    maps a (peft-wrapped) parameter name to the plain model's (None: a LoRA adapter tensor)."""
    frozen = _Frozen()
    # ZeRO-3 partitions parameters at load time: their real shape is ds_shape
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    if record is not None:
        record.check_against(shapes)
    if (recipe.freeze_original or recipe.new_lr is not None) and record is None:
        raise UsageError(
            "--freeze-original and --new-lr need to know which parameters are new: the model dir has no "
            f"{SIDECAR} (written by `scaler-wizard apply`); pass one with --growth-record FILE"
        )
    counts = {"new": 0, "grown": 0, "original": 0, "trainable": 0, "frozen": 0}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        name = plain(name)
        numel = int(getattr(p, "ds_numel", p.numel()))
        if name is None:  # a LoRA adapter matrix
            counts["adapter"] = counts.get("adapter", 0) + numel
        status = (record.status(name) if record else "original") if name is not None else "adapter"
        if status != "adapter":
            counts[status] += numel
        if not p.requires_grad:  # frozen under LoRA adapters
            counts["frozen"] += numel
            continue
        if recipe.freeze_original and status == "original":
            p.requires_grad_(False)
            counts["frozen"] += numel
            continue
        t = record.tensors.get(name) if record else None
        if recipe.freeze_original and status == "grown" and t is not None and t.original_region is not None:
            frozen.add(p, t.region_slices())
            region = 1
            for a, b in t.original_region:
                region *= b - a
            counts["frozen"] += region
        counts["trainable"] += numel
        is_new = status == "new" and recipe.new_lr is not None
        decay = p.ndim >= 2 and recipe.weight_decay > 0
        groups.setdefault((is_new, decay), []).append(p)
    if counts["trainable"] == 0:
        raise UsageError("nothing to train: every parameter is original and --freeze-original is set")
    out = []
    for (is_new, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": recipe.new_lr if is_new else recipe.lr,
                    "weight_decay": recipe.weight_decay if decay else 0.0})
    return out, frozen, counts


@torch.no_grad()
def _eval_loss(model, blocks: torch.Tensor, accelerator, batch_size: int) -> float:
    """Token-weighted mean loss over the held-out blocks, split across ranks."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(blocks)
    if n == 0:
        return float("nan")
    shard = blocks[rank: n - n % world: world] if n >= world else blocks
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(shard), batch_size):
        ids = shard[i:i + batch_size].to(accelerator.device)
        with accelerator.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        k = ids.shape[0] * (ids.shape[1] - 1)
        total[0] += loss.double() * k
        total[1] += k
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1])


def _ppl(loss: float) -> float:
    try:
        return math.exp(loss) if math.isfinite(loss) else float("inf")
    except OverflowError:
        return float("inf")


class _Metrics:
    def __init__(self, path: Path, enabled: bool, sink=None):
        self.path, self.enabled, self.sink = path, enabled, sink

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        def kept(r: dict) -> bool:  # a growth after `step` happened after checkpoint-<step>: redone on resume
            return r["step"] < step or (r["step"] == step and r.get("event") != "growth")

        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and kept(json.loads(ln))]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, rec: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(rec, allow_nan=True) + "\n")
            if self.sink is not None:  # experiment trackers (--report-to)
                self.sink(rec)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Train and eval loss against step, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = _Metrics(metrics_path, False).read()
    tr = [(r["step"], r["loss"]) for r in recs if r.get("event") is None and r.get("loss") is not None]
    ev = [(r["step"], r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss", lw=1.5)
    for r in recs:
        if r.get("event") == "breaker_trip":
            ax.axvline(r["step"], color="red", ls="--", label="breaker trip")
        if r.get("event") == "growth":  # `at step` stage: step, parameters before -> after
            ax.axvline(r["step"], color="green", ls=":", lw=1)
            ax.annotate(f"grow {r['params_before']:,}->{r['params_after']:,}", (r["step"], 1.0),
                        xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7,
                        color="green")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def _copy_hf_dir(src: Path, dst: Path) -> None:
    """Atomically materialise a loadable model dir ``dst`` from ``src`` (weights, config, tokenizer)."""
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- the loop
def train(
    model_dir: str | Path,
    run_dir: str | Path,
    recipe: TrainRecipe,
    *,
    resume: str | Path | bool | None = None,
    deepspeed_config: str | dict | None = None,
    growth_record: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    dump_rank_weights: bool = False,
    stages: tuple = (),
) -> TrainResult:
    """Continue training ``model_dir`` into ``run_dir``. See the module docstring. ``stages``: the
    plan's resolved ``at step`` stages (``compiler.stages.resolve_stages`` against ``model_dir``),
    applied to the live run after their step (``runtime.live_growth``)."""
    fresh = not Path(run_dir).exists()
    try:
        result = _train(model_dir, run_dir, recipe, resume=resume, deepspeed_config=deepspeed_config,
                        growth_record=growth_record, stop_after=stop_after, progress=progress,
                        dump_rank_weights=dump_rank_weights, stages=tuple(stages or ()))
        # After the run's model, optimizer and data are released: matplotlib's figure memory (about
        # 250 MB measured) then reuses theirs instead of adding to the run's peak.
        if int(os.environ.get("RANK", "0")) == 0 and (Path(run_dir) / METRICS).is_file():
            plot_metrics(Path(run_dir) / METRICS, Path(run_dir) / "loss.png")
        return result
    except BaseException:
        _reset_accelerate()  # a failed run must not leave its accelerate singletons to the next one
        # a run that failed before its first checkpoint leaves no half-made RUN_DIR behind
        if fresh and int(os.environ.get("RANK", "0")) == 0 and Path(run_dir).is_dir() \
                and not checkpoints(Path(run_dir)):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _preflight(model_dir: Path, run_dir: Path, recipe: TrainRecipe, resume) -> None:
    """Every input of a run checked before anything is created: the model (config, weights, shapes),
    the baseline model, the run directory (writable; not the model directory or inside it), and the
    block length against the model's position limit. Raises UsageError."""
    from scaler_wizard.runtime.preflight import check_model, check_writable_dir, position_limit

    from scaler_wizard.runtime.preflight import require_hf_dir

    resolved = check_model(model_dir, flag="MODEL_DIR")
    require_hf_dir(resolved, str(model_dir), "MODEL_DIR", "train")
    if isinstance(resolved, str):
        raise UsageError(f"MODEL_DIR {model_dir}: train needs a local Hugging Face model directory (download the "
                         "hub model first, e.g. `huggingface-cli download ID --local-dir DIR`)")
    if model_dir.is_dir() and not any((model_dir / f).is_file() for f in
                                      ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise UsageError(f"MODEL_DIR {model_dir}: no tokenizer (tokenizer.json, tokenizer_config.json, "
                         "tokenizer.model or vocab.json); training needs the model's tokenizer next to its weights")
    if recipe.baseline_model:
        require_hf_dir(check_model(recipe.baseline_model, flag="--baseline-model"), recipe.baseline_model,
                       "--baseline-model", "train")
    if recipe.teacher:  # the same token ids in teacher and student, before anything is created
        from transformers import AutoConfig, AutoTokenizer

        from scaler_wizard.runtime.distill import check_teacher

        require_hf_dir(check_model(recipe.teacher, flag="--teacher"), recipe.teacher, "--teacher", "train")
        check_teacher(recipe.teacher, AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))
    if recipe.lora_r and recipe.freeze_original:
        raise UsageError("--freeze-original with LoRA: LoRA already keeps every original tensor frozen under its "
                         "adapters (new tensors train fully, see lora_new); drop --freeze-original")
    m, r = model_dir.resolve(), run_dir.expanduser().resolve()
    if r == m or m in r.parents:
        raise UsageError(f"refusing to write the run {run_dir} into the input model directory {model_dir}; "
                         "choose another -o RUN_DIR")
    if r in m.parents:
        raise UsageError(f"refusing to write the run {run_dir}: it contains the input model {model_dir}")
    check_writable_dir(run_dir, flag="-o")
    from scaler_wizard.runtime.data import resolve_sources

    for specs in (recipe.data, recipe.eval_data):  # local files exist and are text, before any work
        if specs:
            resolve_sources(list(specs))
    limit, learned = position_limit(model_dir)
    if limit is not None and recipe.max_seq_len > limit:
        what = f"--seq-len {recipe.max_seq_len} (or a curriculum stage)"
        if learned:
            raise UsageError(f"{what} is longer than the model's {limit} learned positions "
                             f"({model_dir}/config.json); use --seq-len {limit} or less")
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"scaler-wizard train: warning: {what} is longer than the model's max_position_embeddings "
                  f"{limit}: positions beyond it were never trained", file=sys.stderr, flush=True)


def _check_resume_matches(ckpt: Path, model, model_dir: Path) -> None:
    """The checkpoint to resume holds weights of this model's shapes (else: a UsageError, not a raw
    size mismatch from the state loader)."""
    from scaler_wizard.runtime.checkpoint import CheckpointError, open_checkpoint

    try:
        reader = open_checkpoint(ckpt)
    except CheckpointError as e:
        raise UsageError(f"--resume {ckpt}: {e}") from None
    try:
        mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        bad = [f"{n} {list(reader.shape(n))} there, {list(mine[n])} here" for n in reader.names()
               if n in mine and tuple(reader.shape(n)) != mine[n]]
        missing = [n for n in mine if n not in reader]
    finally:
        reader.close()
    if bad or len(missing) == len(mine):
        detail = "; ".join(bad[:2]) + (f" (and {len(bad) - 2} more)" if len(bad) > 2 else "") if bad \
            else "no tensor names in common"
        raise UsageError(f"--resume {ckpt}: the checkpoint was made from another model than {model_dir} "
                         f"({detail}); resume with the model the run started from, or start a new -o RUN_DIR")


def _check_resume_stages(ckpt: Path, state: dict, grown: list) -> None:
    """The plan's stages before the checkpoint's step are the ones the checkpoint ran (same steps, same
    statements): the resumed run replays none of them, so a plan edited there would silently continue
    with the old growth. Raises UsageError naming the first difference."""
    ran = [int(x) for x in state.get("stages_applied") or []]
    want = [s.step for s in grown]
    if ran != want:
        raise UsageError(f"--resume {ckpt}: the checkpoint's run grew at steps {ran or 'none'} before step "
                         f"{state['step']}, the plan now grows at {want or 'none'} there; resume with the plan the "
                         "run started with, or start a new -o RUN_DIR")
    texts = state.get("stage_statements")
    for s in grown if texts is not None else ():
        if texts.get(str(s.step)) != s.text:
            raise UsageError(f"--resume {ckpt}: the stage at step {s.step} now reads `{s.text}`, but the checkpoint "
                             f"ran `{texts.get(str(s.step))}`; resume with the plan the run started with, or start "
                             "a new -o RUN_DIR")


def _train(model_dir, run_dir, recipe, *, resume, deepspeed_config, growth_record, stop_after, progress,
           dump_rank_weights, stages=()) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers

    transformers.utils.logging.disable_progress_bar()
    model_dir, run_dir = Path(model_dir), Path(run_dir)
    recipe.validate()
    _preflight(model_dir, run_dir, recipe, resume)

    from scaler_wizard.runtime import trackers

    tracked = trackers.resolve(recipe.report_to)  # a missing tracker package: exit 2 before any work
    distiller = None
    if recipe.teacher:  # loaded before any DeepSpeed engine / ZeRO-3 init context: a plain module per rank
        from scaler_wizard.runtime.distill import Distiller

        distiller = Distiller(recipe.teacher, recipe.distill_alpha, recipe.distill_temperature)
    plugin = _deepspeed_plugin(deepspeed_config, recipe)
    # Under torchrun on a machine without GPUs accelerate picks MULTI_CPU only when told to use the
    # CPU; otherwise every rank silently trains alone (measured, see DEVELOPERS.md).
    use_ds = plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu_only = not torch.cuda.is_available() and not use_ds
    if use_ds and not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        # DeepSpeed's CPU accelerator: accelerate finds no backend on its own and would run each rank
        # alone; naming gloo makes it initialise deepspeed.comm over gloo (measured, DEVELOPERS.md)
        from accelerate.state import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    accelerator = Accelerator(
        cpu=cpu_only,
        mixed_precision=_resolve_precision(recipe.precision),
        gradient_accumulation_steps=recipe.grad_accum,
        deepspeed_plugin=plugin,
        step_scheduler_with_optimizer=False,
        **trackers.accelerator_kwargs(tracked, run_dir),
    )
    main = accelerator.is_main_process
    from scaler_wizard.runtime import live_growth as LG

    LG.refuse_engine(accelerator, stages)
    LG.refuse_uncarried(stages)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UsageError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes} "
                         f"({accelerator.distributed_type}); on CPU set ACCELERATE_USE_CPU=1 (see DEVELOPERS.md)")
    world, rank = accelerator.num_processes, accelerator.process_index
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if distiller is not None:
        distiller.to(accelerator.device)
    if recipe.lora_r and _zero_stage(accelerator) == 3:
        raise UsageError("LoRA is not supported under ZeRO-3 (merging adapters needs whole weights); "
                         "use ZeRO-1/2 or DDP: the frozen base needs no optimizer state to shard")

    # ---- resume point
    ckpt: Path | None = None
    if resume:
        if resume is True or str(resume) == "auto":
            found = checkpoints(run_dir)
            ckpt = found[-1][1] if found else None  # none yet: a fresh start (first launch of a job)
            if ckpt is None and main:
                print(f"--resume: no checkpoint in {run_dir} yet, starting from {model_dir}", flush=True)
        else:
            ckpt = Path(resume)
            if not (ckpt / STATE_FILE).is_file():
                raise UsageError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE})")
    elif checkpoints(run_dir):
        raise UsageError(f"{run_dir} already holds checkpoints of another run: pass --resume to continue it, "
                         "or choose a new -o RUN_DIR")
    state = json.loads((ckpt / STATE_FILE).read_text()) if ckpt else {}
    # stages already applied when the checkpoint was written: the model comes from the checkpoint
    grown = [s for s in stages if ckpt is not None and s.step < int(state["step"])]
    pending = [s for s in stages if s not in grown]
    if ckpt is not None:
        _check_resume_stages(ckpt, state, grown)
    weights_dir = ckpt if grown else model_dir

    set_seed(recipe.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UsageError(f"cannot load the tokenizer of {model_dir}: {first[:300]}") from None
    model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)  # checked by _preflight
    model.config.use_cache = False
    if ckpt is not None:  # on the plain module: a DeepSpeed/FSDP wrapper renames (module.) or partitions
        _check_resume_matches(ckpt, model, weights_dir)
    if recipe.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    record = GrowthRecord.load(growth_record) if growth_record and not grown else GrowthRecord.find(weights_dir)
    if record is None and stages:  # nothing grown yet: every tensor is original until the first stage
        record = GrowthRecord(base_model=str(model_dir))
    lora_plan, plain = None, (lambda n: n)
    if recipe.lora_r:  # original tensors frozen under adapters, new ones trained fully (runtime/lora.py)
        if stages:
            raise UsageError("LoRA (lora_r) together with `at step` growth stages is not supported yet: the "
                             "adapters would have to grow with their base tensors; train the stages without "
                             "LoRA, or grow with `apply` first and train the result with LoRA")
        from scaler_wizard.runtime import lora

        model, lora_plan = lora.wrap(model, model_dir, recipe, record)
        plain = lora.plain_name
    groups, frozen, counts = _param_groups(model, recipe, record, plain)
    targets = [(g["lr"], g["weight_decay"]) for g in groups]
    if frozen.regions and str(accelerator.distributed_type).endswith("FSDP"):
        raise UsageError("--freeze-original on partly-grown tensors is not supported under FSDP (sharded "
                         "parameters); use DDP, or --new-lr without --freeze-original")
    if frozen.regions and _is_deepspeed(accelerator):
        raise UsageError(
            "--freeze-original on partly-grown tensors is not supported under DeepSpeed (its optimizer keeps "
            "its own fp32 copy); use DDP/FSDP, or --new-lr without --freeze-original"
        )
    if recipe.baseline_model and _zero_stage(accelerator) == 3:
        raise UsageError("--baseline-model is not supported under ZeRO-3 (the original model would be partitioned "
                         "too); use ZeRO-1/2 or DDP for the run, or compare with `scaler-wizard eval`")
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.beta1, recipe.beta2), eps=recipe.eps)
    lam_of = LG.rewarm_lambda(lr_lambda(recipe), stages)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam_of)

    if _is_deepspeed(accelerator):
        _fill_deepspeed_auto(accelerator, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    data = prepare_data(recipe, tokenizer, world=world, rank=rank)
    # forward FLOPs/token of the model being trained (compiler/predict.py at the recipe's seq_len)
    fwd_fpt = LG.forward_flops(grown[-1], after=True) if grown else LG.forward_flops(
        stages[0], after=False) if stages else _forward_flops(model_dir, recipe.max_seq_len)
    held_out = eval_blocks(data.eval_tokens, recipe.max_seq_len, recipe.eval_blocks)
    eval_bs = max(1, recipe.batch_size)
    trackers.start(accelerator, tracked, recipe, run_dir)
    metrics = _Metrics(run_dir / METRICS, main, sink=lambda rec: trackers.log(accelerator, tracked, rec))

    # ---- baseline (fresh run) or restored state
    start = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt / "training_state"))
        start = int(state["step"])
        # the recipe of this launch wins over the saved one (same recipe: the same values, bit for bit)
        lam = lam_of
        scheduler.base_lrs = [lr for lr, _ in targets]
        for pg, (lr, wd) in zip(optimizer.param_groups, targets):
            pg["initial_lr"], pg["weight_decay"] = lr, wd
            pg["lr"] = lr * lam(scheduler.last_epoch)
        data.batches.fast_forward(start, recipe.seq_len_at)
        metrics.truncate_after(start)
        baseline, baseline_orig = state.get("baseline_ppl"), state.get("original_ppl")
        bad_streak = int(state.get("bad_streak", 0))
        good = list(state.get("good_checkpoints", []))
        total_tokens = int(state.get("tokens", 0))
        total_flops = state.get("flops")
    else:
        if main:
            (run_dir / METRICS).unlink(missing_ok=True)
        baseline = baseline_orig = None
        if len(held_out):
            baseline = _ppl(_eval_loss(model, held_out, accelerator, eval_bs))
            if recipe.baseline_model:
                orig = AutoModelForCausalLM.from_pretrained(recipe.baseline_model, dtype=torch.float32)
                orig.to(accelerator.device)
                baseline_orig = _ppl(_eval_loss(orig, held_out, accelerator, eval_bs))
                del orig
        metrics.write({"step": 0, "event": "baseline", "loss": math.log(baseline) if baseline else None,
                       "eval_loss": math.log(baseline) if baseline else None, "eval_ppl": baseline,
                       "original_ppl": baseline_orig, "params": counts, "world_size": world,
                       "train_tokens": data.train_tokens, "eval_tokens": int(len(data.eval_tokens)),
                       "flops": 0 if fwd_fpt is not None else None})
        bad_streak, good, total_tokens = 0, [], 0
        total_flops = 0
    reference = baseline_orig if baseline_orig is not None else baseline
    breaker_on = recipe.breaker and reference is not None and len(held_out) > 0
    limit = reference * (1.0 + recipe.breaker_threshold) if breaker_on else None

    def do_eval(step: int) -> tuple[float, float, bool]:
        loss = _eval_loss(model, held_out, accelerator, eval_bs)
        ppl = _ppl(loss)
        bad = breaker_on and not (ppl <= limit)
        return loss, ppl, bad

    def save(step: int, is_good: bool) -> Path:
        final = run_dir / f"checkpoint-{step}"
        tmp = run_dir / f".tmp-checkpoint-{step}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "training_state"))
        sd = accelerator.get_state_dict(model) if lora_plan is None else None  # collective under ZeRO-3
        accelerator.wait_for_everyone()  # every rank's files are in tmp before rank 0 renames it
        if main:
            if lora_plan is not None:  # merged plain weights (+ the peft adapter with lora_merge = false)
                lora.save(accelerator.unwrap_model(model), tmp, recipe.lora_merge, tokenizer)
            else:
                accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if record is not None and record.path is not None:
                shutil.copy2(record.path, tmp / SIDECAR)
            elif record is not None:  # composed by a growth stage
                record.save(tmp)
            st = {"step": step, "good": is_good, "baseline_ppl": baseline, "original_ppl": baseline_orig,
                  "bad_streak": bad_streak, "good_checkpoints": good + ([step] if is_good else []),
                  "tokens": total_tokens, "flops": total_flops, "world_size": world,
                  "recipe": recipe.to_dict(), "stages_applied": [s.step for s in stages if s.step < step],
                  "stage_statements": {str(s.step): s.text for s in stages if s.step < step}}
            (tmp / STATE_FILE).write_text(json.dumps(st, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: a checkpoint dir either exists whole or not at all
        accelerator.wait_for_everyone()
        if is_good:
            good.append(step)
        if main and recipe.keep_checkpoints:
            keep = {s for s, _ in checkpoints(run_dir)[-recipe.keep_checkpoints:]} | set(good[-1:])
            for s, p in checkpoints(run_dir):
                if s not in keep:
                    shutil.rmtree(p, ignore_errors=True)
        return final

    from tqdm.auto import tqdm

    bar = tqdm(total=recipe.steps, initial=start, disable=not (main and progress), unit="step",
               dynamic_ncols=True, leave=True)
    status, reason, restored = "completed", None, None
    last_eval_ppl = None
    t_run, tok_run, cpu_run = time.perf_counter(), 0, time.process_time()
    step = start
    window_t, window_tok = time.perf_counter(), 0
    device = accelerator.device
    loss_sum = torch.zeros((), device=device)
    parts_sum = torch.zeros(2, device=device)  # distillation: LM and KD terms
    try:
        for step in range(start + 1, recipe.steps + 1):
            if pending and pending[0].step == step - 1:  # grow after step N, before step N + 1
                stage = pending.pop(0)
                bare = accelerator.unwrap_model(model)
                g = LG.grow_live(bare, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                 stage, record)
                accelerator._models = [m for m in accelerator._models if m is not model]
                accelerator._optimizers = [o for o in accelerator._optimizers if o is not optimizer]
                del bare, model, optimizer
                model, record = g.model, g.record
                model.config.use_cache = False
                if recipe.gradient_checkpointing:  # as at the start of the run
                    if hasattr(model, "activation_checkpointing_enable"):
                        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                    else:
                        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                groups, frozen, counts = _param_groups(model, recipe, record)
                targets = [(g2["lr"], g2["weight_decay"]) for g2 in groups]
                optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.beta1, recipe.beta2), eps=recipe.eps)
                LG.load_optimizer_state(model, optimizer, g.state)
                old_sched, scheduler = scheduler, torch.optim.lr_scheduler.LambdaLR(optimizer, lam_of)
                scheduler.last_epoch = old_sched.last_epoch
                for pg, (lr, _) in zip(optimizer.param_groups, targets):
                    pg["initial_lr"], pg["lr"] = lr, lr * lam_of(scheduler.last_epoch)
                scheduler.base_lrs = [lr for lr, _ in targets]
                scheduler._last_lr = [pg["lr"] for pg in optimizer.param_groups]
                accelerator._custom_objects = [scheduler if o is old_sched else o for o in accelerator._custom_objects]
                model, optimizer = accelerator.prepare(model, optimizer)
                fwd_fpt = LG.forward_flops(stage, after=True)
                metrics.write({"step": step - 1, "event": "growth", "stage": stage.index,
                               "statements": stage.text, "optimizer": stage.optimizer, "rewarm": stage.rewarm,
                               "params_before": g.params_before, "params_after": g.params_after,
                               "moments_claimed": round(g.claimed_fraction, 6), "flops": total_flops,
                               "flops_per_token": None if fwd_fpt is None else 3 * fwd_fpt})
                del g
            seq_len = recipe.seq_len_at(step)
            loss_sum.zero_()
            parts_sum.zero_()
            accelerator.step = 0  # every optimizer step is exactly grad_accum micro-steps
            for micro in range(recipe.grad_accum):
                ids = data.batches.batch(step + recipe.data_offset, micro, seq_len).to(device, non_blocking=True)
                with accelerator.accumulate(model):
                    if distiller is None:
                        loss = model(input_ids=ids, labels=ids).loss
                    else:  # (1 - alpha) LM + alpha T^2 KL(teacher || student)
                        loss, lm, kd = distiller.loss(model, ids)
                        parts_sum += torch.stack([lm, kd])
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and recipe.max_grad_norm > 0 and not _is_deepspeed(accelerator):
                        accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
            if frozen.regions:
                frozen.restore()
            lr_used = scheduler.get_last_lr()[0]
            scheduler.step()
            n_tok = recipe.batch_size * seq_len * recipe.grad_accum * world
            total_tokens += n_tok
            if total_flops is not None and fwd_fpt is not None:
                total_flops += 3 * fwd_fpt * n_tok  # forward + backward (compiler/stages.py)
            tok_run += n_tok
            window_tok += n_tok

            rec = None
            if step % recipe.log_every == 0 or step == recipe.steps:
                mean = loss_sum / recipe.grad_accum
                if world > 1:
                    mean = accelerator.reduce(mean, reduction="mean")
                now = time.perf_counter()
                tps = window_tok / max(now - window_t, 1e-9)
                window_t, window_tok = now, 0
                rec = {"step": step, "loss": float(mean), "lr": lr_used, "seq_len": seq_len,
                       "tokens": total_tokens, "tokens_per_s": round(tps, 1),
                       "elapsed_s": round(now - t_run, 3), "cpu_s": round(time.process_time() - cpu_run, 3),
                       "flops": total_flops}
                if distiller is not None:
                    parts = parts_sum / recipe.grad_accum
                    if world > 1:
                        parts = accelerator.reduce(parts, reduction="mean")
                    rec.update(lm_loss=float(parts[0]), distill_loss=float(parts[1]))
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)

            last = step == recipe.steps or step == stop_after
            want_save = (recipe.save_every and step % recipe.save_every == 0) or last
            want_eval = (recipe.eval_every and step % recipe.eval_every == 0) or step == recipe.steps \
                or (want_save and breaker_on)
            is_bad = False
            if want_eval and len(held_out):
                ev_loss, ev_ppl, is_bad = do_eval(step)
                last_eval_ppl = ev_ppl
                bad_streak = bad_streak + 1 if is_bad else 0
                if rec is None:
                    rec = {"step": step, "loss": float(loss_sum / recipe.grad_accum), "flops": total_flops}
                rec.update(eval_loss=ev_loss, eval_ppl=ev_ppl)
                if breaker_on:
                    rec.update(breaker_limit_ppl=limit, bad_streak=bad_streak)
            if rec is not None:
                metrics.write(rec)
            bar.update(1)

            if breaker_on and bad_streak >= recipe.breaker_patience:
                status = "breaker"
                reason = (f"eval perplexity {last_eval_ppl:.4g} above {limit:.4g} (baseline {reference:.4g} "
                          f"x (1 + {recipe.breaker_threshold})) for {bad_streak} consecutive evals")
                break
            if want_save:
                save(step, is_good=not is_bad and math.isfinite(float(loss_sum)))
            if stop_after is not None and step >= stop_after and step < recipe.steps:
                status = "stopped"
                break
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_run
    tokens_per_s = tok_run / elapsed if elapsed > 0 else None

    final_dir = run_dir / "final"
    if status == "breaker":
        restored = _roll_back(run_dir, model_dir, good, main)
        if main:
            metrics.write({"step": step, "event": "breaker_trip", "loss": float(loss_sum / recipe.grad_accum),
                           "eval_ppl": last_eval_ppl, "reference_ppl": reference, "limit_ppl": limit,
                           "patience": recipe.breaker_patience, "restored": restored, "reason": reason})
        accelerator.wait_for_everyone()
    elif status == "completed" and main:
        _copy_hf_dir(run_dir / f"checkpoint-{step}", final_dir)
        if lora_plan is not None and not recipe.lora_merge:  # final/ is the peft adapter
            _copy_hf_dir(run_dir / f"checkpoint-{step}" / lora.ADAPTER_DIR, final_dir)
    if dump_rank_weights:
        _dump_rank_weights(model, accelerator, run_dir / "rank-weights" / f"rank{rank}.safetensors")
    if main:
        summary = {"status": status, "step": step, "reason": reason, "restored": restored,
                   "baseline_ppl": baseline, "original_ppl": baseline_orig, "last_eval_ppl": last_eval_ppl,
                   "tokens_per_s": tokens_per_s, "world_size": world, "params": counts}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    trackers.end(accelerator, tracked)
    _teardown(accelerator, model)
    return TrainResult(status, step, run_dir, final_dir if status != "stopped" else None, baseline,
                       last_eval_ppl, restored, reason, tokens_per_s)


def _forward_flops(model_dir, seq_len: int) -> int | None:
    """The compiler's forward FLOPs/token of ``model_dir`` at ``seq_len`` (None if it cannot tell)."""
    try:
        from scaler_wizard.compiler.frontend import check_text

        return int(check_text("", model=str(model_dir), context=seq_len).costs_before.flops_per_token)
    except Exception:
        return None


def _roll_back(run_dir: Path, model_dir: Path, good: list[int], main: bool) -> str:
    """After a trip: checkpoints newer than the last good one are set aside as ``rejected-*``
    and ``final/`` becomes the last good checkpoint (or the starting model)."""
    last_good = good[-1] if good else None
    if main:
        for s, p in checkpoints(run_dir):
            if last_good is None or s > last_good:
                dst = run_dir / f"rejected-{p.name}"
                shutil.rmtree(dst, ignore_errors=True)
                os.replace(p, dst)
        src = run_dir / f"checkpoint-{last_good}" if last_good is not None else model_dir
        _copy_hf_dir(src, run_dir / "final")
    return f"checkpoint-{last_good}" if last_good is not None else "initial"


def _dump_rank_weights(model, accelerator, path: Path) -> None:
    """This rank's full copy of the weights (gathered under ZeRO-3), for cross-rank checks."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    inner = accelerator.unwrap_model(model)
    params = dict(inner.named_parameters())
    if _zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            sd = {n: p.detach().clone().contiguous() for n, p in params.items()}
    else:
        sd = {n: p.detach().clone().contiguous() for n, p in params.items()}
    save_file(sd, str(path))


def _teardown(accelerator, model) -> None:
    """DeepSpeed ZeRO-3 needs its engine destroyed and the process group torn down before
    interpreter exit, or a rank can abort in its atexit hooks."""
    if _is_deepspeed(accelerator) and hasattr(model, "destroy"):
        model.destroy()
    accelerator.free_memory()
    import torch.distributed as dist

    if accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _reset_accelerate()
