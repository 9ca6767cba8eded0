"""Constants of the forward that follow a size of the config (differential tracing).

Some models compute a scalar of their forward from a size in the config rather than holding it in
a parameter: MiniCPM3 scales every residual branch by ``scale_depth / sqrt(num_hidden_layers)`` and
divides the final hidden states by ``hidden_size / dim_model_base`` before the LM head (muP-style
parametrisations). Tensors alone cannot show it, and growth that changes the size changes the
constant: the grown model is another function (insert an identity layer into MiniCPM3: 3e-2
relative drift; tile its hidden size: logits halved), while the copied weights look exact.

:func:`size_dependent_constants` traces the reduced model a second time with one size changed --
one layer more (the last traced layer's kind repeated), or the hidden size doubled -- and compares
the float scalars the graph's ops take, module by module, in graph order. A scalar that differs is
evidence that the size reaches the computation; it is reported as ``(config key, module, value,
value after the change)`` and the type checker refuses growth of that size (SW381). Modules whose op
sequence differs between the traces are not compared (no evidence either way), and neither is the
input-embedding scale discovery already knows (``sqrt(hidden_size)``, compensated by the passes) or
the attention's score scale when head_dim follows the hidden size.
"""

from __future__ import annotations

import copy
import math

from scaler_wizard.ir.dims import owner


def _scalars(ep) -> dict[str, list[tuple[str, tuple[float, ...]]]]:
    """module path -> [(op, float scalars of its arguments)] in graph order (call_function nodes)."""
    out: dict[str, list] = {}
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        vals = []
        for a in list(n.args) + list(n.kwargs.values()):
            if isinstance(a, float) and math.isfinite(a):
                vals.append(a)
        out.setdefault(owner(n), []).append((str(n.target), tuple(vals)))
    return out


def _differ(a: dict, b: dict, keep) -> list[tuple[str, float, float]]:
    found = []
    for mod, ops_a in a.items():
        ops_b = b.get(mod)
        if not keep(mod) or ops_b is None or [o for o, _ in ops_a] != [o for o, _ in ops_b]:
            continue
        for (_, va), (_, vb) in zip(ops_a, ops_b):
            if len(va) != len(vb):
                continue
            for x, y in zip(va, vb):
                if not math.isclose(x, y, rel_tol=1e-9, abs_tol=0.0):
                    found.append((mod, x, y))
    return found


def _export(config):
    from scaler_wizard.ir.trace import build_meta_model, export_model

    return export_model(build_meta_model(config))


def size_dependent_constants(tp, hidden_key: str | None, hidden: int | None, embed_scale: float | None,
                             with_hidden: tuple[str, ...] = ()) -> tuple[tuple[str, str, float, float], ...]:
    """``(config key, module, value, value after the change)`` for each float scalar of the traced
    forward that changes when ``tp``'s depth key grows by one layer, or ``hidden_key`` doubles (with
    the keys ``with_hidden`` -- the head counts -- doubled too, as `widen hidden` grows the heads at a
    fixed head_dim). Traces that fail (a model that rejects the changed config) give no evidence and
    are skipped; torch's log of the failed fake-tensor op is silenced."""
    import logging

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        return _find(tp, hidden_key, hidden, embed_scale, with_hidden)
    finally:
        fake_log.setLevel(level)


def _find(tp, hidden_key, hidden, embed_scale, with_hidden):
    import warnings

    base = _scalars(tp.exported)
    found: list[tuple[str, str, float, float]] = []
    red = tp.config
    layers = tp.layer_list_path or ""
    n = red.num_hidden_layers
    # one layer more: the last traced layer's kind repeated in every per-layer list
    deeper = copy.deepcopy(red)
    try:
        deeper.num_hidden_layers = n + 1
        for k in tp.layer_arrays:
            v = getattr(deeper, k, None)
            if isinstance(v, list) and len(v) == n and n:
                setattr(deeper, k, v + [v[-1]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = _scalars(_export(deeper))
        in_layers = lambda m: not layers or not m.startswith(layers + ".") or m.startswith(f"{layers}.0")  # noqa: E731
        for mod, x, y in _differ(base, other, in_layers):
            found.append((tp.layers_key, mod, x, y))
    except Exception:  # noqa: BLE001 - no evidence
        pass
    if hidden_key and hidden:
        # outside every layer stack (no ModuleList index in the path): inside a layer the attention's
        # score scale follows head_dim, which `widen hidden` keeps (it grows the heads)
        outside = lambda m: not any(part.isdigit() for part in m.split("."))  # noqa: E731
        for extra in (with_hidden, ()):  # with the head counts doubled, else hidden alone
            wider = copy.deepcopy(red)
            try:
                setattr(wider, hidden_key, hidden * 2)
                for k in extra:
                    v = getattr(wider, k, None)
                    if isinstance(v, int) and not isinstance(v, bool) and v > 1:
                        setattr(wider, k, v * 2)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    other = _scalars(_export(wider))
            except Exception:  # noqa: BLE001 - no evidence from this variant
                continue
            for mod, x, y in _differ(base, other, outside):
                known = embed_scale is not None and math.isclose(x, embed_scale, rel_tol=1e-6) and \
                    math.isclose(y, embed_scale * math.sqrt(2), rel_tol=1e-6)
                if not known:
                    found.append((hidden_key, mod, x, y))
            break
    return tuple(dict.fromkeys(found))
