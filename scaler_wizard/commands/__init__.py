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


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return v
