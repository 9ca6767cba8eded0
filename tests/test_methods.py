"""Growth methods as modules: the registry, typed options, the pass manager and ``--dump-after``,
the upcycle target table against transformers, and the README's method table."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaler_wizard.compiler import methods as M
from scaler_wizard.diagnostics import DiagnosticBag, PlanError
from scaler_wizard.grammar import parse
from test_typecheck import codes, errors, ir_of, resolve

README = Path(__file__).parent.parent / "README.md"


def _options(text: str):
    return parse(text, file="p.expand").statements[0].options


# ---------------------------------------------------------------------------- registry


def test_every_method_is_a_registered_frozen_dataclass_with_its_facts():
    assert M.REGISTRY, "no method registered"
    for (kind, name), cls in M.REGISTRY.items():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        assert kind in ("widen", "layer", "op") and cls.name == name
        assert cls.summary and cls.source and cls.base in ("exact", "exact-eps", "approx"), name
        inst = cls()
        with pytest.raises(dataclasses.FrozenInstanceError):
            inst.noise = 1.0  # type: ignore[misc]
        assert inst.optimizer_state_map(None, None) is None  # not derived yet (issue 12)
    assert list(M.WIDTH_METHODS) == ["tile", "lemon", "net2net", "zero", "dup", "mean", "copy"]
    assert list(M.DEPTH_INITS) == ["identity", "zero", "cancel", "copy"]
    assert M.lookup("widen", "hypercloning") is M.WIDTH_METHODS["tile"]
    assert M.lookup("layer", "llama-pro").name == "identity"
    assert M.lookup("widen", "bogus") is None


def test_register_refuses_a_second_method_of_the_same_name():
    @dataclasses.dataclass(frozen=True)
    class Other(M.WidthMethod):
        name = "tile"
        summary = source = "x"

    with pytest.raises(ValueError, match="registered twice"):
        M.register(Other)


def test_lowering_comes_from_the_method():
    rp = resolve("widen ffn x2 net2net\nupcycle ffn experts 4 top 2\ninsert layer 1 identity", ir_of("llama"))
    from scaler_wizard.compiler.lower import build_passes

    assert [type(o.spec).__name__ for o in rp.ops] == ["Net2Net", "Upcycle", "Identity"]
    assert [p.name for p in build_passes(rp)] == ["widen-ffn", "upcycle", "depth"]


# ---------------------------------------------------------------------------- typed options


def test_options_are_parsed_once_into_typed_fields():
    bag = DiagnosticBag()
    values = M.WidthMethod.parse_options(_options('widen hidden x2 noise=0.5 split=equal untie="true"'), bag)
    assert not bag.items
    spec = M.WIDTH_METHODS["tile"].from_options(values)
    assert (spec.noise, spec.split, spec.untie) == (0.5, "equal", True)
    assert spec.given() == {"noise": 0.5, "split": "equal", "untie": True}
    values = M.LayerInit.parse_options(_options("insert layer 1 identity from=0"), bag)
    assert M.lookup("layer", "identity").from_options(values).from_ == 0


@pytest.mark.parametrize("text, code, where", [
    ("widen ffn x2 noise=-1", "SW207", "-1"),
    ("widen ffn x2 split=half", "SW207", "half"),
    ("widen hidden x2 untie=1", "SW207", "1"),
    ("upcycle ffn experts 4 top 2 router=randm", "SW207", "randm"),
    ("widen ffn x2 router=zero", "SW204", "router"),
    ("insert layer 1 identity split=equal", "SW204", "split"),
    ("stack x2 noise=0.1", "SW204", "noise"),
])
def test_bad_options_are_positioned(text, code, where):
    bag = DiagnosticBag()
    stmt = parse(text, file="p.expand").statements[0]
    cls = {"WidenStmt": M.WidthMethod, "UpcycleStmt": M.Upcycle, "StackStmt": M.lookup("op", "stack")}.get(
        type(stmt).__name__, M.LayerInit)
    cls.parse_options(stmt.options, bag)
    assert [d.code for d in bag.items] == [code]
    span = bag.items[0].span
    assert text.splitlines()[span.line - 1][span.col - 1:].startswith(where)


def test_untie_is_read_one_way():
    """`untie` was parsed twice (the config patch accepted the string "true", the tied-head rule only
    the literal): one typed field now decides both."""
    ir = ir_of("qwen2")  # tied embeddings
    for text in ('widen hidden x2 untie=true', 'widen hidden x2 untie="true"'):
        rp = resolve(text, ir)
        assert rp.config_after["tie_word_embeddings"] is False, text
        assert rp.ops[0].spec.untie is True
        assert [w.code for w in rp.warnings] == ["SW602"]
    rp = resolve("widen hidden x2 untie=false", ir)
    assert rp.config_after.get("tie_word_embeddings", True) is True and not rp.warnings


def test_seed_and_router_and_unread_options():
    ir = ir_of("llama")
    d = errors("widen ffn x2 seed=3", ir)[0]
    assert d.code == "SW204" and "seed <n>" in d.help
    assert codes("upcycle ffn experts 4 top 2 router=rand", ir) == ["SW207"]
    assert resolve("upcycle ffn experts 4 top 2 router=random", ir).ops[0].spec.router == "random"
    assert codes("widen ffn x2 zero split=equal", ir) == ["SW204"]
    assert codes("insert layer 1 zero noise=0.1", ir) == ["SW204"]


def test_depth_options_belong_to_their_statement():
    """Each insert's `noise=` seeds only the layers it made; the plan-wide noise fills in for the rest."""
    rp = resolve("insert layer 1 identity noise=0.5\ninsert layer 0 identity", ir_of("llama"))
    noise = {j: s.noise for j, s in enumerate(rp.layer_map) if s.is_new}
    assert noise == {0: 0.0, 2: 0.5}
    rp = resolve("noise 0.25\ninsert layer 1 identity noise=0.5\ninsert layer 0 identity\ninsert layer 0 zero",
                 ir_of("llama"))
    assert {j: s.noise for j, s in enumerate(rp.layer_map) if s.is_new} == {0: 0.0, 1: 0.25, 3: 0.5}
    assert [w.code for w in rp.warnings] == ["SW603"]  # the zero layer reads no noise


def test_tile_heads_reason_names_the_split():
    rp = resolve("widen heads x2 tile", ir_of("llama"))
    assert "o_proj split" in rp.ops[0].reason


# ---------------------------------------------------------------------------- pass manager


def test_pass_manager_checks_after_every_pass_and_names_predecessors():
    from scaler_wizard.compiler import program as P
    from scaler_wizard.compiler.lower import build_passes, run_passes
    from scaler_wizard.compiler.passes.base import Pass, PassError, initial_state

    rp = resolve("widen ffn x2 net2net\nwiden heads x2 dup", ir_of("llama"))
    st = initial_state(rp.ir, rp)

    class Truncate(Pass):  # a pass whose own ensures checks nothing
        name = "truncate"

        def apply(self, st):
            name = next(n for n in st.tensors if n.endswith("up_proj.weight"))
            st.tensors[name].node = P.Slice(st.tensors[name].node, 0, 0, 3)

        def ensures(self, st):
            pass

    passes = build_passes(rp)
    with pytest.raises(PassError) as e:
        run_passes(st, passes[:1] + [Truncate()] + passes[1:])
    assert e.value.pass_name == "truncate" and e.value.before == ["widen-ffn[0]"]
    assert "predicted" in e.value.detail


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scaler_wizard", *args], capture_output=True, text=True, cwd=cwd)


def test_compile_dump_after(tmp_path):
    from families import FAMILIES

    model = tmp_path / "m"
    FAMILIES["llama"]().save_pretrained(model)
    plan = tmp_path / "p.expand"
    plan.write_text(f'model "{model}"\nwiden ffn x2 net2net\nwiden hidden x2\ninsert layer 1 identity\n')
    r = _cli("compile", str(plan), "--dump-after", "widen-ffn")
    assert r.returncode == 0, r.stderr
    prog = json.loads(r.stdout)
    shapes = {o["name"]: o["shape"] for o in prog["outputs"]}
    assert prog["metadata"]["passes"] == ["widen-ffn[1]"] and prog["metadata"]["dumped_after"] == "widen-ffn[1]"
    assert shapes["model.layers.0.mlp.up_proj.weight"] == [192, 64]  # ffn grown, hidden not yet
    assert "model.layers.2.mlp.up_proj.weight" not in shapes  # depth not run yet
    r = _cli("compile", str(plan), "--dump-after", "depth")
    assert r.returncode == 0 and json.loads(r.stdout)["metadata"]["passes"][-1] == "depth"
    r = _cli("compile", str(plan), "--dump-after", "widen-vocab")
    assert r.returncode == 2 and "widen-ffn[1], widen-hidden[2], depth" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- tables


@pytest.mark.parametrize("dense", sorted(M.UPCYCLE_TARGETS))
def test_upcycle_target_table_matches_transformers(dense):
    """The one table of family names past the IR: fails when transformers renames the MoE class or
    the config keys the table writes."""
    import transformers
    from transformers import AutoConfig

    t = M.UPCYCLE_TARGETS[dense]
    AutoConfig.for_model(dense)  # the dense family exists
    cfg = AutoConfig.for_model(t.model_type)
    assert hasattr(transformers, t.architecture)
    assert cfg.architectures is None or t.architecture in cfg.architectures
    for key in [t.experts_key, t.top_k_key, *([t.ffn_key] if t.ffn_key else []), *t.fixed]:
        assert hasattr(cfg, key), f"{t.model_type} config has no `{key}`"
    patch = t.config_patch(4, 2, 32)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, vocab_size=32)
    built = AutoConfig.for_model(t.model_type, **small, **{k: v for k, v in patch.items() if k != "model_type"})
    assert getattr(built, t.experts_key) == 4 and getattr(built, t.top_k_key) == 2
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(built)
    assert type(model).__name__ == t.architecture
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd[f"model.layers.0.{t.gate_up}"] == (4, 64, 16)  # (E, 2F, H): the pass writes [gate; up]
    assert sd[f"model.layers.0.{t.down}"] == (4, 16, 32)
    assert sd[f"model.layers.0.{t.router}"] == (4, 16)


def test_readme_method_table_is_the_registry():
    text = README.read_text()
    start, end = "<!-- methods-table (generated: compiler.methods.methods_table) -->", "<!-- /methods-table -->"
    assert start in text and end in text
    table = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == M.methods_table(), "regenerate the README's table from compiler.methods.methods_table()"


def test_plan_error_for_unknown_method_lists_registry_order():
    d = errors("widen ffn x2 bogus", ir_of("llama"))[0]
    assert d.code == "SW202" and "`net2net`" in d.help and d.help.index("`tile`") < d.help.index("`lemon`")
    with pytest.raises(PlanError):
        resolve("widen heads x2 net2net", ir_of("llama"))


# ---------------------------------------------------------------------------- train { }


def test_train_block_is_checked_and_resolved_once(tmp_path):
    from scaler_wizard.compiler.frontend import plan_train
    from scaler_wizard.runtime.recipe import recipe_from_plan

    text = "widen ffn x2\ntrain {\n  stepz = 3\n}\n"
    d = errors(text, ir_of("llama"))[0]
    assert (d.code, d.span.line, d.span.col) == ("SW204", 3, 3) and "`steps`" in d.help
    (tmp_path / "c.txt").write_text("x")
    plan = tmp_path / "p.expand"
    plan.write_text('widen ffn x2\ntrain {\n  steps = 5\n  data = "c.txt"\n  curriculum = "64:2"\n}\n')
    rp = check_plan_file(plan)
    assert rp.train == {"steps": 5, "data": [str(tmp_path / "c.txt")], "curriculum": [(64, 2)]}
    assert plan_train(str(plan))[0] == rp.train  # what `train --plan` reads is the type checker's
    r = recipe_from_plan(plan)
    assert (r.steps, r.data, r.curriculum) == (5, [str(tmp_path / "c.txt")], [(64, 2)])
    (tmp_path / "r.toml").write_text("steps = 7\nlr = 1e-3\n")
    plan.write_text('widen ffn x2\ntrain "r.toml"\n')
    assert check_plan_file(plan).train == {"steps": 7, "lr": 1e-3}
    (tmp_path / "r.toml").write_text("stepz = 7\n")
    d = errors_of_file(plan)[0]
    assert d.code == "SW207" and "stepz" in d.message and (d.span.line, d.span.col) == (2, 7)


def check_plan_file(path):
    from scaler_wizard.compiler.typecheck import check_plan
    from scaler_wizard.grammar import parse_file

    return check_plan(parse_file(str(path)), ir_of("llama"), model_ref="tiny")


def errors_of_file(path):
    with pytest.raises(PlanError) as e:
        check_plan_file(path)
    return e.value.diagnostics


def test_explain_names_each_method_from_the_registry():
    from scaler_wizard.commands.explain import explain_lines
    from scaler_wizard.compiler.lower import lower

    rp = resolve("widen ffn x2 net2net\ninsert layer 1 identity", ir_of("llama"))
    text = "\n".join(explain_lines(lower(rp), rp))
    assert f"method `net2net`: {M.WIDTH_METHODS['net2net'].summary} [{M.WIDTH_METHODS['net2net'].source}]" in text
    assert "method `identity`: " + M.lookup("layer", "identity").summary in text
