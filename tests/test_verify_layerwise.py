"""Layer-by-layer verification (runtime/layerwise.py) against the whole-model forward, on the
tiny families saved as real safetensors directories (fp32, CPU)."""

import copy

import pytest
import torch

from families import FAMILIES, build_model
from scaler_wizard.runtime.layerwise import Job, LayerwiseModel
from scaler_wizard.runtime import layerwise
from scaler_wizard.runtime.verify import compare_models

@pytest.fixture(autouse=True)
def _products_as_the_model_computes_them(monkeypatch):
    """These tests hold the replay to the model's own forward bit for bit: its matrix products as
    ``linear`` computes them (test_layerwise_gemm.py covers the weight-major products)."""
    monkeypatch.setattr(layerwise, "WEIGHT_MAJOR_GEMM", False)


FAST = ["llama", "gemma2", "gpt2", "opt_postln", "mixtral", "bert", "qwen2"]


def _save(model, path):
    model.save_pretrained(str(path))
    return str(path)


def _noisy(model, std=1e-4, seed=1):
    g = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return g


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_layerwise_equals_whole_model(tmp_path, family):
    _, model = build_model(family)
    o = _save(model, tmp_path / "o")
    g = _save(_noisy(model), tmp_path / "g")  # differs, so the figures compared are not all zero
    lw = compare_models(g, o, n_random=3, seq_len=10, layerwise=True)
    whole = compare_models(g, o, n_random=3, seq_len=10, layerwise=False)
    assert [c.name for c in lw.checks] == [c.name for c in whole.checks]
    assert len(lw.checks) >= 4  # random ids, padding both sides, and KV cache or token types
    for a, b in zip(lw.checks, whole.checks):
        assert b.max_abs > 0 or a.name == "kv_cache_vs_full"
        assert a.max_abs == pytest.approx(b.max_abs, rel=1e-6, abs=1e-9), a.name
        assert a.max_logit == pytest.approx(b.max_logit, rel=1e-6), a.name
        assert a.mean_kl == pytest.approx(b.mean_kl, rel=1e-4, abs=1e-12), a.name
        assert a.n_positions == b.n_positions
    assert lw.notes == whole.notes


def test_layerwise_detects_a_broken_layer_and_a_broken_head(tmp_path):
    _, model = build_model("llama")
    o = _save(model, tmp_path / "o")
    bad_layer = copy.deepcopy(model)
    with torch.no_grad():
        bad_layer.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    rep = compare_models(_save(bad_layer, tmp_path / "b1"), o, layerwise=True)
    assert not rep.passed and all(not rep.check(n).passed for n in ("random_ids", "padding_left", "kv_cache_vs_original"))
    assert rep.check("kv_cache_vs_full").passed  # the broken model still decodes consistently with itself

    s = 0.01
    bad_head = copy.deepcopy(model)
    with torch.no_grad():
        bad_head.lm_head.weight.mul_(1 + s)
    rep = compare_models(_save(bad_head, tmp_path / "b2"), o, layerwise=True)
    assert not rep.passed
    assert rep.check("random_ids").max_rel == pytest.approx(s, rel=1e-3)

    same = compare_models(o, o, layerwise=True)
    assert same.passed and same.check("random_ids").max_abs == 0.0


@pytest.mark.parametrize("read_ahead", [False, True])
def test_layerwise_reads_each_tensor_once_and_holds_one_layer(tmp_path, monkeypatch, read_ahead):
    """The memory bound, as a fact about what is materialised: at every load at most one decoder
    layer's parameters are real (and, reading the next layer ahead, one more layer's buffers
    exist), and the whole checkpoint is read exactly once."""
    _, model = build_model("llama")
    d = _save(model, tmp_path / "m")
    monkeypatch.setattr(LayerwiseModel, "READ_AHEAD_MAX_BYTES", (1 << 30) if read_ahead else 0)
    layers_held = 2 if read_ahead else 1
    lm = LayerwiseModel(d)
    layer_numel = sum(p.numel() for p in lm.layers[0].parameters())
    emb = lm.in_emb.weight.numel()
    rest = sum(p.numel() for n, p in model.named_parameters()
               if not n.startswith(("model.layers.", "model.embed_tokens", "lm_head")))
    peaks = []
    load = lm.load

    def spy(params, ready=None):
        out = load(params, ready)
        peaks.append(sum(p.numel() for p in lm.model.parameters() if p.device.type != "meta"))
        return out

    lm.load = spy
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    out = lm.run([Job("a", ids), Job("kv", ids, prefill=4)])
    assert max(peaks) <= layer_numel + emb + rest
    assert max(peaks) < sum(p.numel() for p in model.parameters()) / 2
    # every tensor is read once, except the input embedding: only the rows of the ids that occur
    emb_w = model.get_input_embeddings().weight
    unused_rows = emb_w.shape[0] - len(torch.unique(ids))
    assert not model.config.tie_word_embeddings
    assert lm.reader.bytes_read == lm.reader.total_bytes - unused_rows * emb_w.shape[1] * emb_w.element_size()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(out["a"], ref)
    assert (out["kv"] - ref).abs().max().item() < 1e-5
    assert all(p.device.type == "meta" for p in lm.model.parameters())  # everything released
    # the freed weights wait in the buffer pool for the next layer of the same shapes: at most one
    # layer's float32 buffers (two reading ahead; plus the embedding, the rest) and one
    # stored-dtype buffer per shape
    pooled = [t for ts in lm._pool.values() for t in ts]
    f32 = sum(t.numel() for t in pooled if t.dtype == torch.float32)
    assert pooled and f32 <= layers_held * layer_numel + emb + rest
    assert f32 > (layers_held - 1) * layer_numel
    assert len({t.data_ptr() for t in pooled}) == len(pooled)


def test_layerwise_requires_directories(tmp_path):
    _, model = build_model("llama")
    with pytest.raises(ValueError, match="directories"):
        compare_models(model, model, layerwise=True)


def test_layerwise_texts_and_grown_vocab_match_whole_model(tmp_path):
    """Texts (one batch per text) and a grown vocabulary (only the original slice compared)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    _, model = build_model("llama")
    o = _save(model, tmp_path / "o")
    big = _noisy(model)
    big.resize_token_embeddings(160)
    g = _save(big, tmp_path / "g")
    kw = dict(texts=["w1 w2 w3 w4", "w9 w8 hello w7 w3"], tokenizer=tok, n_random=2, seq_len=6)
    lw = compare_models(g, o, layerwise=True, **kw)
    whole = compare_models(g, o, layerwise=False, **kw)
    assert lw.vocab_grown == 160 and lw.vocab_compared == 128
    assert [c.name for c in lw.checks][-1] == "texts" and lw.check("texts").n_positions == 9
    for a, b in zip(lw.checks, whole.checks):
        assert a.name == b.name and a.max_abs == pytest.approx(b.max_abs, rel=1e-6, abs=1e-9)


def test_layerwise_embedding_and_head_in_chunks(tmp_path, monkeypatch):
    """With chunks of 4 rows, the LM head is never whole in memory (its parameter stays on the meta
    device) and is read once; the input embedding reads only the rows of the ids that occur; the
    logits are the model's."""
    _, model = build_model("gemma2")  # logit soft-capping after the head, scaled embedding
    d = _save(model, tmp_path / "m")
    lm = LayerwiseModel(d)
    monkeypatch.setattr(LayerwiseModel, "CHUNK_BYTES", 4 * 4 * lm.in_emb.weight.shape[1])
    chunks = []
    rows = lm._row_chunks

    def spy(param):
        for a, w in rows(param):
            assert lm.in_emb.weight.device.type == "meta"
            chunks.append(w.shape[0])
            yield a, w

    lm._row_chunks = spy
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    out = lm.run([Job("a", ids)])
    assert max(chunks) == 4 and sum(chunks) == 128  # every row of the head, 4 at a time
    # each stored tensor once, the tied embedding's used rows a second time (as the input embedding)
    used = len(torch.unique(ids))
    assert used < 128
    assert lm.reader.bytes_read == lm.reader.total_bytes + used * lm.in_emb.weight.shape[1] * 4
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    assert (out["a"] - ref).abs().max().item() < 1e-5


def test_layerwise_when_the_model_moves_ids_to_the_embedding_device(tmp_path):
    # Llama-4 embeds `input_ids.to(embed_tokens.weight.device)`: with the weight left on the meta
    # device the ids lost their values and layer 0 saw uninitialised memory (the model failed
    # verification against itself, differently on every run).
    from scaler_wizard import sweep
    from scaler_wizard.runtime.layerwise import run_layerwise
    from transformers import AutoModelForCausalLM

    sweep.build_tiny("llama4_text", tmp_path / "m")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    lw = run_layerwise(tmp_path / "m", [Job("a", ids)])["a"]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(lw, m(ids).logits)


def test_causal_lm_without_kv_cache_and_list_returning_blocks(tmp_path):
    # OpenAI GPT: a causal LM whose forward takes no cache and whose Block returns a list. The
    # layer-wise runner took only tuples apart (a list reached the next layer as its input) and the
    # verifier asked for a cache the model does not have: every plan's output "did not run".
    from scaler_wizard import sweep
    from scaler_wizard.runtime.layerwise import run_layerwise
    from transformers import AutoModelForCausalLM

    sweep.build_tiny("openai-gpt", tmp_path / "m")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    lw = run_layerwise(tmp_path / "m", [Job("a", ids)])["a"]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(lw, m(ids).logits)
    rep = compare_models(str(tmp_path / "m"), str(tmp_path / "m"), n_random=2, seq_len=8)
    assert rep.passed and {c.name for c in rep.checks} == {"random_ids", "padding_right", "padding_left"}
    assert any("has no KV cache" in n for n in rep.notes)
    noisy = _save(_noisy(m), tmp_path / "g")
    assert not compare_models(noisy, str(tmp_path / "m"), n_random=2, seq_len=8, rtol=1e-9).passed


def test_layerwise_reads_narrow_dtypes_into_pooled_buffers(tmp_path):
    # bf16 / fp16 checkpoints: each tensor is read with pread into a pooled buffer of its stored
    # dtype and converted into a pooled float32 buffer; the logits equal the whole-model path's
    # (from_pretrained in float32) bit for bit, and a second run of the same model reuses the pool.
    _, model = build_model("llama")
    for dtype in (torch.bfloat16, torch.float16):
        d = tmp_path / str(dtype)
        copy.deepcopy(model).to(dtype).save_pretrained(str(d))
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
        lm = LayerwiseModel(d)
        first = lm.run([Job("a", ids)])["a"]
        kept = {t.data_ptr() for ts in lm._pool.values() for t in ts}
        again = lm.run([Job("a", ids)])["a"]
        assert {t.data_ptr() for ts in lm._pool.values() for t in ts} == kept  # no new buffers
        assert {t.dtype for ts in lm._pool.values() for t in ts} == {torch.float32, dtype}
        from transformers import AutoModelForCausalLM

        whole = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        with torch.no_grad():
            ref = whole(input_ids=ids, use_cache=False).logits
        assert torch.equal(first, ref) and torch.equal(again, ref)



def test_hybrid_with_linear_attention_cache_layers(tmp_path):
    # Qwen3-Next: gated-delta (linear attention) layers beside softmax attention; their cache layers
    # hold a recurrent state, not positions. The stand-in cache of the recording pass called
    # `update` on every layer ('LinearAttentionLayer' object has no attribute 'update'): every
    # hybrid's output "did not run". Now the layer-wise logits are the model's own, KV decoding included.
    from scaler_wizard import sweep
    from scaler_wizard.runtime.layerwise import run_layerwise
    from transformers import AutoModelForCausalLM

    sweep.build_tiny("qwen3_next", tmp_path / "m")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    lw = run_layerwise(tmp_path / "m", [Job("a", ids), Job("kv", ids, prefill=5, steps=2)])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
    assert torch.equal(lw["a"], ref)
    assert (lw["kv"] - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    rep = compare_models(str(tmp_path / "m"), str(tmp_path / "m"), n_random=2, seq_len=10)
    assert rep.passed and {"kv_cache_vs_full", "kv_cache_vs_original"} <= {c.name for c in rep.checks}


def test_layer_to_layer_state_falls_back_to_the_whole_model(tmp_path):
    # ZAYA passes router states from layer to layer besides the hidden states: the layer-by-layer
    # replay cannot feed them (it failed even for the model against itself). The whole-model
    # forward decides, with a note; a grown copy with a broken weight still fails.
    from scaler_wizard import sweep

    sweep.build_tiny("zaya", tmp_path / "m")
    rep = compare_models(str(tmp_path / "m"), str(tmp_path / "m"), n_random=2, seq_len=8)
    assert rep.passed and any("verified whole in memory" in n for n in rep.notes), rep.notes
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        m.lm_head.weight[:, 0] += 0.5
    bad = _save(m, tmp_path / "bad")
    assert not compare_models(bad, str(tmp_path / "m"), n_random=2, seq_len=8).passed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_in_small_chunks_gives_the_same_logits(tmp_path, monkeypatch, dtype):
    """The LM head is read chunk by chunk into two reused buffers (stored bytes, float32): chunks of
    7 rows with a shorter last one give the logits of one chunk (to float32 rounding: BLAS sums a
    7-row product in another order), in float32 and bfloat16 storage."""
    _, model = build_model("llama")
    model.to(dtype).save_pretrained(str(tmp_path / "m"))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    outs = []
    for chunk in (LayerwiseModel.CHUNK_BYTES, 7 * 4 * model.config.hidden_size):
        monkeypatch.setattr(LayerwiseModel, "CHUNK_BYTES", chunk)
        lm = LayerwiseModel(tmp_path / "m")
        try:
            outs.append(lm.run([Job("a", ids)])["a"])
            assert lm.reader.bytes_read <= lm.reader.total_bytes
        finally:
            lm.close()
    assert model.config.vocab_size % 7 != 0  # the last chunk is shorter
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
