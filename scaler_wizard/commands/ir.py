"""`scaler-wizard ir --model M [--format text|json] [--no-cache]`: print the discovered IR.

Exit codes: 0 ok, 1 the model could not be understood (IRDiscoveryError), 2 usage / I-O errors.
"""

from __future__ import annotations

import sys

HELP = "print the IR discovered by tracing a model"


def add_arguments(parser) -> None:
    parser.add_argument("--model", "-m", required=True, help="model dir, config.json, .gguf, short name or hub id")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--no-cache", action="store_true", help="trace again instead of reading the IR cache")


def run(args) -> int:
    from scaler_wizard.diagnostics import UsageError
    from scaler_wizard.ir import model_ir_for
    from scaler_wizard.ir.errors import IRDiscoveryError

    try:
        ir = model_ir_for(args.model, use_cache=not args.no_cache)
    except UsageError as e:
        sys.stderr.write(f"scaler-wizard ir: error: {e}\n")
        return 2
    except IRDiscoveryError as e:
        sys.stderr.write(f"scaler-wizard ir: cannot understand model {args.model}: {e}\n")
        return 1
    if args.format == "json":
        sys.stdout.write(ir.to_json() + "\n")
    else:
        from scaler_wizard.ir.printer import render_ir

        sys.stdout.write(render_ir(ir))
    return 0
