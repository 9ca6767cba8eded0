"""The `scaler-wizard` command line. Each subcommand lives in ``scaler_wizard/commands/<name>.py``
and exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so ``check`` does not pay for torch.

Exit codes: 0 ok, 1 plan errors (diagnostics) or a failed verification, 2 usage or I/O errors (bad
input: a UsageError naming the path and what is wrong, or an OSError such as a full disk), 70 an
internal error (a bug: one line; SW_DEBUG=1 shows the traceback), others per command (documented in
the command's module).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

EXIT_PLAN = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70

# name -> (module, one-line help). Help is duplicated here so `--help` imports nothing heavy.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("scaler_wizard.commands.check", "type-check plans against a model; print the resolved plan"),
    "ir": ("scaler_wizard.commands.ir", "print the IR discovered by tracing a model"),
    "explain": ("scaler_wizard.commands.explain", "show what a plan does to every tensor"),
    "compile": ("scaler_wizard.commands.compile", "lower a plan to a tensor program (JSON)"),
    "apply": ("scaler_wizard.commands.apply", "grow a checkpoint: execute a plan out-of-core"),
    "verify": ("scaler_wizard.commands.verify", "check that a grown model computes the same function"),
    "train": ("scaler_wizard.commands.train", "continue training a (grown) model"),
    "eval": ("scaler_wizard.commands.eval", "evaluate models with lm-eval"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 2 with a short message, never a traceback
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from scaler_wizard import __version__

    p = _Parser(prog="scaler-wizard", description="Grow trained transformer language models.")
    p.add_argument("--version", action="version", version=f"scaler-wizard {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if only is None or name == only:
            try:
                m = importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name == mod:
                    continue  # not built yet
                raise
            m.add_arguments(sp)
            sp.set_defaults(_module=m)
    return p


_OOM = ("out of memory (the sizes asked for do not fit this machine: lower --batch-size or --seq-len for train "
        "and eval; `scaler-wizard check` predicts the memory apply needs)")


def _is_oom(e: BaseException) -> bool:
    if type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "CUDA out of memory" in msg
                                            or "Cannot allocate memory" in msg)


def _quiet_libraries() -> None:
    """stderr is for what the user asked about: libraries' deprecation notices (transformers, torch,
    lm-eval) and DeepSpeed's "Setting accelerator to CPU" are not; warnings about the user's data
    and models stay (UserWarning and logging warnings other than these)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("DeepSpeed").addFilter(lambda r: "Setting accelerator to CPU" not in r.getMessage())


# Commands whose every output is closed before they return: the console
# script skips the interpreter's final garbage collection after them (see entry).
_NO_FINAL_GC = frozenset({"check", "ir", "explain", "compile", "apply", "verify"})
# Commands that compute large tensors out of core: torch's CPU allocator is asked for transparent huge
# pages (see entry).
_HUGE_PAGES = frozenset({"apply", "verify"})


def tune_allocator() -> bool:
    """Fix glibc malloc's thresholds for the out-of-core commands (apply, verify): blocks of 8 MiB
    or more are mapped and unmapped on their own (``M_MMAP_THRESHOLD``), smaller ones reuse the heap,
    which keeps up to 64 MiB free before trimming (``M_TRIM_THRESHOLD``). By default glibc raises
    both thresholds as large blocks are freed and trims the heap as soon as its top is free, so the
    executor's tiles (0.1-4 MiB temporaries made and freed a few thousand times per second, see
    :mod:`scaler_wizard.runtime.tiles`) were faulted in page by page again and again (measured on the
    width benchmark: 1.17 M minor faults and 13-14 s of system time, against 0.12 M and 7-8 s). Blocks
    of whole tensors (8 MiB and up) still go back to the system when freed, so peak memory is not
    held by fragments. Returns False where the C library has no ``mallopt`` (not glibc): a no-op.
    The environment's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, if set, win."""
    import ctypes

    try:
        # the C library this process already runs on: ctypes.util.find_library("c") would start
        # `ldconfig -p` in a subprocess (about 10 ms of every apply)
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok = bool(mallopt(m_mmap_threshold, 8 << 20)) and ok
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        ok = bool(mallopt(m_trim_threshold, 64 << 20)) and ok
    return ok


def entry() -> None:
    """The console script (``scaler-wizard``) and ``python -m scaler_wizard``: :func:`main`, then exit.

    After a command in ``_NO_FINAL_GC`` the heap is frozen (``gc.freeze``) before the interpreter
    shuts down: its final garbage collection walks every object torch and transformers created at
    import (measured: 1.6 s of a 2-core machine's exit after importing transformers' Llama, 0.3 s
    frozen). Those commands close their files themselves; nothing they write waits for a finaliser.
    ``train`` and ``eval`` (trackers, lm-eval) exit the ordinary way. ``apply`` and ``verify`` also
    fix malloc's thresholds first (:func:`tune_allocator`).

    Before ``apply`` and ``verify`` import torch, ``THP_MEM_ALLOC_ENABLE=1`` is set (unless the
    environment sets it): torch's CPU allocator then aligns blocks of 2 MiB or more to 2 MiB and
    asks for transparent huge pages (``madvise``), so a fresh 46-115 MB float32 intermediate is
    faulted in 2 MiB at a time instead of 4 KiB (where the kernel's THP mode is ``madvise`` or
    ``always``; a no-op under ``never``). Measured with ``benchmarks/apply_speed.py --suite program
    --program width`` (the executor computing every tensor, 2026-12-03): 12.7-15.6 s with, 20.6-21.8 s
    without; peak RSS 0.95-1.04 GB with, 1.05 GB without."""
    import gc

    argv = sys.argv[1:]
    first = next((a for a in argv if not a.startswith("-")), None)
    if first in _HUGE_PAGES:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read once, at torch's first allocation
        tune_allocator()
    code = main(argv)
    if first in _NO_FINAL_GC:
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    m = getattr(args, "_module", None)
    if m is None:
        sys.stderr.write(f"scaler-wizard: `{args.command}` is not available in this build\n")
        return 2
    from scaler_wizard.diagnostics import PlanError, UsageError, render

    if not os.environ.get("SW_DEBUG"):
        _quiet_libraries()
    restore = _record_interrupts() if args.command == "apply" else None
    try:
        return int(m.run(args) or 0)
    except UsageError as e:
        sys.stderr.write(f"scaler-wizard {args.command}: error: {e}\n")
        return EXIT_USAGE
    except PlanError as e:  # every command that reads a plan reports its diagnostics the same way
        sys.stderr.write(render(e.diagnostics, getattr(e, "sources", None), color=sys.stderr.isatty()) + "\n")
        return EXIT_PLAN
    except OSError as e:  # an I/O failure no boundary converted (disk full, read-only, permissions)
        if os.environ.get("SW_DEBUG"):
            raise
        from scaler_wizard.runtime.preflight import os_error_message

        sys.stderr.write(f"scaler-wizard {args.command}: error: {os_error_message(e, 'I/O error on')}\n")
        return EXIT_USAGE
    except MemoryError:
        sys.stderr.write(f"scaler-wizard {args.command}: error: {_OOM}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:
        if type(e).__name__ == "PassError":  # a lowering pass refused: named, not a traceback
            sys.stderr.write(f"scaler-wizard {args.command}: {e}\n")
            return EXIT_PLAN
        if _is_oom(e):  # torch's allocator failing (CPU or GPU): the sizes asked for, not a bug
            sys.stderr.write(f"scaler-wizard {args.command}: error: {_OOM}: {str(e).splitlines()[0][:200]}\n")
            return EXIT_USAGE
        if os.environ.get("SW_DEBUG"):
            raise
        # Not bad input (every input boundary converts those to UsageError): a bug. One line, and how
        # to get the traceback for a report.
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        sys.stderr.write(f"scaler-wizard {args.command}: internal error: {type(e).__name__}: {msg}\n"
                         "this is a bug in scaler-wizard; please report it with the output of the same command "
                         "run with SW_DEBUG=1 (which shows the traceback)\n")
        return EXIT_INTERNAL
    finally:
        if restore is not None:
            restore()


def _record_interrupts():
    """For `apply`: a SIGINT handler that records the interrupt
    (:func:`scaler_wizard.runtime.io.writer.note_interrupt`) before raising KeyboardInterrupt as
    Python's does, so that an interrupt Python drops inside a callback still stops the output from
    landing (the commit points check the record). Returns a function restoring the previous handler
    and clearing the record; None where handlers cannot be set (not the main thread)."""
    import signal
    import threading

    from scaler_wizard.runtime.io.writer import note_interrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # started in the background with SIGINT ignored: keep it so
        return None

    def on_sigint(signum, frame):
        note_interrupt()
        raise KeyboardInterrupt

    note_interrupt(False)
    signal.signal(signal.SIGINT, on_sigint)

    def restore():
        signal.signal(signal.SIGINT, previous)
        note_interrupt(False)

    return restore


if __name__ == "__main__":
    raise SystemExit(main())
