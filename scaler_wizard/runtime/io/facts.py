"""A small on-disk cache of what transformers says about a model's *class*, so that a program that
only moves bytes (a depth plan, every output a byte copy) starts without importing torch or
transformers (issue 11; importing ``transformers.conversion_mapping`` alone costs ~5 s of CPU).

Each fact is a JSON value computed once by transformers (``compute()``, which may import torch and
transformers) and stored under ``<SCALER_WIZARD_CACHE>/ir/facts/<key>.json``. The key hashes the
fact's kind, its inputs (a model_type, an ``architectures`` entry, or the sizes-symbolic structure
key of a config -- :func:`scaler_wizard.ir.structure_key_of`) and the installed transformers
version (read from package metadata, no import), so upgrading transformers recomputes every fact.
Only facts that depend on what the key holds are cached:

* ``conversion``: whether transformers' checkpoint conversion table has entries for an
  ``architectures`` class / ``model_type`` (``get_checkpoint_conversion_mapping``); when it has
  none, stored names are in-memory names and nothing else of the table is needed;
* ``classes``: the family's headless base class name, its causal / masked-LM head class and that
  class's ``base_model_prefix`` (transformers' auto mappings);
* ``ties``: the (output embedding, input embedding) parameter names of the model class built from a
  config (a function of the config's structure: which modules exist, not their sizes);
* ``disk``: whether ``save_pretrained`` of the class built from a config writes every in-memory
  name unchanged (transformers' reverse conversion has no entries for that model).

Errors while reading or writing the cache are ignored (the fact is computed again). Set
``SCALER_WIZARD_NO_FACT_CACHE=1`` to always compute (tests compare both paths).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

FACTS_VERSION = 1  # bump when a fact's meaning or computation changes


def _dir() -> Path:
    from scaler_wizard.ir import cache_dir

    return cache_dir() / "facts"


def _key(kind: str, inputs: Any) -> str:
    from scaler_wizard.ir import _transformers_version

    blob = json.dumps({"kind": kind, "in": inputs, "tf": _transformers_version(), "v": FACTS_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached_fact(kind: str, inputs: Any, compute: Callable[[], Any],
                valid: Callable[[Any], bool] | None = None) -> Any:
    """The JSON value ``compute()`` gives for ``(kind, inputs)`` under the installed transformers,
    from the cache when present (no call), else computed and stored. ``compute`` must return a
    JSON-serialisable value (lists come back as lists). ``valid``: a stored value it rejects (an
    edited or corrupted file) is computed again, never used."""
    if os.environ.get("SCALER_WIZARD_NO_FACT_CACHE"):
        return compute()
    path = _dir() / f"{_key(kind, inputs)}.json"
    try:
        entry = json.loads(path.read_text())
        if entry.get("kind") == kind and (valid is None or valid(entry["value"])):
            return entry["value"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    value = compute()
    try:
        text = json.dumps({"kind": kind, "in": inputs, "value": value}, sort_keys=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):
        pass
    return value


def structure_of(config: dict) -> str:
    """The sizes-symbolic structure key of a config dict (see :mod:`scaler_wizard.ir.structure`)."""
    from scaler_wizard.ir import structure_key_of

    return structure_key_of(config)
