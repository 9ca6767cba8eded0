"""The CLI's subcommands (see scaler_wizard/cli.py), and argparse value types shared by them: a bad
value is an argparse error (exit 2, usage line, the option and the value named), never a traceback
later."""

from __future__ import annotations

import argparse

SEED_MAX = 2**63 - 1


def seed_arg(text: str) -> int:
    """``--seed``: an integer 0 .. 2**63-1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63-1, got {text!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63-1, got {text}")
    return v


def size_arg(text: str) -> int:
    """``--shard-size``: 500MB, 2GB, 2GiB or a number of bytes; positive."""
    from scaler_wizard.runtime.checkpoint import CheckpointError, parse_size

    try:
        return parse_size(text)
    except CheckpointError:
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB, 2GB, 2GiB or a number of bytes, "
                                         f"got {text!r}") from None


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")
