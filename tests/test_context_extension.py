"""`extend context`: the config patch per method and its exactness, measured in fp32 logits on real
transformers models (a RoPE family: llama; learned position tables: gpt2, opt)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from families import FAMILIES  # noqa: E402
from scaler_wizard import api  # noqa: E402
from scaler_wizard.compiler import rope as R  # noqa: E402
from scaler_wizard.diagnostics import PlanError  # noqa: E402


def _grown(name: str, patch: dict, layers: int = 2):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = FAMILIES[name]()
    cfg_d = cfg.to_dict()
    torch.manual_seed(0)
    old = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    d = {k: v for k, v in {**cfg_d, **patch}.items() if k not in ("transformers_version", "architectures")}
    new_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    new = AutoModelForCausalLM.from_config(new_cfg, dtype=torch.float32).eval()
    return cfg_d, old, new


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load_same(old, new):
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in m for m in missing), (missing, unexpected)


@pytest.mark.parametrize("method", R.ROPE_EXTEND_METHODS)
def test_rope_extension_exact_where_the_maths_says(method):
    cfg_d = FAMILIES["llama"]().to_dict()
    ext = R.extend_rope(cfg_d, 128, method, rotary_pairs=8)
    _, old, new = _grown("llama", ext.patch)
    _load_same(old, new)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 32), generator=g)  # 32 = the original length
    drift = (_logits(old, ids) - _logits(new, ids)).abs().max().item()
    if ext.exact_below >= 32:
        assert drift == 0.0, f"{method}: declared unchanged below {ext.exact_below}, drift {drift}"
    else:
        assert drift > 1e-4, f"{method}: declared approx but nothing moved"
    # the longer context runs (positions past the old length)
    long_ids = torch.randint(0, 128, (1, 128), generator=g)
    out = _logits(new, long_ids)
    assert out.shape == (1, 128, 128) and torch.isfinite(out).all()


def test_rope_patch_fields_as_transformers_reads_them():
    cfg_d = FAMILIES["llama"]().to_dict()
    ext = R.extend_rope(cfg_d, 128, "yarn", {"beta_fast": 16})
    rp = ext.patch["rope_parameters"]
    assert rp["rope_type"] == "yarn" and rp["factor"] == 4.0 and rp["original_max_position_embeddings"] == 32
    assert rp["beta_fast"] == 16.0 and rp["rope_theta"] == cfg_d["rope_parameters"]["rope_theta"]
    assert ext.patch["max_position_embeddings"] == 128
    dyn = R.extend_rope(cfg_d, 128, "dynamic")
    assert "max_position_embeddings" not in dyn.patch and dyn.exact_below == 32


def test_rope_longrope_attention_factor_one_is_unchanged_below_old_length():
    cfg_d = FAMILIES["llama"]().to_dict()
    ext = R.extend_rope(cfg_d, 128, "longrope", {"attention_factor": 1.0}, rotary_pairs=8)
    assert ext.exact_below == 32
    _, old, new = _grown("llama", ext.patch)
    _load_same(old, new)
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(old, ids), _logits(new, ids))


@pytest.mark.parametrize("bad, message", [
    (dict(new_length=16), "does not extend"),
    (dict(method="ntk"), "unknown extension method"),
    (dict(options={"beta": 1}), "takes no option `beta`"),
    (dict(method="llama3", options={"low_freq_factor": 4, "high_freq_factor": 1}), "greater than"),
    (dict(method="yarn", options={"beta_fast": "x"}), "must be a number"),
    (dict(method="longrope", options={"attention_factor": 0}), r"must be a number > 0"),  # cos/sin x 0
    (dict(method="yarn", options={"attention_factor": 0.0}), r"must be a number > 0"),
])
def test_rope_extension_refusals(bad, message):
    cfg_d = FAMILIES["llama"]().to_dict()
    kw = dict(new_length=128, method="yarn", options=None) | bad
    with pytest.raises(R.ExtendError, match=message):
        R.extend_rope(cfg_d, kw["new_length"], kw["method"], kw["options"], rotary_pairs=8)


def test_rope_extension_refuses_an_already_scaled_rope():
    cfg_d = FAMILIES["llama"]().to_dict()
    cfg_d["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(R.ExtendError, match="already scaled"):
        R.extend_rope(cfg_d, 128, "yarn")


def _position_table(model):
    vocab = model.get_input_embeddings()
    emb = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m is not vocab]
    assert len(emb) == 1
    return emb[0]


@pytest.mark.parametrize("family, offset", [("gpt2", 0), ("opt", 2)])
@pytest.mark.parametrize("method", R.TABLE_EXTEND_METHODS)
def test_learned_table_extension(family, offset, method):
    cfg_d = FAMILIES[family]().to_dict()
    ext = R.extend_table(cfg_d, 96, method)
    _, old, new = _grown(family, ext.patch)
    sd = old.state_dict()
    old_t = _position_table(old).weight
    name = next(k for k, v in sd.items() if v is old_t or (v.data_ptr() == old_t.data_ptr()))
    sd[name] = R.grow_table_rows(old_t.detach(), _position_table(new).weight.shape[0], method, offset)
    new.load_state_dict(sd, strict=True)
    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    drift = (_logits(old, ids) - _logits(new, ids)).abs().max().item()
    if ext.exact_below >= 32:
        assert drift == 0.0
    else:
        assert drift > 1e-4
    out = _logits(new, torch.randint(3, 128, (1, 96)))
    assert out.shape[1] == 96 and torch.isfinite(out).all()


def test_table_row_map():
    assert R.table_row_map(4, 7, "copy") == [(0, 0, 0.0), (1, 1, 0.0), (2, 2, 0.0), (3, 3, 0.0),
                                             (0, 0, 0.0), (1, 1, 0.0), (2, 2, 0.0)]
    rows = R.table_row_map(2 + 3, 2 + 5, "interpolate", offset=2)
    assert rows[:2] == [(0, 0, 0.0), (1, 1, 0.0)]
    assert rows[2] == (2, 3, 0.0) and rows[-1][0] + rows[-1][2] == 4  # last position -> last old row


# ------------------------------------------------------------------------ the statement, end to end
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from families import build_model

    root = tmp_path_factory.mktemp("ctx")
    out = {}
    for fam in ("llama", "gpt2", "opt"):
        _, m = build_model(fam)
        m.save_pretrained(root / fam)
        out[fam] = root / fam
    return out


@pytest.mark.slow  # one apply + verification each
@pytest.mark.parametrize("family, plan, exactness, key, value", [
    ("llama", "extend context to 128 dynamic", "exact", "max_position_embeddings", 32),
    ("llama", "extend context to 128 yarn beta_fast=16", "approx", "max_position_embeddings", 128),
    ("gpt2", "extend context to 96 copy", "exact", "n_positions", 96),
    ("opt", "extend context to 96 interpolate", "approx", "max_position_embeddings", 96),
])
def test_extend_context_apply(saved, tmp_path, family, plan, exactness, key, value):
    import json

    res = api.apply(plan, str(saved[family]), out=str(tmp_path / "o"), progress=False)
    assert res["exactness"] == exactness
    ver = res["verification"]
    assert ver["passed"], ver
    if exactness == "exact":
        assert ver["judged"] and ver["max_rel"] <= 1e-5
    else:
        assert ver["judged"] is False and ver["max_rel"] > 1e-4  # drift measured and reported
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg[key] == value


@pytest.mark.parametrize("family, plan, needle", [
    ("llama", "extend context to 16", "does not extend"),
    ("llama", "extend context to 128 copy", "learned position table"),
    ("gpt2", "extend context to 96 yarn", "rescales RoPE"),
    ("llama", "extend context to 128 llama3 beta_fast=2", "takes no option `beta_fast`"),
    ("llama", "extend context to 64\nextend context to 128", "twice"),
])
def test_extend_context_refusals(saved, family, plan, needle):
    with pytest.raises(PlanError) as e:
        api.check(plan, str(saved[family]))
    text = str(e.value) + " ".join(d.message for d in e.value.diagnostics)
    assert "SW332" in text and needle in text, text
