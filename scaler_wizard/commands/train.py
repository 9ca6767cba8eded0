"""`scaler-wizard train MODEL_DIR --data ... -o RUN_DIR`: continue training a (grown) model.

Exit codes: 0 finished (or stopped by --stop-after with a checkpoint to resume), 1 plan errors
(--plan), 2 bad input, 3 the capability-retention breaker tripped: training stopped, the last good
checkpoint was restored into RUN_DIR/final and the reason is in RUN_DIR/metrics.jsonl.

Several processes: run the same command under ``torchrun`` or ``accelerate launch`` (configs from
``--emit-config``); see DEVELOPERS.md for what was measured on CPU-only machines.
"""

from __future__ import annotations

import argparse
import sys

from scaler_wizard.commands import positive_int, seed_arg

from scaler_wizard.diagnostics import UsageError

HELP = "continue training a (grown) model"
EXIT_BREAKER = 3

# flag -> recipe key (None: store_true flags default to None so that "not given" is visible)
_RECIPE_FLAGS = {
    "data": "data", "eval_data": "eval_data", "text_field": "text_field", "data_config": "data_config",
    "data_split": "data_split", "streaming": "streaming", "eval_fraction": "eval_fraction",
    "eval_blocks": "eval_blocks", "steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum",
    "seq_len": "seq_len", "curriculum": "curriculum", "lr": "lr", "new_lr": "new_lr",
    "min_lr_ratio": "min_lr_ratio", "warmup_steps": "warmup_steps", "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "freeze_original": "freeze_original", "precision": "precision",
    "gradient_checkpointing": "gradient_checkpointing", "seed": "seed", "log_every": "log_every",
    "eval_every": "eval_every", "save_every": "save_every", "keep_checkpoints": "keep_checkpoints",
    "breaker_threshold": "breaker_threshold", "breaker_patience": "breaker_patience",
    "baseline_model": "baseline_model",
    "teacher": "teacher", "distill_alpha": "distill_alpha", "distill_temperature": "distill_temperature",
    "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_targets": "lora_targets", "lora_dropout": "lora_dropout",
    "lora_new": "lora_new", "lora_merge": "lora_merge", "report_to": "report_to",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="Hugging Face model directory to train")
    p.add_argument("-o", "--output", metavar="RUN_DIR", help="run directory (metrics, checkpoints, final/)")
    p.add_argument("--plan", help="plan file whose `train { ... }` block (or referenced file) is the recipe")
    p.add_argument("--recipe", help="training recipe file (TOML or JSON); flags override it")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="SRC", help="text/jsonl/json/parquet/csv files, dirs, globs or hub ids")
    g.add_argument("--eval-data", nargs="+", metavar="SRC", help="held-out data (default: a split of --data)")
    g.add_argument("--text-field", help="column with the text (default: text)")
    g.add_argument("--data-config", help="hub dataset config name")
    g.add_argument("--data-split", help="hub dataset split (default: train)")
    g.add_argument("--streaming", action="store_true", default=None, help="stream the dataset instead of loading it")
    g.add_argument("--eval-fraction", type=float, help="held-out fraction of --data (default 0.05)")
    g.add_argument("--eval-blocks", type=int, help="held-out blocks per eval (default 32)")
    g = p.add_argument_group("schedule and optimiser")
    g.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    g.add_argument("--batch-size", type=int, help="sequences per process per micro-step (default 8)")
    g.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--seq-len", type=int, help="block length (default 512)")
    g.add_argument("--curriculum", help="short blocks first: SEQ:UNTIL_STEP,... e.g. 128:200,256:400")
    g.add_argument("--lr", type=float, help="peak learning rate (default 3e-4)")
    g.add_argument("--new-lr", type=float, help="learning rate of tensors the growth record marks new")
    g.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of the peak (default 0.1)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0)")
    g.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay on matrices (default 0)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0 disables (default 1.0)")
    g.add_argument("--freeze-original", action="store_true", default=None,
                   help="train only new parameters (needs the growth record)")
    g.add_argument("--growth-record", help="growth record file (default: MODEL_DIR/scaler_wizard_growth.json)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="autocast (default auto)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None)
    g.add_argument("--seed", type=seed_arg)
    g = p.add_argument_group("logging, checkpoints, breaker")
    g.add_argument("--log-every", type=int, help="write a metrics line every N steps (default 1)")
    g.add_argument("--eval-every", type=int, help="held-out loss/perplexity every N steps (default: at the end)")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (default: at the end)")
    g.add_argument("--keep-checkpoints", type=int, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or from the newest one in RUN_DIR")
    g.add_argument("--stop-after", type=int, metavar="STEP", help="stop (with a checkpoint) after this step")
    g.add_argument("--no-breaker", action="store_true", help="disable the capability-retention breaker")
    g.add_argument("--breaker-threshold", type=float,
                   help="trip when eval ppl > baseline x (1 + this) ... (default 0.25)")
    g.add_argument("--breaker-patience", type=int, help="... for this many consecutive evals (default 2)")
    g.add_argument("--baseline-model", help="original (un-grown) model dir: its perplexity is the breaker's reference")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--report-to", metavar="TRACKER",
                   help="experiment tracker: tensorboard (RUN_DIR/tb), wandb, mlflow, aim, all, none (default none)")
    g = p.add_argument_group("distillation (expand then distill)")
    g.add_argument("--teacher", metavar="MODEL_DIR",
                   help="teacher with the same tokenizer (e.g. the un-grown original): mixes in its soft targets")
    g.add_argument("--distill-alpha", type=float,
                   help="weight of the KL term: (1-a) LM + a T^2 KL(teacher||student) (default 0.5)")
    g.add_argument("--distill-temperature", type=float, help="softmax temperature T (default 2.0)")
    g = p.add_argument_group("LoRA (peft)")
    g.add_argument("--lora-r", type=int, help="LoRA rank; 0 (default) trains every weight")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2 x r)")
    g.add_argument("--lora-targets", help="roles that get adapters (default q,k,v,o,gate,up,down)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapter input (default 0)")
    g.add_argument("--lora-new", choices=["full", "lora"],
                   help="tensors growth added: train fully (default) or through adapters too")
    g.add_argument("--no-lora-merge", dest="lora_merge", action="store_const", const=False, default=None,
                   help="keep RUN_DIR/final as a peft adapter instead of merged weights")
    g = p.add_argument_group("several processes")
    g.add_argument("--deepspeed", metavar="DS_JSON", help="DeepSpeed config (under torchrun; accelerate launch "
                                                          "passes its own)")
    g.add_argument("--emit-config", metavar="KIND",
                   help="write launcher configs (ddp, cpu-ddp, zero1, zero2, zero3, fsdp2) into -o and exit")
    g.add_argument("--num-processes", type=positive_int, default=2, help="for --emit-config (default 2)")
    g.add_argument("--offload", action="store_true", help="for --emit-config: CPU offload (ZeRO/FSDP)")
    g.add_argument("--dump-rank-weights", action="store_true", help=argparse.SUPPRESS)


def build_recipe(args):
    from scaler_wizard.runtime.recipe import TrainRecipe, recipe_from_plan

    # the plan's train block, then the recipe file, then flags: later ones win, key by key
    recipe = recipe_from_plan(args.plan) if args.plan else TrainRecipe()
    if args.recipe:
        recipe = recipe.merged(TrainRecipe.file_options(args.recipe), where=args.recipe)
    recipe.override(**{key: getattr(args, flag) for flag, key in _RECIPE_FLAGS.items()})
    if args.no_breaker:
        recipe.breaker = False
    return recipe


def plan_stages(plan_path: str, model_dir: str, recipe) -> tuple:
    """The plan's `at step` stages resolved against MODEL_DIR (compiler/stages.py)."""
    from scaler_wizard.compiler.stages import stages_for_run

    recipe.validate()
    _check_applied(plan_path, model_dir)
    return stages_for_run(plan_path, str(model_dir), steps=recipe.steps, seq_len=recipe.max_seq_len)


def _check_applied(plan_path: str, model_dir: str) -> None:
    """A plan with stages *and* growth statements outside them describes: apply those statements, then
    train the result with the stages (that is what ``check`` reports). MODEL_DIR must then be that
    result: its growth record (``scaler_wizard_growth.json``, written by ``apply``) lists the same
    statements. Raises PlanError SW324, positioned at the first such statement, when it does not
    (training the un-grown model would run the stages on a model they were not checked against)."""
    import json
    from pathlib import Path

    from scaler_wizard.compiler.frontend import parse_plan_file
    from scaler_wizard.diagnostics import Diagnostic, PlanError
    from scaler_wizard.grammar import ast as A
    from scaler_wizard.grammar.printer import statement_text

    settings = (A.Stage, A.ModelStmt, A.SeedStmt, A.DtypeStmt, A.NoiseStmt, A.TrainStmt)
    plan, sources = parse_plan_file(plan_path)
    growth = [s for s in plan.statements if not isinstance(s, settings)]
    if not growth or not any(isinstance(s, A.Stage) for s in plan.statements):
        return
    wanted = sorted(statement_text(s) for s in growth)
    record = Path(model_dir) / "scaler_wizard_growth.json"
    try:
        got = sorted({o.get("statement", "") for o in json.loads(record.read_text()).get("ops") or []})
    except (OSError, ValueError, AttributeError):
        got = None
    if got is not None and sorted(set(wanted)) == got:
        return
    why = ("it has no growth record (scaler_wizard_growth.json): it is not an `apply` output" if got is None
           else "its growth record lists other statements (" + "; ".join(got) + ")")
    err = PlanError([Diagnostic(
        "SW324", f"this plan grows the model before training (`{statement_text(growth[0])}`) and then during it (`at step`), "
        f"but MODEL_DIR {model_dir} is not the result of the growth before training: {why}", growth[0].span,
        help=f"apply first, then train the result: `scaler-wizard apply {plan_path} --out GROWN` and "
             f"`scaler-wizard train GROWN --plan {plan_path} ...`")])
    err.sources = sources
    raise err


def run(args) -> int:
    if args.emit_config:
        from scaler_wizard.runtime.launch import emit_config

        if not args.output:
            raise UsageError("--emit-config needs -o DIR for the config files")
        from scaler_wizard.runtime.preflight import check_writable_dir

        check_writable_dir(args.output, flag="-o")
        for path in emit_config(args.emit_config, args.output, num_processes=args.num_processes,
                                offload=args.offload):
            print(path)
        return 0
    if not args.model:
        raise UsageError("missing MODEL_DIR")
    if not args.output:
        raise UsageError("missing -o RUN_DIR")
    from scaler_wizard.diagnostics import PlanError, render

    try:
        recipe = build_recipe(args)
        stages = plan_stages(args.plan, args.model, recipe) if args.plan else ()
    except PlanError as e:
        sys.stderr.write(render(e.diagnostics, getattr(e, "sources", None) or {}) + "\n")
        return 1
    from scaler_wizard.runtime.train import train

    res = train(args.model, args.output, recipe, resume=args.resume, deepspeed_config=args.deepspeed,
                growth_record=args.growth_record, stop_after=args.stop_after, progress=not args.no_progress,
                dump_rank_weights=args.dump_rank_weights, stages=stages)
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return EXIT_BREAKER if res.status == "breaker" else 0
    if res.status == "breaker":
        sys.stderr.write(f"scaler-wizard train: breaker tripped at step {res.step}: {res.reason}; "
                         f"restored {res.restored} into {res.final_dir}\n")
        return EXIT_BREAKER
    if res.status == "stopped":
        print(f"stopped after step {res.step}; continue with --resume")
        return 0
    tail = f", eval ppl {res.baseline_ppl:.4g} -> {res.last_eval_ppl:.4g}" if res.baseline_ppl and res.last_eval_ppl else ""
    print(f"trained {res.step} steps{tail}; model in {res.final_dir}")
    return 0
