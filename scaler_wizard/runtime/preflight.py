"""Input boundaries: every model, run directory and output path a command reads or writes is checked
here first, so that bad input becomes one :class:`UsageError` naming the path and what is wrong
(exit 2 at the CLI) instead of a library traceback halfway through a run.

    check_model(ref, flag="MODEL") -> Path     # a loadable model: dir, .gguf, short name (or hub id online)
    check_writable_dir(path, flag="-o")         # an output location that can be created and written
    os_error_message(e, doing) -> str           # one line for an OSError (ENOSPC, EROFS, EACCES, ...)

Only the model's config and the safetensors headers are read (plus the model class built on the meta
device to compare shapes); no weights are loaded.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from scaler_wizard.diagnostics import UsageError

_ERRNO_WORDS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EDQUOT: "disk quota exceeded",
}


def os_error_reason(e: OSError) -> str:
    """The reason of an OSError in a few words ("no space left on the device", ...)."""
    return _ERRNO_WORDS.get(e.errno or -1) or (e.strerror or str(e)).lower()


def os_error_message(e: OSError, doing: str) -> str:
    """``"{doing} {path}: {reason}"`` for an OSError (the path from the error when it has one; without
    one, a trailing " on" of ``doing`` is dropped: "I/O error: no space left on the device")."""
    if getattr(e, "filename", None):
        return f"{doing} {e.filename}: {os_error_reason(e)}"
    return f"{doing.removesuffix(' on')}: {os_error_reason(e)}"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return (len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))
            and not ref.endswith((".gguf", ".json", ".safetensors")))


def check_model(ref: str | os.PathLike, *, flag: str = "MODEL", allow_pickle: bool = False) -> Path | str:
    """Check that ``ref`` names a model this project can load, reading only config and headers.

    Returns the resolved local path (a directory or a .gguf file), or ``ref`` unchanged for a hub id
    when the hub is reachable (online). Raises UsageError naming ``ref`` for: a missing path, a hub id
    while offline, a directory without config.json, config.json that is not JSON or names an unknown
    ``model_type``, a config needing custom code (``auto_map``), missing/truncated/corrupt weight
    files, and weights whose shapes disagree with config.json."""
    from scaler_wizard.runtime.verify import resolve_model_path

    s = str(ref)
    p = resolve_model_path(s)
    if not p.exists():
        if _looks_like_hub_id(s):
            if hub_offline():
                from scaler_wizard.ir.config import short_names

                raise UsageError(f"{flag} {s}: no such local directory, and the Hugging Face hub is offline "
                                 f"(HF_HUB_OFFLINE=1): download it first or give a local directory; available "
                                 f"offline: {short_names()}")
            return s
        raise UsageError(f"{flag} {s}: no such model directory or .gguf file")
    if p.is_file():
        if p.suffix == ".gguf":
            return p
        raise UsageError(f"{flag} {s}: expected a model directory (with config.json) or a .gguf file")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{flag} {s} is not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except OSError as e:
        raise UsageError(os_error_message(e, f"{flag}: cannot read")) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{cfg_path}: expected a JSON object")
    if cfg.get("auto_map"):
        raise UsageError(f"{flag} {s}: its config.json needs custom code (auto_map: "
                         f"{', '.join(sorted(cfg['auto_map']))}); scaler-wizard does not run code shipped with a "
                         "model, so only architectures built into transformers are supported")
    from transformers import CONFIG_MAPPING

    mt = cfg.get("model_type")
    if not mt:
        raise UsageError(f"{cfg_path}: no model_type")
    if mt not in CONFIG_MAPPING:
        raise UsageError(f"{flag} {s}: model_type {mt!r} is not known to the installed transformers")
    from scaler_wizard.runtime.checkpoint import CheckpointError, open_checkpoint

    try:
        reader = open_checkpoint(p, allow_pickle=allow_pickle)
    except CheckpointError as e:
        raise UsageError(f"{flag} {s}: {e}") from None
    try:
        _check_shapes(p, reader, flag, s)
    finally:
        reader.close()
    return p


def _check_shapes(p: Path, reader, flag: str, ref: str) -> None:
    """The model class built from config.json on the meta device must have the stored shapes."""
    import torch

    from scaler_wizard.runtime.checkpoint import CheckpointError
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(p))
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise UsageError(f"{flag} {ref}: config.json is not valid for its model type: {e}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError):
        return  # no causal-LM class for this config: the command that needs one says so when it loads it
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = []
    for name in reader.names():
        want = expected.get(name)
        if want is None:
            continue
        try:
            got = tuple(reader.shape(name))
        except (CheckpointError, KeyError):
            continue
        if got != want:
            bad.append(f"{name} is {list(got)} in the weights but {list(want)} by config.json")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UsageError(f"{flag} {ref}: weights disagree with config.json: {'; '.join(bad[:3])}{more}")


def require_hf_dir(path, ref: str, flag: str, command: str) -> None:
    """``train`` and ``eval`` run the model through transformers from a Hugging Face directory; a
    GGUF (or a short name standing for one) is refused with the way to make one."""
    if isinstance(path, Path) and path.suffix == ".gguf":
        raise UsageError(f"{flag} {ref}: {command} needs a Hugging Face model directory (config.json, safetensors, "
                         f"tokenizer), and this is the GGUF file {path}; make one with `scaler-wizard apply` (any plan "
                         "writes a directory) or with transformers: AutoModelForCausalLM.from_pretrained(DIR, "
                         "gguf_file=...).save_pretrained(OUT)")


def position_limit(model_dir: str | os.PathLike) -> tuple[int | None, bool]:
    """(max positions from the config or None, whether positions are a learned table): a table is an
    ``nn.Embedding`` whose module name says position (GPT-2 ``wpe``, OPT ``embed_positions``, ...)
    in the model class built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None, False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    learned = any(isinstance(m, torch.nn.Embedding) and ("pos" in name.lower() or name.endswith("wpe"))
                  for name, m in model.named_modules())
    return limit, learned


def check_writable_dir(path: str | os.PathLike, *, flag: str = "-o") -> Path:
    """Check that directory ``path`` can be created (or exists) and written, without leaving anything
    behind: the nearest existing ancestor must be a writable directory. Raises UsageError."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    anc = p
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"{flag} {path}: {anc} is not a directory")
    probe = anc / f".sw-write-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create it in {anc}: {os_error_reason(e)}") from None
    return p
