"""Test-wide settings: no hub access, and an IR cache private to the test session."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "SCALER_WIZARD_CACHE" not in os.environ:
    os.environ["SCALER_WIZARD_CACHE"] = tempfile.mkdtemp(prefix="sw-test-cache-")
