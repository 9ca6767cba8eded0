"""Row-tiled execution (runtime/tiles.py) and the write-behind thread that writes its slabs.

Tiling is a speed path only: a tiled output must be bitwise the output evaluated whole. The tile,
slab and threshold sizes are shrunk so a tiny model's outputs go through many tiles, several slabs
per tensor and a ring that wraps around, with a writer slowed down so the ring is always full (a slab
reused while still queued for writing corrupts the output: the bug this guards against)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors import safe_open

from scaler_wizard import api
from scaler_wizard.compiler import program as P
from scaler_wizard.runtime import tiles
from scaler_wizard.runtime.checkpoint import CheckpointError, CheckpointWriter, open_checkpoint
from scaler_wizard.runtime.execute import execute
from scaler_wizard.runtime.io import writer as W
from scaler_wizard.runtime.io.writer import WriteBehind
from scaler_wizard.runtime.tiny import make_tiny_llama

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. " * 100


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaForCausalLM

    base = tmp_path_factory.mktemp("tiles")
    fp32 = make_tiny_llama(base / "fp32", TEXT, hidden=64, ffn=96, layers=2)
    bf16 = base / "bf16"
    LlamaForCausalLM.from_pretrained(fp32, dtype=torch.float32).to(torch.bfloat16).save_pretrained(bf16)
    for f in fp32.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (bf16 / f.name).write_bytes(f.read_bytes())
    return {"fp32": fp32, "bf16": bf16}


def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def small_tiles(monkeypatch, slabs=3):
    """Tiles of 2 KiB of float32, slabs of 8 KiB, outputs from 1 KiB tiled: every computed matrix of
    the tiny model is tiled, in several slabs."""
    monkeypatch.setattr(tiles, "TILE_BYTES", 2 << 10)
    monkeypatch.setattr(tiles, "SLAB_BYTES", 8 << 10)
    monkeypatch.setattr(tiles, "SLABS", slabs)
    monkeypatch.setattr(tiles, "MIN_TILED_BYTES", 1 << 10)


PLANS = {
    "lemon": "widen hidden x2 lemon\nwiden ffn x2 lemon",
    "net2net": "widen ffn x2 net2net\nwiden hidden to 96 lemon",
    "heads+layer": "widen heads x2 dup\ninsert layer 1 identity",
}


@pytest.mark.parametrize("model,out_dtype,plan", [
    ("fp32", None, "lemon"), ("bf16", None, "net2net"), ("fp32", "bfloat16", "net2net"), ("bf16", None, "heads+layer"),
])
def test_tiled_outputs_are_bitwise_the_whole_evaluation(models, tmp_path, monkeypatch, model, out_dtype, plan):
    src = models[model]
    prog = api.compile(PLANS[plan], str(src), dtype=out_dtype)
    small_tiles(monkeypatch)
    parts: dict[str, int] = {}
    orig = W.ShardStream.write_part

    def slow_part(self, name, part):
        parts[name] = parts.get(name, 0) + 1
        time.sleep(0.002)  # the writer falls behind: the ring is full whenever a slab is filled
        orig(self, name, part)

    monkeypatch.setattr(W.ShardStream, "write_part", slow_part)
    streams = []
    orig_stream = P.Random.row_stream
    monkeypatch.setattr(P.Random, "row_stream", lambda self, ctx: streams.append(self) or orig_stream(self, ctx))
    execute(prog, open_checkpoint(src), tmp_path / "tiled", dtype=out_dtype, progress=False)
    if plan == "net2net":  # LEMON's random residues (`widen hidden to 96`) are drawn tile by tile
        assert len(streams) >= 4
    whole_dir = tmp_path / "whole"
    execute(prog, open_checkpoint(src), whole_dir, dtype=out_dtype, progress=False, tile=False)
    assert max(parts.values()) >= 2 and len(parts) >= 2, parts  # tiled, several slabs per tensor
    tiled, whole = tensors(tmp_path / "tiled"), tensors(whole_dir)
    assert tiled.keys() == whole.keys()
    for k in whole:
        assert tiled[k].dtype == whole[k].dtype and tiled[k].shape == whole[k].shape, k
        assert torch.equal(tiled[k].view(torch.uint8), whole[k].view(torch.uint8)), k


def test_two_slab_ring_under_a_slow_writer(models, tmp_path, monkeypatch):
    """The smallest ring (one slab queued, one being filled), a writer 5 ms per slab behind."""
    src = models["fp32"]
    prog = api.compile(PLANS["lemon"], str(src))
    small_tiles(monkeypatch, slabs=2)
    orig = W.ShardStream.write_part

    def slow_part(self, name, part):
        time.sleep(0.005)
        orig(self, name, part)

    monkeypatch.setattr(W.ShardStream, "write_part", slow_part)
    rep = execute(prog, open_checkpoint(src), tmp_path / "tiled", progress=False)
    execute(prog, open_checkpoint(src), tmp_path / "whole", progress=False, tile=False)
    a, b = tensors(tmp_path / "tiled"), tensors(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert rep.peak_held_bytes >= 2 * (8 << 10)  # the ring is counted in what the executor holds


def test_region_stops_at_values_used_elsewhere():
    """A node consumed outside the region (or by an edge that needs it whole) is a boundary value."""
    from scaler_wizard.compiler.program import Concat, Index, Load, Scale

    a = Load("a", (64, 32), "float32")
    s = Scale(a, 2.0)
    g = Index(x=s, axis=0, indices=tuple([3, 1, 2] * 20 + [0, 0, 0, 0]))  # a row gather needs its input whole
    c = Concat(xs=(g, Scale(a, 3.0)), axis=1)
    uses = {a.digest: 2, s.digest: 1, g.digest: 1, c.children()[1].digest: 1}
    reg = tiles.plan_region(c, uses, min_bytes=0)
    assert reg is not None
    assert g.digest in reg.nodes and s.digest not in reg.nodes
    assert {n.digest for n in reg.boundary} >= {s.digest, a.digest}
    # the same Scale also feeding another output: it leaves the region
    uses2 = dict(uses)
    uses2[c.children()[1].digest] = 2
    reg2 = tiles.plan_region(c, uses2, min_bytes=0)
    assert c.children()[1].digest not in reg2.nodes
    assert tiles.plan_region(c, uses, min_bytes=1 << 30) is None  # too small to tile


def test_write_behind_byte_budget_and_held_bytes():
    wb = WriteBehind(max_bytes=100)
    gate = threading.Event()
    done = []
    try:
        wb.submit(gate.wait, nbytes=60)
        wb.submit(done.append, 1, nbytes=40, reused=True)  # 100 <= budget: queued at once
        assert wb.held_bytes() == 60  # the reused buffer is the caller's to count
        t = threading.Thread(target=wb.submit, args=(done.append, 2), kwargs={"nbytes": 1})
        t.start()
        t.join(0.3)
        assert t.is_alive() and done == []  # 101 bytes would exceed the budget: the caller waits
        gate.set()
        t.join(5)
        assert not t.is_alive()
        wb.drain()
        assert done == [1, 2] and wb.held_bytes() == 0
        # without nbytes: wait until nothing is in flight
        gate.clear()
        wb.submit(gate.wait, nbytes=10)
        t = threading.Thread(target=wb.submit, args=(done.append, 3))
        t.start()
        t.join(0.3)
        assert t.is_alive()
        gate.set()
        t.join(5)
        wb.drain()
        assert done == [1, 2, 3]
    finally:
        gate.set()
        wb.close()


def test_write_behind_error_reaches_the_caller_and_skips_the_rest():
    wb = WriteBehind(max_bytes=10)
    ran = []

    def boom():
        raise OSError(28, "No space left on device")

    try:
        wb.submit(boom, nbytes=1)
        wb.submit(ran.append, 1, nbytes=1)
        with pytest.raises(OSError, match="No space"):
            wb.drain()
        assert ran == []
        with pytest.raises(OSError):
            wb.submit(ran.append, 2)
    finally:
        wb.close()


def test_write_part_checks_order_dtype_and_size(tmp_path):
    with CheckpointWriter(tmp_path / "o") as w:
        s = w.shard([("a", (4, 4), "float32"), ("b", (2,), "float32")])
        with pytest.raises(CheckpointError, match="expected tensor 'a'"):
            s.write_part("b", torch.zeros(2))
        s.write_part("a", torch.arange(8, dtype=torch.float32))
        with pytest.raises(CheckpointError, match="incomplete"):
            s.write("b", torch.zeros(2))
        with pytest.raises(CheckpointError, match="incomplete"):
            s.copy_range("b", "x", 0, 8, "float32", (2,))
        with pytest.raises(CheckpointError, match="a part of torch.bfloat16"):
            s.write_part("a", torch.zeros(8, dtype=torch.bfloat16))
        with pytest.raises(CheckpointError, match="more than the declared"):
            s.write_part("a", torch.zeros(9))
        s.write_part("a", torch.arange(8, 16, dtype=torch.float32).reshape(2, 4))
        s.write("b", torch.ones(2))
        s.close()
        w._shard_done(s)
        w.write_config({"model_type": "llama"})
        w.commit()
    got = tensors(tmp_path / "o")
    assert torch.equal(got["a"], torch.arange(16, dtype=torch.float32).reshape(4, 4))
    assert torch.equal(got["b"], torch.ones(2))


def test_incomplete_part_fails_the_shard(tmp_path):
    with pytest.raises(CheckpointError, match="never written"):
        with CheckpointWriter(tmp_path / "o") as w:
            s = w.shard([("a", (4, 4), "float32")])
            s.write_part("a", torch.zeros(8))
            s.close()
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out_dtype", [None, "bfloat16"])
def test_every_tileable_op_along_rows(models, tmp_path, monkeypatch, out_dtype):
    """A hand-built program with each op the tiler evaluates by rows (axis 0 and not): Concat, Index,
    Slice with a step, MulAxis, Scale, Neg, Add, Mul, Cast, Tile, Zeros, Full; tiled against whole."""
    from scaler_wizard.compiler.program import (
        Add, Cast, Concat, Full, Index, Load, Mul, MulAxis, Neg, Scale, Slice, TensorProgram, Tile, Zeros,
    )

    src = models["bf16"]
    r = open_checkpoint(src)
    emb = "model.embed_tokens.weight"
    v, h = r.shape(emb)
    e = Load(emb, (v, h))
    up = "model.layers.0.mlp.up_proj.weight"
    u = Load(up, r.shape(up))
    rows = tuple(range(v - 1, -1, -3))
    p = TensorProgram()
    p.add(emb, Concat((
        MulAxis(Scale(e, 0.5), 0, tuple(float(i % 7) / 3 for i in range(v))),
        Neg(Slice(e, 0, 1, v, 2)),
        Index(Scale(e, 3.0), 0, rows),
        Cast(Zeros((5, h)), "float32"),
        Full((3, h), 0.25),
    ), 0))
    p.add(up, Tile(Concat((MulAxis(u, 1, tuple(1.0 + i / 100 for i in range(u.shape[1]))), Add(Neg(u), Mul(u, u))), 0),
                    1, 2))
    small_tiles(monkeypatch)
    done = []
    orig = tiles.compute_rows
    monkeypatch.setattr(tiles, "compute_rows", lambda n, *a: done.append(type(n).__name__) or orig(n, *a))
    execute(p, r, tmp_path / "tiled", dtype=out_dtype, progress=False)
    assert {"MulAxis", "Scale", "Neg", "Slice", "Index", "Add", "Mul", "Tile", "Zeros", "Full"} <= set(done)
    execute(p, open_checkpoint(src), tmp_path / "whole", dtype=out_dtype, progress=False, tile=False)
    a, b = tensors(tmp_path / "tiled"), tensors(tmp_path / "whole")
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def test_random_draws_by_rows_only_in_order(models, tmp_path, monkeypatch):
    """A Random joins a region only where one chain of single consumers leads to the root (a value used
    twice could ask for rows it has passed); rows a slice skips are drawn and dropped, so a stepped or
    offset slice of a random tensor tiles to the whole draw's values. Where this torch's kernels would
    not give the whole draw's values, no Random is drawn by rows."""
    from scaler_wizard.compiler.program import Concat, EvalContext, Random, Scale, Slice

    r = Random((64, 32), "k")
    x = Scale(r, 2.0)
    twice = Concat(xs=(x, x), axis=0)
    reg = tiles.plan_region(twice, {x.digest: 2, r.digest: 1}, min_bytes=0)
    assert x.digest in reg.nodes and r.digest not in reg.nodes  # below a value used twice
    assert P.Random((8, 3), "odd").draws_by_rows is False  # rows of 3 values: not a multiple of 16

    # slices that skip rows (a step, an offset), tile by tile against the whole evaluation
    r2 = Random((200, 32), "j", std=1.0)
    s2 = Concat(xs=(Scale(Slice(r, 0, 3, 64, 3), 2.0), Slice(r2, 0, 5, 194, 9)), axis=1)
    uses2 = {n.digest: 1 for n in (r, r2, s2.xs[0], s2.xs[0].x, s2.xs[1])}
    reg2 = tiles.plan_region(s2, uses2, min_bytes=0)
    assert {r.digest, r2.digest} <= set(reg2.nodes)
    ctx = EvalContext(seed=7)
    whole = s2.compute([s2.xs[0].compute([s2.xs[0].x.compute([r.compute([], ctx)], ctx)], ctx),
                        s2.xs[1].compute([r2.compute([], ctx)], ctx)], ctx)
    ev = tiles.TileEvaluator(reg2, {}, ctx, None, {})
    got = []
    for a in range(0, s2.shape[0], 4):
        got.append(ev.rows(s2, a, min(a + 4, s2.shape[0])))
        ev.clear()
    assert torch.equal(torch.cat(got), whole)

    monkeypatch.setattr(P, "_ROW_DRAWS", [False])
    reg3 = tiles.plan_region(s2, uses2, min_bytes=0)
    assert r.digest not in reg3.nodes and r2.digest not in reg3.nodes
    src = models["fp32"]
    prog = api.compile(PLANS["net2net"], str(src))
    small_tiles(monkeypatch)
    execute(prog, open_checkpoint(src), tmp_path / "tiled", progress=False)
    execute(prog, open_checkpoint(src), tmp_path / "whole", progress=False, tile=False)
    a, b = tensors(tmp_path / "tiled"), tensors(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in b)
