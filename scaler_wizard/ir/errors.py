"""Errors raised while discovering a model's IR (no torch import)."""

from __future__ import annotations


class IRDiscoveryError(Exception):
    """The traced graph could not be understood. The message names the op or module where
    discovery stopped (exit code 1 from ``scaler-wizard ir``)."""

    def __init__(self, message: str, *, op: str | None = None, module: str | None = None):
        self.op = op
        self.module = module
        where = []
        if op:
            where.append(f"op {op}")
        if module:
            where.append(f"module {module}")
        super().__init__(message + (f" (at {', '.join(where)})" if where else ""))
