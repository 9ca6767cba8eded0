"""Executor over a real sharded tiny Llama checkpoint."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from scaler_wizard.compiler.program import (
    Cast, Concat, Load, MulAxis, ProgramError, Random, Scale, Slice, TensorProgram, Tile, Zeros,
)
from scaler_wizard.runtime.checkpoint import (
    CheckpointError, OutputExistsError, TensorNotFoundError, UnsafeOutputError, open_checkpoint,
)
from scaler_wizard.runtime.execute import execute


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def save_tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(d)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("ex")
    m = tiny_llama()
    m.save_pretrained(base / "in", max_shard_size="20KB")
    save_tokenizer(base / "in")
    mb = tiny_llama(torch.bfloat16, seed=1)
    mb.save_pretrained(base / "bf16", max_shard_size="20KB")
    return base, m, mb


def identity(reader):
    p = TensorProgram()
    for n in reader.names():
        p.copy_through(n, reader.shape(n), reader.dtype(n))
    return p


def load_all(d):
    d = Path(d)
    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_identity_program_gives_identical_model(ckpt, tmp_path):
    base, m, _ = ckpt
    r = open_checkpoint(base / "in")
    rep = execute(identity(r), r, tmp_path / "out", shard_size="20KB", progress=False)
    assert rep.n_outputs == len(r.names()) and rep.n_shards > 2
    out = tmp_path / "out"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json",
              "model.safetensors.index.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32
    m2 = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(m, ids), logits(m2, ids))
    # input untouched
    assert sorted(p.name for p in (base / "in").iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
         "tokenizer_config.json"] + [p.name for p in (base / "in").glob("model-*.safetensors")])


def test_bf16_stays_bf16_and_dtype_override(ckpt, tmp_path):
    base, _, mb = ckpt
    r = open_checkpoint(base / "bf16")
    execute(identity(r), r, tmp_path / "o1", progress=False)
    t = load_all(tmp_path / "o1")
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    sd = mb.state_dict()
    assert all(torch.equal(t[k], sd[k]) for k in sd)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "o1")
    assert m2.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (1, 8))
    # (compare with the input loaded the same way: a module cast with .to(bf16) also casts rotary buffers)
    m_in = AutoModelForCausalLM.from_pretrained(base / "bf16")
    assert torch.equal(logits(m_in, ids), logits(m2, ids))
    rep = execute(identity(r), r, tmp_path / "o2", dtype="float32", progress=False)
    t2 = load_all(tmp_path / "o2")
    assert all(v.dtype == torch.float32 for v in t2.values()) and rep.dtypes == {"float32": len(sd)}
    assert torch.equal(t2["model.norm.weight"], sd["model.norm.weight"].float())
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["dtype"] == "float32"


def test_tile_concat_new_zero_tensor(ckpt, tmp_path):
    base, m, _ = ckpt
    r = open_checkpoint(base / "in")
    sd = m.state_dict()
    up = "model.layers.0.mlp.up_proj.weight"   # [64, 32]
    down = "model.layers.0.mlp.down_proj.weight"  # [32, 64]
    emb = "model.embed_tokens.weight"  # [128, 32]
    p = TensorProgram(config_patch={"note": "grown"})
    p.add(up, Tile(Load(up, (64, 32)), 0, 2), status="grown", original_region=[[0, 64], [0, 32]])
    p.add(down, Scale(Tile(Load(down, (32, 64)), 1, 2), 0.5))
    p.add("extra.zero", Zeros((7, 3)))
    p.add(emb, Concat((Load(emb, (128, 32)), MulAxis(Slice(Load(emb, (128, 32)), 0, 0, 4), 1, tuple([2.0] * 32))), 0))
    p.add("model.norm.weight", Cast(Load("model.norm.weight", (32,)), "bfloat16"))
    rep = execute(p, r, tmp_path / "out", progress=False)
    out = load_all(tmp_path / "out")
    assert set(out) == {up, down, "extra.zero", emb, "model.norm.weight"}
    assert torch.equal(out[up], torch.cat([sd[up], sd[up]], 0))
    assert torch.equal(out[down], torch.cat([sd[down], sd[down]], 1) * 0.5)
    assert torch.equal(out["extra.zero"], torch.zeros(7, 3)) and out["extra.zero"].dtype == torch.float32
    assert torch.equal(out[emb], torch.cat([sd[emb], sd[emb][:4] * 2.0], 0))
    assert out["model.norm.weight"].dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["note"] == "grown" and cfg["hidden_size"] == 32
    assert rep.input_reads == 4  # emb loaded once although used twice; each other Load once
    assert rep.nodes_computed == len(p.nodes())


def test_random_values_byte_identical_across_output_orders(ckpt, tmp_path):
    base, _, _ = ckpt
    r = open_checkpoint(base / "in")
    specs = [(f"new.{i}", Random((33, 17), key=f"new.{i}", std=0.02)) for i in range(4)]
    p1, p2 = TensorProgram(seed=11), TensorProgram(seed=11)
    for n, node in specs:
        p1.add(n, node)
    for n, node in reversed(specs):
        p2.add(n, node)
    execute(p1, r, tmp_path / "a", shard_size=3000, progress=False)
    execute(p2, r, tmp_path / "b", shard_size=3000, progress=False)
    a, b = load_all(tmp_path / "a"), load_all(tmp_path / "b")
    for n, _ in specs:
        assert a[n].dtype == torch.float32  # no input: the checkpoint's main dtype
        assert a[n].numpy().tobytes() == b[n].numpy().tobytes()
    assert not torch.equal(a["new.0"], a["new.1"])


def test_failure_midway_leaves_no_output_and_no_temp(ckpt, tmp_path):
    base, _, _ = ckpt
    src = tmp_path / "src"
    shutil.copytree(base / "in", src)
    r = open_checkpoint(src)
    p = identity(r)  # output order = file order: the last shard is read last
    last = sorted(src.glob("model-*.safetensors"))[-1]
    last.unlink()  # disappears after the headers were read: the executor fails on its last shard
    with pytest.raises(CheckpointError, match=last.name):
        execute(p, r, tmp_path / "out", shard_size="20KB", progress=False)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["src"]


def test_overwrite_refused_without_force_and_inside_input(ckpt, tmp_path):
    base, _, _ = ckpt
    r = open_checkpoint(base / "in")
    p = identity(r)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        execute(p, r, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "old.txt").read_text() == "old"
    with pytest.raises(OutputExistsError, match="not a model directory"):  # --force replaces model dirs only
        execute(p, r, tmp_path / "out", force=True, progress=False)
    (tmp_path / "out" / "config.json").write_text("{}")
    execute(p, r, tmp_path / "out", force=True, progress=False)
    assert not (tmp_path / "out" / "old.txt").exists()
    with pytest.raises(UnsafeOutputError):
        execute(p, r, base / "in" / "grown", progress=False)
    assert not (base / "in" / "grown").exists()


def test_program_checked_against_checkpoint(ckpt, tmp_path):
    base, _, _ = ckpt
    r = open_checkpoint(base / "in")
    p = TensorProgram()
    p.add("x", Load("model.norm.weight", (33,)))
    with pytest.raises(ProgramError, match="model.norm.weight"):
        execute(p, r, tmp_path / "o", progress=False)
    q = TensorProgram()
    q.add("x", Load("no.such.tensor", (3,)))
    with pytest.raises(TensorNotFoundError, match="no.such.tensor"):
        execute(q, r, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_memory_is_freed_at_last_use(ckpt, tmp_path, monkeypatch):
    """Held bytes stay within the writer's queue plus one output's working set. The queue (outputs
    handed to the write-behind thread, across shard boundaries) is capped at (SLABS - 1) * SLAB_BYTES:
    here one 16 KiB output."""
    from scaler_wizard.runtime import tiles

    monkeypatch.setattr(tiles, "SLAB_BYTES", 16384)
    monkeypatch.setattr(tiles, "SLABS", 2)
    base, _, _ = ckpt
    r = open_checkpoint(base / "in")
    p = TensorProgram()
    emb = "model.embed_tokens.weight"
    for i in range(12):  # 12 outputs of 16 KiB each (fp32 [128,32]), each from a chain of ops
        p.add(f"o{i}", Scale(Tile(Slice(Load(emb, (128, 32)), 0, 0, 64), 0, 2), float(i + 1)))
    rep = execute(p, r, tmp_path / "o", shard_size=40_000, progress=False)
    assert rep.n_shards == 6 and rep.largest_shard_bytes == 2 * 16384
    # one queued output + the output just computed + the loaded input + one intermediate (16 KiB each)
    assert rep.peak_held_bytes <= 4 * 16384
    assert rep.input_reads == 6  # one load per shard, shared by both outputs in it


def test_card_written(ckpt, tmp_path):
    from scaler_wizard.runtime.card import card_info

    base, _, _ = ckpt
    r = open_checkpoint(base / "in")
    p = identity(r)
    p.config_patch["num_hidden_layers"] = 2
    info = card_info(p, r, plan_text="widen ffn x2 net2net", verification={"passed": True, "max_abs": 0.0})
    execute(p, r, tmp_path / "o", card=info, progress=False)
    text = (tmp_path / "o" / "README.md").read_text()
    assert "widen ffn x2 net2net" in text and "## Verification" in text and "## Parameters" in text


def test_mixed_dtype_execution_is_bit_identical_to_fp32_evaluation(tmp_path):
    """Value-moving ops run in the input dtype and output concats cast their pieces first: the
    written bf16 bytes must equal an all-fp32 evaluation of the same program cast at the end (fan-out
    splits, ExactSplit, rounded against the bf16 the outputs are stored in, as the executor does)."""
    import glob

    from safetensors.torch import load_file

    from scaler_wizard import api
    from scaler_wizard.compiler.program import EvalContext, evaluate

    src = tmp_path / "bf16"
    tiny_llama(dtype=torch.bfloat16).save_pretrained(src)
    reader = open_checkpoint(src)
    prog = api.compile("widen ffn x2 net2net\nwiden hidden to 80 lemon\ninsert layer 1 identity", str(src))
    execute(prog, reader, tmp_path / "out", progress=False)
    out = {}
    for f in glob.glob(str(tmp_path / "out" / "*.safetensors")):
        out.update(load_file(f))
    ctx = EvalContext(seed=prog.seed, loader=lambda n: reader.get(n).float())
    ctx.storage_dtype = torch.bfloat16
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    for name, o in prog.outputs.items():
        assert torch.equal(evaluate(o.node, ctx).to(torch.bfloat16), out[name]), name


@pytest.mark.parametrize("in_kernel", [True, False])
def test_unchanged_tensors_are_byte_copies(ckpt, tmp_path, monkeypatch, in_kernel):
    """Outputs that are stored tensors unchanged bypass torch (copy_file_range, or the buffered
    fallback a file system without it gets) and give the same files as the torch path; an output
    cast to another dtype goes through torch."""
    import scaler_wizard.runtime.io.writer as ck  # where the copy_file_range switch lives

    if not in_kernel:
        monkeypatch.setattr(ck, "_COPY_FILE_RANGE", [False])
    base, _, mb = ckpt
    r = open_checkpoint(base / "bf16")
    p = identity(r)
    emb = "model.embed_tokens.weight"
    p.add("extra", Scale(Load(emb, r.shape(emb)), 2.0))  # the embedding now feeds a computed output too
    p.add("as_f32", Cast(Load("lm_head.weight", r.shape("lm_head.weight")), "float32"))
    fast = execute(p, r, tmp_path / "fast", shard_size="20KB", progress=False)
    slow = execute(p, r, tmp_path / "slow", shard_size="20KB", progress=False, bytes_through_torch=True)
    # every stored tensor (the embedding too unless "extra" lands in its shard); never the cast one
    assert len(r.names()) - 1 <= fast.byte_copies <= len(r.names())
    assert slow.byte_copies == 0
    assert fast.bytes_read == slow.bytes_read
    files = sorted(x.name for x in (tmp_path / "fast").glob("*.safetensors"))
    assert files == sorted(x.name for x in (tmp_path / "slow").glob("*.safetensors")) and len(files) > 1
    for f in files:
        assert (tmp_path / "fast" / f).read_bytes() == (tmp_path / "slow" / f).read_bytes()
    out = load_all(tmp_path / "fast")
    for k, v in mb.state_dict().items():
        assert torch.equal(out[k], v), k
    assert out["as_f32"].dtype == torch.float32 and torch.equal(out["as_f32"], mb.lm_head.weight.float())
