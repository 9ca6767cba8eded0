"""The plan language's growth stages (``at step N { ... }``) and ``extend context``: parsing,
spans, printing, syntax errors (SW109 and the shared codes) and the type checker's SW210 stub."""

from __future__ import annotations

import pytest

from scaler_wizard.diagnostics import PlanError
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar import parse, print_plan

SCHEDULE = """model "runs/tiny"
train { steps = 3000; lr = 1e-3; batch_size = 16; seq_len = 256 }
widen ffn x2
at step 1000 { widen hidden x2 lemon; widen ffn x2 lemon }
at step 2000 optimizer=reset rewarm=200 {
  stack x2   # G_stack

  insert layers every 4 lesa epochs=50
  extend context to 8192 yarn factor=4
}
"""


def errors(text: str):
    with pytest.raises(PlanError) as ei:
        parse(text, "s.expand")
    return ei.value.diagnostics


def at(text: str, d) -> str:
    return text[d.span.start : d.span.end]


def test_schedule_parses_into_stages():
    plan = parse(SCHEDULE)
    kinds = [type(s).__name__ for s in plan.statements]
    assert kinds == ["ModelStmt", "TrainStmt", "WidenStmt", "Stage", "Stage"]
    s1, s2 = plan.statements[3:]
    assert s1 == A.Stage(
        A.Int(1000),
        (),
        (
            A.WidenStmt(A.Ident("hidden"), A.Factor(2.0), A.Ident("lemon")),
            A.WidenStmt(A.Ident("ffn"), A.Factor(2.0), A.Ident("lemon")),
        ),
    )
    assert s2.step.value == 2000
    assert [(o.key.name, o.value) for o in s2.options] == [("optimizer", A.Ident("reset")), ("rewarm", A.Int(200))]
    assert s2.statements == (
        A.StackStmt(A.Int(2)),
        A.InsertEveryStmt(A.Int(4), A.Ident("lesa"), (A.Option(A.Ident("epochs"), A.Int(50)),)),
        A.ExtendContext(A.Int(8192), A.Ident("yarn"), (A.Option(A.Ident("factor"), A.Int(4)),)),
    )
    assert all(isinstance(t, A.GROWTH_STATEMENTS) for t in s2.statements)


def test_stage_spans_point_into_the_source():
    plan = parse(SCHEDULE)
    s1, s2 = plan.statements[3:]
    assert SCHEDULE[s1.span.start : s1.span.end] == "at step 1000 { widen hidden x2 lemon; widen ffn x2 lemon }"
    assert SCHEDULE[s1.step.span.start : s1.step.span.end] == "1000"
    assert (s1.statements[1].span.line, s1.statements[1].span.col) == (4, 39)
    assert SCHEDULE[s2.span.start : s2.span.end].endswith("factor=4\n}")
    assert (s2.span.line, s2.span.end_line) == (5, 10)
    ext = s2.statements[2]
    assert SCHEDULE[ext.span.start : ext.span.end] == "extend context to 8192 yarn factor=4"
    assert SCHEDULE[ext.length.span.start : ext.length.span.end] == "8192"


def test_stage_and_extend_print_and_round_trip():
    plan = parse(SCHEDULE + "at step 3000 {}\nextend context to 4096\n")
    text = print_plan(plan)
    assert "at step 1000 {\n  widen hidden x2 lemon\n  widen ffn x2 lemon\n}\n" in text
    assert "at step 2000 optimizer=reset rewarm=200 {\n  stack x2\n" in text
    assert text.endswith("at step 3000 {}\nextend context to 4096\n")
    assert parse(text) == plan
    assert print_plan(parse(text)) == text


@pytest.mark.parametrize("stmt", ["insert layer 3 lesa", "insert layers every 4 lesa", "insert 2 layers after 5 lesa"])
def test_lesa_is_an_init_name(stmt):
    (s,) = parse(stmt).statements
    assert s.init == A.Ident("lesa")


@pytest.mark.parametrize("method", ["linear", "dynamic", "yarn", "llama3", "longrope", "made_up"])
def test_extend_context_method_is_a_name_the_type_checker_resolves(method):
    (s,) = parse(f"extend context to 32768 {method} factor=8.0 original_max_position_embeddings=4096").statements
    assert s.method == A.Ident(method)
    assert s.length == A.Int(32768)
    assert [o.key.name for o in s.options] == ["factor", "original_max_position_embeddings"]


def test_keywords_stay_usable_as_names():
    (s,) = parse("widen step x2 at step=3 context=1").statements  # method `at`, option keys
    assert s.group.name == "step" and s.method.name == "at"
    assert [o.key.name for o in s.options] == ["step", "context"]


@pytest.mark.parametrize("kw, stmt", [("model", 'model "m"'), ("seed", "seed 3"), ("dtype", "dtype bf16"),
                                      ("noise", "noise 0.1"), ("train", "train { lr = 1 }")])
def test_plan_wide_settings_inside_a_stage_are_sw109(kw, stmt):
    text = f"at step 10 {{\n  stack x2\n  {stmt}\n}}\n"
    (d,) = errors(text)
    assert d.code == "SW109" and at(text, d) == kw and (d.span.line, d.span.col) == (3, 3)
    assert "outside any stage" in d.help


def test_nested_stage_is_sw109_and_other_errors_are_still_reported():
    text = "at step 10 { stack x2; at step 20 { stack x2 } }\nat step 30 {\n  widn ffn x2\n  widen ffn 2\n}\n"
    ds = errors(text)
    assert [d.code for d in ds] == ["SW109", "SW107", "SW102"]
    assert at(text, ds[0]) == "at" and ds[0].span.col == 24
    assert at(text, ds[1]) == "widn" and at(text, ds[2]) == "2"


@pytest.mark.parametrize(
    "text, code, snippet",
    [
        ("at step -1 { stack x2 }", "SW104", "-1"),
        ("at step 1.5 { stack x2 }", "SW104", "1.5"),
        ("at 5 { stack x2 }", "SW102", "5"),
        ("at step 5 stack x2", "SW102", "x2"),
        ("at step 5 { stack x2 } seed 3", "SW102", "seed"),
        ("at step 5 { stack x0 }", "SW104", "x0"),
        ("extend context to 0", "SW104", "0"),
        ("extend context 4096", "SW102", "4096"),
        ("extend to 4096", "SW102", "to"),
    ],
)
def test_stage_and_extend_syntax_errors(text, code, snippet):
    (d,) = errors(text)
    assert (d.code, at(text, d)) == (code, snippet), d


def test_stage_without_brace_ends_too_early():
    (d,) = errors("at step 5")
    assert d.code == "SW103" and "`{`" in d.message and d.span.col == 10


def test_unclosed_stage_recovers_at_the_next_stage():
    text = "at step 10 {\n  widen hidden x2\nat step 20 {\n  stack x2\n}\nseed 1\n"
    (d,) = errors(text)
    assert d.code == "SW106" and (d.span.line, d.span.col) == (1, 12)
    assert "`at step` block is not closed" in d.message and "before line 3" in d.message


def test_unclosed_stage_at_end_of_file():
    (d,) = errors("seed 1\nat step 10 {\n  stack x2\n")
    assert d.code == "SW106" and (d.span.line, d.span.col) == (2, 12) and "file ends" in d.message


def test_type_checker_refuses_what_it_cannot_resolve_yet_once_each():
    from families import FAMILIES
    from scaler_wizard.compiler.typecheck import check_plan
    from scaler_wizard.ir import discover

    ir = discover(FAMILIES["llama"]())
    text = "widen ffn x2\nat step 10 rewarm=5 {\n  stack x2\n}\nextend context to 64 yarn\n"
    with pytest.raises(PlanError) as ei:
        check_plan(parse(text, "p.expand"), ir, model_ref="tiny")
    ds = [d for d in ei.value.diagnostics if d.severity == "error"]
    assert [(d.code, d.span.line, d.span.col) for d in ds] == [("SW210", 2, 1), ("SW210", 5, 1)]
    assert ds[0].message == "`at step 10 { ... }` is not supported by this build yet"
    assert ds[1].message == "`extend context to 64 yarn` is not supported by this build yet"
