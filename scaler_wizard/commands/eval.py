"""`scaler-wizard eval MODEL... --tasks ...`: evaluate models with lm-eval, side by side.

Models are HF dirs or hub ids (``label=PATH`` names a column). Tasks are lm-eval names (hub tasks
when online; local YAML tasks via --include-path) or the offline built-ins ``perplexity`` (over
--text files) and ``mc`` (multiple choice over --mc jsonl files). Prints a comparison table;
--json writes every metric. Exit codes: 0 ok, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scaler_wizard.commands import nonneg_int, positive_int
from scaler_wizard.diagnostics import UsageError

HELP = "evaluate models with lm-eval"


def add_arguments(p) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="HF model dirs or hub ids; LABEL=PATH to name one")
    p.add_argument("--tasks", required=True,
                   help="comma-separated: perplexity, mc, or lm-eval task names (e.g. hellaswag)")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE", help="text files for the `perplexity` task")
    p.add_argument("--mc", nargs="+", default=[], metavar="JSONL",
                   help='jsonl for the `mc` task: {"question", "choices", "answer"} per line')
    p.add_argument("--include-path", action="append", default=[], metavar="DIR", help="more lm-eval YAML tasks")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=nonneg_int)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--doc-chars", type=positive_int, default=2000, help="perplexity document size in characters")
    p.add_argument("--max-length", type=positive_int, help="context window for rolling perplexity (default: the model's)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON ('-' for stdout)")


def run(args) -> int:
    from scaler_wizard.runtime.evaluate import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = args.limit
    if limit is not None:
        import math

        if not math.isfinite(limit) or limit <= 0:
            raise UsageError(f"--limit must be a positive number (documents, or a fraction below 1), got {limit}")
        limit = int(limit) if limit >= 1 else limit
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    if args.doc_chars < 1:
        raise UsageError("--doc-chars must be >= 1")
    report = evaluate(args.models, tasks, text_files=args.text, mc_files=args.mc, include_paths=args.include_path,
                      limit=limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                      num_fewshot=args.num_fewshot, doc_chars=args.doc_chars, max_length=args.max_length)
    if args.json == "-":
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(report.table())
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        except OSError as e:
            raise UsageError(f"cannot write {args.json}: {e.strerror or e}") from None
    return 0
