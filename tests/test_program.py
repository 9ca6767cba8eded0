"""TensorProgram: shape inference, values against direct torch, JSON, dedup, seeded randomness."""

import json

import pytest
import torch

from scaler_wizard.compiler.program import (
    Add, Cast, Concat, EvalContext, Full, Index, Load, Mul, MulAxis, Neg, Permute, ProgramError, Random, Reshape,
    Scale, Slice, TensorProgram, Tile, ZeroSumNoise, Zeros, chunk, evaluate, seed_for, split, sub, tile_groups,
    transpose,
)

torch.manual_seed(0)
A = torch.randn(4, 6)
B = torch.randn(6)
TENSORS = {"a": A, "b": B, "c": torch.randn(4, 6)}


def ev(node, seed=0):
    return evaluate(node, EvalContext(seed, TENSORS.__getitem__))


def L(name):
    return Load(name, tuple(TENSORS[name].shape))


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda: Slice(L("a"), 1, 2, 5), lambda: A[:, 2:5]),
        (lambda: Slice(L("a"), 0, 0, 4, 2), lambda: A[0:4:2]),
        (lambda: Index(L("a"), 1, (5, 0, 0, 3)), lambda: A[:, [5, 0, 0, 3]]),
        (lambda: Tile(L("a"), 0, 3), lambda: torch.cat([A, A, A], 0)),
        (lambda: Tile(L("a"), -1, 2), lambda: torch.cat([A, A], 1)),
        (lambda: Scale(L("a"), 0.5), lambda: A * 0.5),
        (lambda: MulAxis(L("a"), 1, tuple(float(i) for i in range(6))), lambda: A * torch.arange(6.0)),
        (lambda: MulAxis(L("a"), 0, (1.0, 2.0, 3.0, 4.0)), lambda: A * torch.tensor([1.0, 2, 3, 4])[:, None]),
        (lambda: Mul(L("a"), L("b")), lambda: A * B),
        (lambda: Add(L("a"), L("c")), lambda: A + TENSORS["c"]),
        (lambda: sub(L("a"), L("c")), lambda: A - TENSORS["c"]),
        (lambda: Neg(L("a")), lambda: -A),
        (lambda: Concat((L("a"), Zeros((4, 2)), Full((4, 1), 3.0)), 1),
         lambda: torch.cat([A, torch.zeros(4, 2), torch.full((4, 1), 3.0)], 1)),
        (lambda: Reshape(L("a"), (2, 12)), lambda: A.reshape(2, 12)),
        (lambda: Permute(Reshape(L("a"), (2, 2, 6)), (2, 0, 1)), lambda: A.reshape(2, 2, 6).permute(2, 0, 1)),
        (lambda: transpose(L("a"), 0, 1), lambda: A.T),
        (lambda: Cast(L("a"), "bfloat16"), lambda: A.to(torch.bfloat16).float()),
    ],
)
def test_op_values_and_shapes(make, expect):
    node = make()
    want = expect()
    got = ev(node)
    assert node.shape == tuple(want.shape)
    assert tuple(got.shape) == node.shape
    assert torch.equal(got, want)


def test_chunk_split_helpers():
    parts = chunk(L("a"), 3, axis=1)
    assert [p.shape for p in parts] == [(4, 2)] * 3
    assert torch.equal(ev(Concat(tuple(parts), 1)), A)
    s = split(L("a"), [1, 3], axis=0)
    assert torch.equal(ev(s[1]), A[1:4])
    with pytest.raises(ValueError, match="chunk"):
        chunk(L("a"), 4, axis=1)
    with pytest.raises(ValueError, match="split"):
        split(L("a"), [1, 1], axis=0)


@pytest.mark.parametrize(
    "make,op",
    [
        (lambda: Slice(L("a"), 0, 0, 9), "Slice"),
        (lambda: Slice(L("a"), 2, 0, 1), "Slice"),
        (lambda: Index(L("a"), 0, (0, 4)), "Index"),
        (lambda: Tile(L("a"), 0, 0), "Tile"),
        (lambda: MulAxis(L("a"), 1, (1.0, 2.0)), "MulAxis"),
        (lambda: Add(L("a"), Zeros((3, 6))), "Add"),
        (lambda: Concat((L("a"), Zeros((3, 5))), 0), "Concat"),
        (lambda: Reshape(L("a"), (5, 5)), "Reshape"),
        (lambda: Permute(L("a"), (0, 0)), "Permute"),
        (lambda: Cast(L("a"), "complex64"), "Cast"),
        (lambda: Random((2, 2), key="k", dist="cauchy"), "Random"),
        (lambda: ZeroSumNoise((4, 2), 0, ((0, 1), (1, 2)), 0.1, "k"), "ZeroSumNoise"),
        (lambda: Scale(L("a"), float("nan")), "Scale"),
    ],
)
def test_bad_ops_raise_naming_the_op(make, op):
    with pytest.raises(ValueError, match=op):
        make()


def test_hash_consing_dedup():
    x1 = Tile(Load("a", (4, 6)), 0, 2)
    x2 = Tile(Load("a", (4, 6)), 0, 2)
    assert x1 == x2 and hash(x1) == hash(x2) and x1.digest == x2.digest
    assert Tile(Load("a", (4, 6)), 0, 3) != x1
    p = TensorProgram()
    p.add("o1", Scale(x1, 2.0))
    p.add("o2", Concat((x2, x2), 1))
    nodes = p.nodes()
    assert len(nodes) == 4  # load, tile, scale, concat: the tile and load are shared
    assert sum(isinstance(n, Tile) for n in nodes) == 1


def _program():
    p = TensorProgram(seed=7, config_patch={"intermediate_size": 12}, metadata={"plan": "widen ffn x2"})
    a = Load("a", (4, 6), "float32")
    p.add("a", a)
    grown = Concat((Tile(a, 0, 2), Random((8, 2), key="grow", std=0.1)), 1)
    p.add("g", grown, status="grown", original_region=[[0, 4], [0, 6]], explain="tiled + random columns")
    p.add("n", Add(ZeroSumNoise((8, 6), 0, tile_groups(4, 2), 0.01, "noise"), Tile(Scale(a, 0.5), 0, 2)),
          exactness="approx")
    p.add("m", MulAxis(Index(a, 1, (0, 0, 5)), 1, (0.5, 0.5, 1.0)))
    return p


def test_json_round_trip_stable_and_exact():
    p = _program()
    text = p.to_json()
    d = json.loads(text)
    assert d["format"] == "scaler-wizard/tensor-program" and d["version"] == 1
    ids = [n["id"] for n in d["nodes"]]
    assert ids == list(range(len(ids)))
    for n in d["nodes"]:  # topological: children have smaller ids
        for k in ("x", "y"):
            if k in n:
                assert n[k] < n["id"]
        for c in n.get("xs", []):
            assert c < n["id"]
    q = TensorProgram.from_json(text)
    assert q.to_json() == text
    assert q.seed == 7 and q.config_patch == {"intermediate_size": 12}
    assert q.outputs["g"].status == "grown" and q.outputs["g"].original_region == ((0, 4), (0, 6))
    assert q.outputs["a"].status == "original" and q.outputs["n"].exactness == "approx"
    assert q.exactness() == "approx"
    for name in p.outputs:
        assert p.outputs[name].node == q.outputs[name].node
        assert torch.equal(evaluate(p.outputs[name].node, EvalContext(7, TENSORS.__getitem__)),
                           evaluate(q.outputs[name].node, EvalContext(7, TENSORS.__getitem__)))


def test_json_errors():
    with pytest.raises(ProgramError, match="format"):
        TensorProgram.from_json('{"format": "x"}')
    with pytest.raises(ProgramError, match="JSON"):
        TensorProgram.from_json("{nope")
    d = json.loads(_program().to_json())
    d["nodes"][1]["op"] = "frobnicate"
    with pytest.raises(ProgramError, match="frobnicate"):
        TensorProgram.from_dict(d)
    d = json.loads(_program().to_json())
    tile = next(n for n in d["nodes"] if n["op"] == "tile")
    tile["reps"] = 5
    with pytest.raises(ProgramError, match="shape"):
        TensorProgram.from_dict(d)


def test_duplicate_output_and_bad_region():
    p = TensorProgram()
    p.add("x", Zeros((2, 2)))
    with pytest.raises(ProgramError, match="twice"):
        p.add("x", Zeros((2, 2)))
    with pytest.raises(ProgramError, match="region"):
        p.add("y", Zeros((2, 2)), status="grown", original_region=[[0, 3], [0, 2]])


def test_random_is_seeded_per_key_and_order_independent():
    r1 = Random((16, 8), key="layer.0.up", std=0.02)
    r2 = Random((16, 8), key="layer.1.up", std=0.02)
    a1, a2 = ev(r1, seed=3), ev(r2, seed=3)
    b2, b1 = ev(r2, seed=3), ev(r1, seed=3)  # other order, fresh caches
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert not torch.equal(a1, ev(r1, seed=4))
    assert seed_for(3, "layer.0.up") == seed_for(3, "layer.0.up") != seed_for(3, "layer.0.upx")
    u = ev(Random((20000,), key="u", std=2.0, dist="uniform"), seed=1)
    assert abs(u.std().item() - 2.0) < 0.05 and u.abs().max().item() <= 2.0 * 3 ** 0.5 + 1e-6
    n = ev(Random((20000,), key="n", std=0.5, mean=1.0), seed=1)
    assert abs(n.mean().item() - 1.0) < 0.02 and abs(n.std().item() - 0.5) < 0.02


def test_zero_sum_noise_sums_to_zero_over_copies():
    d, k = 5, 3
    node = ZeroSumNoise((3, d * k), 1, tile_groups(d, k), 0.1, "z")
    z = ev(node)
    assert z.abs().max() > 0
    for j in range(d):
        s = z[:, [j + c * d for c in range(k)]].sum(1)
        assert s.abs().max() < 1e-7
    pair = ev(ZeroSumNoise((2, 4), 1, ((0, 2),), 0.1, "p"))
    assert torch.equal(pair[:, 0], -pair[:, 2])  # pairs are exact negatives
    assert torch.equal(pair[:, 1], torch.zeros(2)) and torch.equal(pair[:, 3], torch.zeros(2))  # not in a group


def test_explain_and_status_defaults():
    p = _program()
    assert p.outputs["a"].status == "original"
    assert p.outputs["n"].status == "new"
    assert "tile(0.5 * a, axis 0, x2)" in p.outputs["n"].explain
    lines = p.explain_lines()
    assert any(line.startswith("g [8, 8] [grown, exact]") for line in lines)


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_exact_split_copies_are_representable_and_sum_exactly(dt):
    """ExactSplit: with a 16-bit storage dtype every copy is representable in it and the copies of a
    unit sum exactly (float64) to x[u] (shares summing to 1), for two and three copies, unequal
    shares, zero-sum noise larger than some weights and a zero weight; without a storage dtype (or
    float32) the value is left alone."""
    from scaler_wizard.compiler.methods.axisops import grow_units
    from scaler_wizard.compiler.methods.unitmap import UnitMap
    from scaler_wizard.compiler.program import ExactSplit

    sd = getattr(torch, dt)
    g = torch.Generator().manual_seed(0)
    xv = (torch.randn(6, 4, generator=g) * 0.05).to(sd).float()
    xv[0, 0] = 0.0
    src = (0, 1, 2, 3, 0, 1, 2, 0)  # unit 0 three copies, 1 and 2 two, 3 one
    split = (0.5, 0.62, 0.3, 1.0, 0.25, 0.38, 0.7, 0.25)
    m = UnitMap(4, src, split)
    y = grow_units(Load("w", (6, 4)), 1, m, coef=split, noise=0.02, noise_key="n", exact_sum=True)
    assert isinstance(y, ExactSplit)
    assert TensorProgram.from_json(_one_output_json(y)).outputs["o"].node.digest == y.digest
    base = evaluate(y, EvalContext(seed=3, loader=lambda n: xv))
    assert not torch.equal(base.to(sd).float(), base)  # the shares are not representable as they are
    ctx = EvalContext(seed=3, loader=lambda n: xv)
    ctx.storage_dtype = sd
    out = evaluate(y, ctx)
    assert torch.equal(out.to(sd).float(), out)
    for u in range(4):
        cols = [j for j, s in enumerate(src) if s == u]
        assert torch.equal(out[:, cols].double().sum(dim=1), xv[:, u].double()), u
    assert (out - base).abs().max() < 0.05  # the copies stay near the shares they were meant to hold
    ctx.storage_dtype = torch.float32
    assert torch.equal(evaluate(y, ctx), base)


def _one_output_json(node):
    p = TensorProgram()
    p.add("o", node)
    return p.to_json()
