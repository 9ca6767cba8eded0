"""Checkpoint reader/writer on real safetensors files written by transformers."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scaler_wizard.runtime.checkpoint import (
    CheckpointError, CheckpointWriter, CorruptCheckpointError, MissingConfigError, MissingShardError,
    OutputExistsError, PickleRefusedError, TensorNotFoundError, UnsafeOutputError, open_checkpoint,
    parse_size, plan_shards, read_safetensors_header,
)


def tiny_llama(tie=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "sharded"
    m = tiny_llama()
    m.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file()
    return d, m


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


def test_reader_headers_without_reading(sharded):
    d, m = sharded
    r = open_checkpoint(d)
    sd = m.state_dict()
    assert r.format == "safetensors"
    assert set(r.names()) == set(sd)
    for n, t in sd.items():
        assert r.shape(n) == tuple(t.shape) and r.dtype(n) == "float32"
    assert r.reads == 0  # everything above came from headers
    assert len({r.info(n).file for n in r.names()}) > 2
    t = r.get("model.layers.1.mlp.up_proj.weight")
    assert torch.equal(t, sd["model.layers.1.mlp.up_proj.weight"])
    assert r.reads == 1 and r.bytes_read == t.numel() * 4
    assert r.tied == {}
    with pytest.raises(TensorNotFoundError, match="did you mean"):
        r.get("model.layers.1.mlp.up_proj.weigth")


def test_tied_weights(tmp_path):
    m = tiny_llama(tie=True)
    m.save_pretrained(tmp_path / "t")
    r = open_checkpoint(tmp_path / "t")
    assert "lm_head.weight" not in r.names()
    assert r.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" in r
    assert torch.equal(r.get("lm_head.weight"), m.model.embed_tokens.weight)


def test_truncated_shard_names_the_file(sharded, tmp_path):
    d = copy_dir(sharded[0], tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match=shard.name) as e:
        open_checkpoint(d)
    assert "truncated" in str(e.value)


def test_corrupt_header_names_the_file(sharded, tmp_path):
    d = copy_dir(sharded[0], tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{{"  # garbage in the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        open_checkpoint(d)
    shard.write_bytes(b"\x01\x02")  # shorter than the header length field
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        read_safetensors_header(shard)


def test_missing_shard_named(sharded, tmp_path):
    d = copy_dir(sharded[0], tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(MissingShardError, match=shard.name):
        open_checkpoint(d)


def test_missing_config(sharded, tmp_path):
    d = copy_dir(sharded[0], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(MissingConfigError, match="config.json"):
        open_checkpoint(d)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nowhere")


def test_bin_refused_without_flag(tmp_path):
    m = tiny_llama()
    d = tmp_path / "bin"
    d.mkdir()
    m.config.save_pretrained(d)
    torch.save(m.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="--allow-bin"):
        open_checkpoint(d)
    r = open_checkpoint(d, allow_pickle=True)
    assert r.format == "bin"
    assert torch.equal(r.get("model.norm.weight"), m.model.norm.weight)


def test_writer_shards_index_and_atomic_commit(tmp_path):
    out = tmp_path / "out"
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    with CheckpointWriter(out, max_shard_size=1000) as w:
        for n, t in tensors.items():
            w.add(n, t)
        assert not out.exists()  # nothing visible before commit
        w.write_config({"model_type": "llama"})
        w.commit()
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == 2000
    assert idx["weight_map"]["t0"] == "model-00001-of-00003.safetensors"
    assert idx["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    infos, meta = read_safetensors_header(out / "model-00002-of-00003.safetensors")
    assert set(infos) == {"t2", "t3"} and meta == {"format": "pt"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir gone


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, max_shard_size=100) as w:
            w.add("a", torch.zeros(50))
            w.add("b", torch.zeros(50))  # flushes shard 1 to the temp dir
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_overwrite_and_input_dirs(tmp_path, sharded):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        CheckpointWriter(out)
    with pytest.raises(OutputExistsError, match="not a model directory"):  # --force replaces model dirs only
        CheckpointWriter(out, force=True)
    (out / "config.json").write_text("{}")
    with CheckpointWriter(out, force=True) as w:
        w.add("a", torch.ones(3))
        w.commit()
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    src = sharded[0]
    with pytest.raises(UnsafeOutputError, match="into the input"):
        CheckpointWriter(src / "grown", input_path=src)
    with pytest.raises(UnsafeOutputError):
        CheckpointWriter(src, input_path=src, force=True)
    with pytest.raises(UnsafeOutputError, match="contains the input"):
        CheckpointWriter(src.parent, input_path=src, force=True)
    assert (src / "config.json").is_file()


def test_plan_shards_and_sizes():
    assert plan_shards([("a", 5), ("b", 5), ("c", 20), ("d", 1)], 10) == [["a", "b"], ["c"], ["d"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7


@pytest.mark.slow
def test_gguf_reader_dequantises_with_hf_names(tmp_path):
    # The package is located, not imported: its __init__ needs the `llm` CLI, which is not installed.
    from scaler_wizard.ir.config import resolve_short_name

    gguf = resolve_short_name("SmolLM2-135M")
    assert gguf is not None and gguf.suffix == ".gguf"
    # opened once, by its short name (transformers' GGUF loading takes ~30 s here: it parses the file twice)
    r = open_checkpoint("SmolLM2-135M")
    assert r.path == gguf  # the short name opens the file it resolves to
    assert r.format == "gguf"
    assert "model.embed_tokens.weight" in r.names()
    assert r.config["model_type"] == "llama"
    assert "quantization_config" not in r.config  # what is written from a dequantised GGUF is plain
    t = r.get("model.layers.0.self_attn.q_proj.weight")
    assert t.dtype == torch.float32 and t.shape == (576, 576)
    if r.config.get("tie_word_embeddings"):
        assert "lm_head.weight" not in r.names() and "lm_head.weight" in r
    with CheckpointWriter(tmp_path / "o") as w:
        names = r.save_tokenizer(w.dir)
        w.add("x", torch.zeros(1))
        w.commit()
    assert "tokenizer.json" in names or "tokenizer_config.json" in names


def test_virtual_tensors_from_transformers_converters(tmp_path):
    """Mixtral is saved in the legacy per-expert layout (block_sparse_moe.experts.E.w1/w2/w3); the
    reader exposes the in-memory stacked names through transformers' conversion table: shapes from
    headers alone, data built from just the source tensors, experts in natural order (10 after 9)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=8, vocab_size=64, num_local_experts=11,
                        num_experts_per_tok=2, tie_word_embeddings=False)
    m = MixtralForCausalLM(cfg).eval()
    d = tmp_path / "mixtral"
    m.save_pretrained(d, max_shard_size="20KB")  # sources spread over several shard files
    r = open_checkpoint(d)
    stored = set(r.names())
    assert "model.layers.1.block_sparse_moe.experts.10.w3.weight" in stored  # really the legacy layout
    sd = m.state_dict()
    gu, down = "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"
    assert gu not in stored and gu in r and down in r
    assert r.shape(gu) == (11, 48, 16) and r.shape(down) == (11, 16, 24) and r.dtype(gu) == "float32"
    assert r.aliases["model.layers.1.mlp.gate.weight"] == "model.layers.1.block_sparse_moe.gate.weight"
    assert not any(".experts.0." in a for a in r.aliases)  # consumed sources are not exposed as renames
    assert r.unconverted == []
    assert r.reads == 0  # every shape above came from headers
    vt = r.virtual[gu]
    assert len(vt.stored) == 22 and vt.stored[10].endswith("experts.10.w1.weight")
    assert len({r.info(n).file for n in vt.stored}) > 1
    t = r.get(gu)
    assert torch.equal(t, sd[gu])
    assert r.bytes_read == sum(r.info(n).nbytes for n in vt.stored)  # read its sources, nothing else
    for n, want in sd.items():  # every in-memory name resolves, with the loaded model's values
        assert n in r, n
        assert r.shape(n) == tuple(want.shape), n
        assert torch.equal(r.get(n), want), n


def test_write_behind_runs_calls_in_order_one_at_a_time_and_hands_errors_back():
    """WriteBehind: calls run in submission order in its thread, never two at once (the caller waits
    for the one in flight); a call's exception comes back from the next submit or drain, and the
    calls submitted after it are skipped."""
    import threading
    import time

    from scaler_wizard.runtime.io.writer import WriteBehind

    done, running, most = [], [0], [0]
    lock = threading.Lock()

    def call(i, fail=False):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        if fail:
            raise OSError(28, "No space left on device")
        done.append((i, threading.current_thread().name))

    wb = WriteBehind()
    try:
        for i in range(5):
            wb.submit(call, i)
        wb.drain()
        assert [i for i, _ in done] == list(range(5))
        assert {name for _, name in done} == {"scaler-wizard-write-behind"}
        assert most[0] == 1
        wb.submit(call, 5, True)
        try:  # accepted or refused, depending on whether the failure was seen yet; it never runs
            wb.submit(call, 6)
        except OSError:
            pass
        with pytest.raises(OSError, match="No space left"):
            wb.drain()
        with pytest.raises(OSError):
            wb.submit(call, 7)
        assert [i for i, _ in done] == list(range(5))
    finally:
        wb.close()
    assert not wb._thread.is_alive()


def test_recorded_interrupt_stops_the_commit_and_leaves_no_output(tmp_path):
    """An interrupt recorded by apply's SIGINT handler (and lost by Python inside a callback) still
    stops the output from landing: CheckpointWriter.commit raises KeyboardInterrupt, the temporary
    directory is removed and OUT never appears. The handler records a real SIGINT and is removed after."""
    import os
    import signal

    import torch

    from scaler_wizard import cli
    from scaler_wizard.runtime.io import writer as W

    out = tmp_path / "out"
    try:
        W.note_interrupt()
        with pytest.raises(KeyboardInterrupt):
            with W.CheckpointWriter(out) as w:
                w.add("a", torch.zeros(3))
                w.write_config({"model_type": "llama"})
                w.commit()
    finally:
        W.note_interrupt(False)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    # xdist workers run with SIGINT ignored: there the handler is left alone (as for a command started
    # in the background); with Python's default handler it is replaced, then restored
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert cli._record_interrupts() is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        restore = cli._record_interrupts()
        assert restore is not None
        try:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next statement
            with pytest.raises(KeyboardInterrupt):
                W.refuse_if_interrupted()
        finally:
            restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        W.refuse_if_interrupted()  # cleared
    finally:
        signal.signal(signal.SIGINT, outer)
