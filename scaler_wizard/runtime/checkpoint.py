"""Compatibility name for :mod:`scaler_wizard.runtime.io` (the checkpoint reader and writer), which
this module was before it was split by concept. New code imports from ``scaler_wizard.runtime.io``."""

from __future__ import annotations

from scaler_wizard.runtime.io import *  # noqa: F401,F403
from scaler_wizard.runtime.io import __all__  # noqa: F401
