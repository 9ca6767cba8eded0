"""Runtime verify on real tiny Llama models (fp32, CPU)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scaler_wizard.runtime.verify import (
    compare_logits, compare_models, kv_decode_logits, padded_batch, save_and_reload, symmetry_check,
)


def tiny_llama(seed=0, ffn=32, vocab=128, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def full_logits(m, ids, **kw):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False, **kw).logits


def widen_ffn_x2(m, noise_std=0.0, seed=0):
    """net2net FFN x2 built by hand: gate/up rows tiled, down columns tiled and halved, optional
    zero-sum noise on the down columns (+n on the first copy, -n on the second)."""
    f = m.config.intermediate_size
    g = tiny_llama(ffn=2 * f, layers=m.config.num_hidden_layers)
    sd = m.state_dict()
    new = {}
    gen = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if k.endswith(("gate_proj.weight", "up_proj.weight")):
            new[k] = torch.cat([v, v], 0)
        elif k.endswith("down_proj.weight"):
            n = torch.randn(v.shape, generator=gen) * noise_std
            new[k] = torch.cat([v / 2 + n, v / 2 - n], 1)
        else:
            new[k] = v.clone()
    g.load_state_dict(new)
    return g.eval()


def test_model_against_itself_passes_with_zero_diff(model):
    rep = compare_models(model, model, seed=1)
    names = [c.name for c in rep.checks]
    assert names == ["random_ids", "padding_right", "padding_left", "kv_cache_vs_full", "kv_cache_vs_original"]
    assert rep.passed
    for n in ("random_ids", "padding_right", "padding_left"):
        assert rep.check(n).max_abs == 0.0 and rep.check(n).mean_kl == 0.0
    assert rep.check("kv_cache_vs_full").max_rel < 1e-5
    assert "PASS" in rep.summary() and rep.to_dict()["passed"] is True


def test_perturbed_copy_fails_with_the_right_figures(model):
    bad = copy.deepcopy(model)
    s = 0.01
    with torch.no_grad():
        bad.lm_head.weight.mul_(1 + s)  # every logit scaled by 1.01
    rep = compare_models(bad, model, n_random=3, seq_len=16, check_padding=False, check_kv=False)
    c = rep.check("random_ids")
    assert not rep.passed and not c.passed
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    lo = full_logits(model, ids).double()
    assert c.max_logit == pytest.approx(lo.abs().max().item(), rel=1e-6)
    assert c.max_rel == pytest.approx(s, rel=1e-3)
    assert c.max_abs == pytest.approx(s * lo.abs().max().item(), rel=1e-3)
    lpo, lpg = torch.log_softmax(lo, -1), torch.log_softmax(lo * (1 + s), -1)
    kl = (lpo.exp() * (lpo - lpg)).sum(-1).mean().item()
    assert c.mean_kl == pytest.approx(kl, rel=1e-2)


def test_exact_growth_passes_and_vocab_growth_is_compared_on_the_old_slice(model):
    grown = widen_ffn_x2(model)
    rep = compare_models(grown, model)
    assert rep.passed, rep.summary()
    assert 0 < rep.max_abs  # re-associated sums: not bit-identical, but within tolerance

    big = tiny_llama(vocab=160)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.full((32, 32), -0.5)], 0)
    big.load_state_dict(sd)
    rep = compare_models(big, model)
    assert rep.vocab_compared == 128 and rep.vocab_grown == 160 and rep.passed, rep.summary()
    assert any("vocabulary" in n for n in rep.notes)


def test_kv_cache_decode_equals_full_forward(model):
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    kv = kv_decode_logits(model, ids, prefill=5)
    full = full_logits(model, ids)
    assert kv.shape == full.shape
    c = compare_logits("kv", kv, full)
    assert c.passed and c.max_rel < 1e-5


def test_padding_mask_path_matches_unpadded_sequences(model):
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(4))
    lengths = [12, 9, 5]
    for side in ("right", "left"):
        pids, mask, pos = padded_batch(ids, lengths, side, pad_id=7)
        out = full_logits(model, pids, attention_mask=mask, position_ids=pos)
        for b, L in enumerate(lengths):
            alone = full_logits(model, ids[b:b + 1, :L])[0]
            real = out[b][mask[b].bool()]
            assert real.shape == alone.shape
            assert compare_logits("pad", real[None], alone[None]).passed, side
    # a grown model whose difference only shows at padded positions would pass: pads are not compared
    rep = compare_models(model, model, n_random=3, seq_len=12, pad_len=12, check_kv=False)
    assert rep.check("padding_left").n_positions == sum([10, 8])  # random rows 2 and 3, cut shorter
    assert rep.check("padding_right").n_positions == sum([10, 8])
    rep = compare_models(model, model, n_random=3, seq_len=12, pad_len=6, check_kv=False)  # a forward of its own
    assert rep.check("padding_left").n_positions == sum([5, 4])
    # default: as wide as the random ids, in their forward; each check judged at its own rows only
    rep = compare_models(model, model, n_random=3, seq_len=12, check_kv=False)
    assert rep.check("padding_left").n_positions == sum([10, 8])
    assert rep.check("random_ids").n_positions == 3 * 12


def test_texts_are_tokenised_and_compared(model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    rep = compare_models(widen_ffn_x2(model), model, texts=["w1 w2 w3 w4", "w9 w8 hello w7"], tokenizer=tok,
                         n_random=0)
    c = rep.check("texts")
    assert c.n_positions == 8 and c.passed


def test_save_and_reload_round_trip(model):
    r = save_and_reload(widen_ffn_x2(model))
    assert r.passed and r.max_abs == 0.0


def _ffn_copy_groups(m, f):
    groups = []
    for i in range(m.config.num_hidden_layers):
        for proj in ("gate_proj", "up_proj"):
            w = f"model.layers.{i}.mlp.{proj}.weight"
            groups.append([(w, 0, 0, f), (w, 0, f, 2 * f)])
    return groups


def test_symmetry_check_detects_copies_that_stay_identical(model):
    f = model.config.intermediate_size
    equal = widen_ffn_x2(model)
    rep = symmetry_check(equal, _ffn_copy_groups(equal, f), steps=2, optimizer="sgd", lr=0.1)
    assert all(g.initially_equal for g in rep.groups)
    assert not rep.passed and all(not g.broken for g in rep.groups)
    with pytest.raises(AssertionError, match="still identical"):
        rep.assert_broken()

    noisy = widen_ffn_x2(model, noise_std=0.02)
    assert compare_models(noisy, model, n_random=2, seq_len=8).passed  # zero-sum noise keeps the function
    for opt in ("sgd", "adamw"):
        rep = symmetry_check(noisy, _ffn_copy_groups(noisy, f), steps=1, optimizer=opt, lr=0.1)
        assert all(g.initially_equal for g in rep.groups)
        assert rep.passed, rep.to_dict()
        rep.assert_broken()
    # the passed model was not trained
    assert torch.equal(noisy.model.layers[0].mlp.gate_proj.weight[:f], noisy.model.layers[0].mlp.gate_proj.weight[f:])
