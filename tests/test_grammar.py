"""The plan language front end: parser, printer, syntax diagnostics, golden error output.

Regenerate the golden ``.expected`` files with ``SW_UPDATE_GOLDEN=1`` (then read the diff!).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaler_wizard.diagnostics import PlanError, UsageError, render
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar import parse, parse_file, print_plan
from scaler_wizard.grammar.parser import FORMS, statement_keywords

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.expand"))
GOLDEN = Path(__file__).resolve().parent / "golden" / "syntax"
GOLDEN_CASES = sorted(GOLDEN.glob("*.expand"))


def one(text: str):
    plan = parse(text)
    assert len(plan.statements) == 1, plan.statements
    return plan.statements[0]


def errors(text: str, file: str = "<plan>"):
    with pytest.raises(PlanError) as ei:
        parse(text, file)
    return ei.value.diagnostics


def codes(text: str) -> list[str]:
    return [d.code for d in errors(text)]


def snippet(text: str, span: A.Span) -> str:
    return text[span.start : span.end]


# --------------------------------------------------------------------------- statement forms
def test_model():
    s = one('model "SmolLM2-135M"')
    assert s == A.ModelStmt(A.Str("SmolLM2-135M"))
    assert one('model "./weights/model.gguf"').ref.value == "./weights/model.gguf"


def test_widen_factor_method():
    s = one("widen hidden x2 lemon")
    assert s == A.WidenStmt(A.Ident("hidden"), A.Factor(2.0), A.Ident("lemon"))
    assert one("widen hidden x1.5 lemon").amount == A.Factor(1.5)
    assert one("widen hidden x2").method is None


def test_widen_to_with_options():
    s = one("widen ffn to 3072 net2net noise=0.01 split=random")
    assert s.amount == A.ToSize(3072)
    assert s.method == A.Ident("net2net")
    assert s.options == (
        A.Option(A.Ident("noise"), A.Number(0.01)),
        A.Option(A.Ident("split"), A.Ident("random")),
    )


def test_widen_by_and_options_without_method():
    s = one("widen heads by 3 dup")
    assert s == A.WidenStmt(A.Ident("heads"), A.ByDelta(3), A.Ident("dup"))
    s = one("widen heads by 3 noise=0.5")
    assert s.method is None and s.options[0].key.name == "noise"


def test_insert_layer():
    s = one("insert layer 12 identity")
    assert s == A.InsertLayerStmt(index=A.Int(12), init=A.Ident("identity"))
    assert one("insert layer 0") == A.InsertLayerStmt(A.Int(0))
    s = one("insert layer 3 zero scale=1e-3")
    assert s.options == (A.Option(A.Ident("scale"), A.Number(0.001)),)


def test_insert_after_and_every():
    assert one("insert 2 layers after 5 cancel") == A.InsertLayersAfterStmt(
        A.Int(2), A.Int(5), A.Ident("cancel")
    )
    assert one("insert layers every 4 identity") == A.InsertEveryStmt(A.Int(4), A.Ident("identity"))
    assert one("insert layers every 4").init is None


def test_duplicate_and_stack():
    assert one("duplicate layers 8..24") == A.DuplicateLayersStmt(A.Int(8), A.Int(24))
    assert one("duplicate layers 8 .. 24 noise=0") == A.DuplicateLayersStmt(
        A.Int(8), A.Int(24), (A.Option(A.Ident("noise"), A.Int(0)),)
    )
    assert one("stack x2") == A.StackStmt(A.Int(2))


def test_upcycle():
    s = one("upcycle ffn experts 8 top 2")
    assert s == A.UpcycleStmt(A.Ident("ffn"), A.Int(8), A.Int(2))
    # `top` is a keyword only where the grammar wants it: as an option key it is a name.
    s = one("upcycle ffn experts 8 top 2 top=3 jitter=0.1")
    assert [o.key.name for o in s.options] == ["top", "jitter"]


def test_grow_to():
    assert one("grow to 1.5B prefer depth") == A.GrowToStmt(1.5e9, "B", A.Ident("depth"))
    assert one("grow to 360M") == A.GrowToStmt(360e6, "M")
    assert one("grow to 7B").params == 7e9
    assert one("grow to 500K").params == 500e3
    s = one("grow to 123456789")
    assert (s.params, s.unit) == (123456789.0, "")


def test_seed_dtype_noise():
    assert one("seed 42") == A.SeedStmt(A.Int(42))
    assert one("dtype bfloat16") == A.DtypeStmt(A.Ident("bfloat16"))
    assert one("noise 0.01") == A.NoiseStmt(A.Number(0.01))
    assert one("noise 0") == A.NoiseStmt(A.Number(0.0))


def test_train_block_and_ref():
    s = one('train {\n  lr = 3e-4; steps = 100   # comment\n\n  name = "a;b#c" ; bf16 = true\n  x = false\n}')
    assert s.ref is None
    assert s.options == (
        A.Option(A.Ident("lr"), A.Number(3e-4)),
        A.Option(A.Ident("steps"), A.Int(100)),
        A.Option(A.Ident("name"), A.Str("a;b#c")),
        A.Option(A.Ident("bf16"), A.Bool(True)),
        A.Option(A.Ident("x"), A.Bool(False)),
    )
    assert one("train { }") == A.TrainStmt()
    assert one('train "recipe.toml"') == A.TrainStmt(ref=A.Str("recipe.toml"))
    # Statement keywords are fine as keys inside the block.
    s = one("train {\n seed = 3\n noise = 0.1 }")
    assert [o.key.name for o in s.options] == ["seed", "noise"]


def test_option_values():
    s = one('widen ffn x2 a=1 b=-2 c=3.5 d=3e-4 e="s" f=name g=true h=false i=+7 j=1E5')
    vals = {o.key.name: o.value for o in s.options}
    assert vals == {
        "a": A.Int(1), "b": A.Int(-2), "c": A.Number(3.5), "d": A.Number(3e-4),
        "e": A.Str("s"), "f": A.Ident("name"), "g": A.Bool(True), "h": A.Bool(False),
        "i": A.Int(7), "j": A.Number(1e5),
    }  # fmt: skip


def test_string_escapes():
    assert one(r'model "a\"b\\c\n\t\u00e9\U0001F600"').ref.value == 'a"b\\c\n\té\U0001f600'


# --------------------------------------------------------------------------- identifiers
def test_names_are_identifiers_not_keywords():
    # Unknown group names are the type checker's business: `fnn` parses.
    assert one("widen fnn x2").group == A.Ident("fnn")
    # Keywords outside their place are plain names.
    assert one("widen hidden x2 layer").method == A.Ident("layer")
    assert one("widen model x2 to").method == A.Ident("to")
    assert one("insert layer 1 layers").init == A.Ident("layers")
    assert one("dtype float16").name.name == "float16"


def test_factor_is_its_own_token_but_xavier_is_a_name():
    s = one("widen ffn x2 xavier")
    assert s.amount == A.Factor(2.0) and s.method == A.Ident("xavier")
    assert one("widen x2 x2 x3").group == A.Ident("x2")  # where a name is expected, x2 is one
    assert one("widen x2 x2 x3").method == A.Ident("x3")
    assert one("widen ffn x2 init=xavier").options[0].value == A.Ident("xavier")


def test_keywords_end_at_word_boundaries():
    assert codes("insert layers12 after 3") == ["SW102"]
    assert codes("grow to1B") == ["SW102"]


# --------------------------------------------------------------------------- layout and spans
def test_semicolons_comments_blank_lines():
    text = "# header\n\nmodel \"m\" # trailing\nseed 1; dtype float32 ;; noise 0.5\n\n   # indented\n"
    plan = parse(text)
    assert [type(s).__name__ for s in plan.statements] == [
        "ModelStmt", "SeedStmt", "DtypeStmt", "NoiseStmt",
    ]  # fmt: skip
    assert parse("") == A.Plan(())
    assert parse("# only a comment") == A.Plan(())
    assert len(parse("seed 1\r\nseed 2\rseed 3").statements) == 3


def test_spans_of_leaves():
    text = "seed 1\n  widen fnn x2 lemon noise=0.01   # c\n"
    plan = parse(text, "p.expand")
    w = plan.statements[1]
    assert snippet(text, w.group.span) == "fnn"
    assert (w.group.span.line, w.group.span.col, w.group.span.end_col) == (2, 9, 12)
    assert w.group.span.file == "p.expand"
    assert snippet(text, w.amount.span) == "x2"
    assert snippet(text, w.method.span) == "lemon"
    assert snippet(text, w.options[0].span) == "noise=0.01"
    assert snippet(text, w.options[0].value.span) == "0.01"
    assert snippet(text, w.span) == "widen fnn x2 lemon noise=0.01"
    assert (w.span.line, w.span.col) == (2, 3)


def test_spans_of_statements_and_multiline_block():
    text = 'insert layer 12 identity; widen ffn to 3072\ntrain {\n  lr = 1\n}\n'
    s0, s1, s2 = parse(text).statements
    assert snippet(text, s0.index.span) == "12"
    assert snippet(text, s1.span) == "widen ffn to 3072"
    assert s1.span.col == 27
    assert snippet(text, s1.amount.span) == "to 3072"
    assert snippet(text, s2.span) == "train {\n  lr = 1\n}"
    assert (s2.span.line, s2.span.end_line, s2.span.end_col) == (2, 4, 2)
    assert s2.options[0].key.span.line == 3


def test_plan_keeps_file_and_source_and_model_ref():
    text = 'model "a"\nmodel "b"\n'
    plan = parse(text, "x.expand")
    assert plan.file == "x.expand" and plan.source == text
    assert plan.model_ref() == "b"


# --------------------------------------------------------------------------- diagnostics
def test_unknown_keyword_suggests():
    (d,) = errors("widn hidden x2")
    assert d.code == "SW107" and "`widn`" in d.message
    assert "did you mean `widen`?" in d.help
    assert (d.span.col, d.span.end_col) == (1, 5)
    (d,) = errors("Insert layer 3")
    assert d.code == "SW107" and "`insert`" in d.help


def test_missing_factor_message_in_user_words():
    (d,) = errors("widen hidden 2")
    assert d.code == "SW102"
    assert "unexpected number `2`" in d.message
    assert "expected a factor like `x2`, `to <size>` or `by <delta>`" in d.message
    assert FORMS["widen"] in d.help


def test_ends_too_early_caret_after_statement():
    text = "widen hidden   # comment\n"
    (d,) = errors(text)
    assert d.code == "SW103"
    assert (d.span.line, d.span.col) == (1, 13)
    assert "expected a factor" in d.message


@pytest.mark.parametrize(
    "text, bad",
    [
        ("widen ffn x0", "x0"),
        ("widen ffn x-2", "x-2"),
        ("widen ffn x2abc", "x2abc"),
        ("widen ffn to 0", "0"),
        ("widen ffn to 3.5", "3.5"),
        ("widen ffn by -1", "-1"),
        ("grow to 1.5Q", "1.5Q"),
        ("grow to 0M", "0M"),
        ("grow to 1e999", "1e999"),
        ("insert layer -1", "-1"),
        ("insert 0 layers after 3", "0"),
        ("stack x1.5", "x1.5"),
        ("seed 1.5", "1.5"),
        ("noise -0.1", "-0.1"),
        ("upcycle ffn experts 8 top 2x", "2x"),
        ("widen ffn x2 lr=1.2.3", "1.2.3"),
        ("widen ffn x2 lr=1e999", "1e999"),
    ],
)
def test_malformed_numbers(text, bad):
    (d,) = errors(text)
    assert d.code == "SW104", d
    assert snippet(text, d.span) == bad


def test_unterminated_string_and_bad_escape():
    (d,) = errors('model "abc\nseed 1')
    assert d.code == "SW105" and (d.span.line, d.span.col) == (1, 7)
    (d,) = errors('model "C:\\models"')
    assert d.code == "SW108" and d.span.col == 10


def test_train_block_errors():
    (d,) = errors("train {\n lr = 1\n")
    assert d.code == "SW106" and (d.span.line, d.span.col) == (1, 7) and "not closed" in d.message
    (d,) = errors("train {\n lr 1\n}")
    assert d.code == "SW106" and "`=`" in d.message
    (d,) = errors("train { lr = 1 steps = 2 }")
    assert d.code == "SW106" and d.span.col == 16
    (d,) = errors("seed 1 }")
    assert d.code == "SW106"


def test_unclosed_block_recovers_at_next_statement():
    text = "train {\n  lr = 1\nwiden hidden 2\nseed x\n"
    ds = errors(text)
    assert [(d.code, d.span.line) for d in ds] == [("SW106", 1), ("SW102", 3), ("SW102", 4)]


def test_unexpected_character():
    (d,) = errors("widen hidden x2 @")
    assert d.code == "SW101" and d.span.col == 17
    assert "end of the statement" in d.message
    (d,) = errors("widen hidden \x00")
    assert d.code == "SW101" and "U+0000" in d.message


def test_all_errors_reported_sorted():
    text = "widen ffn x0\nwidn a x2\nseed 1\n\ngrow to 1.5Q; insert layer\nmodel \"x\n"
    ds = errors(text)
    assert [(d.code, d.span.line, d.span.col) for d in ds] == [
        ("SW104", 1, 11),
        ("SW107", 2, 1),
        ("SW104", 5, 9),
        ("SW103", 5, 27),
        ("SW105", 6, 7),
    ]
    assert ds == sorted(ds, key=lambda d: (d.span.line, d.span.col))


def test_every_diagnostic_has_help():
    text = "widn a\nwiden a 2\nwiden a\nwiden a x0\nmodel \"a\nwiden a x2 @\ntrain {\n a 1\n}\n}\n"
    ds = errors(text)
    assert len(ds) == 8
    assert all(d.help for d in ds)


def test_plan_error_carries_sources_for_render():
    with pytest.raises(PlanError) as ei:
        parse("widen hidden 2\n", "f.expand")
    out = render(ei.value.diagnostics, ei.value.sources)
    assert out.splitlines()[:4] == [
        "f.expand:1:14: error[SW102]: unexpected number `2`; expected a factor like `x2`, "
        "`to <size>` or `by <delta>`",
        "  |",
        "1 | widen hidden 2",
        "  |              ^",
    ]


# --------------------------------------------------------------------------- printer
def test_print_plan_canonical_and_round_trips():
    text = (
        'model "m"  ;widen  ffn to 3072 net2net noise=1e-2\n'
        "grow to 1.5B prefer depth\nwiden hidden x2.0\n"
        'train { lr = 3e-4; name = "a\\"b" }\ntrain {}\nstack x3\n'
    )
    plan = parse(text)
    out = print_plan(plan)
    assert out == (
        'model "m"\n'
        "widen ffn to 3072 net2net noise=0.01\n"
        "grow to 1.5B prefer depth\n"
        "widen hidden x2\n"
        'train {\n  lr = 0.0003\n  name = "a\\"b"\n}\n'
        "train {}\n"
        "stack x3\n"
    )
    assert parse(out) == plan
    assert print_plan(parse(out)) == out


def test_printer_escapes_and_sizes():
    s = A.ModelStmt(A.Str('a\nb\x00\u2028"\\é'))
    plan = A.Plan((s, A.GrowToStmt(0.1 * 3 * 1e9, "B"), A.GrowToStmt(1.0e-7, "K")))
    out = print_plan(plan)
    assert "\n" not in out.splitlines()[0] and len(out.splitlines()) == 3
    assert parse(out) == plan


def test_printer_rejects_non_finite():
    with pytest.raises(ValueError):
        print_plan(A.Plan((A.NoiseStmt(A.Number(float("nan"))),)))


# --------------------------------------------------------------------------- files and examples
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_parse_and_round_trip(path):
    plan = parse_file(path)
    assert plan.statements
    assert plan.file == str(path)
    assert parse(print_plan(plan)) == plan


def test_required_examples_present():
    names = {p.name for p in EXAMPLES}
    assert {
        "smollm2-grow.expand", "llama-pro.expand", "solar-dus.expand", "moe-upcycle.expand",
        "heads.expand", "grow-to.expand",
    } <= names  # fmt: skip
    plan = parse_file(ROOT / "examples" / "smollm2-grow.expand")
    assert plan.statements == (
        A.ModelStmt(A.Str("SmolLM2-135M")),
        A.WidenStmt(A.Ident("hidden"), A.Factor(2.0), A.Ident("lemon")),
        A.WidenStmt(A.Ident("ffn"), A.Factor(2.0), A.Ident("lemon")),
        A.InsertLayerStmt(A.Int(12), A.Ident("identity")),
    )
    assert any(isinstance(s, A.TrainStmt) and s.options for p in EXAMPLES for s in parse_file(p).statements)


def test_parse_file_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        parse_file(tmp_path / "missing.expand")
    with pytest.raises(UsageError, match="directory"):
        parse_file(tmp_path)
    bad = tmp_path / "latin1.expand"
    bad.write_bytes(b'model "caf\xe9"\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        parse_file(bad)
    bom = tmp_path / "bom.expand"
    bom.write_bytes(b'\xef\xbb\xbfseed 3\n')
    assert parse_file(bom).statements == (A.SeedStmt(A.Int(3)),)


def test_parse_rejects_non_str():
    with pytest.raises(TypeError):
        parse(b"seed 1")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- golden diagnostics
@pytest.mark.parametrize("path", GOLDEN_CASES, ids=[p.stem for p in GOLDEN_CASES])
def test_golden_syntax_diagnostics(path):
    text = path.read_text(encoding="utf-8")
    with pytest.raises(PlanError) as ei:
        parse(text, path.name)
    got = render(ei.value.diagnostics, {path.name: text}) + "\n"
    expected = path.with_suffix(".expected")
    if os.environ.get("SW_UPDATE_GOLDEN") == "1":
        expected.write_text(got, encoding="utf-8")
    assert expected.exists(), f"missing {expected.name}: run with SW_UPDATE_GOLDEN=1"
    assert got == expected.read_text(encoding="utf-8")


def test_golden_cases_exist():
    assert len(GOLDEN_CASES) >= 8


# --------------------------------------------------------------------------- speed and imports
def test_grammar_package_does_not_import_torch_or_lark_eagerly():
    code = (
        "import sys, scaler_wizard.grammar.parser, scaler_wizard.grammar.printer, "
        "scaler_wizard.diagnostics\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'lark' not in sys.modules, 'lark imported at import time'\n"
        "from scaler_wizard.grammar import parse\n"
        "parse('seed 1')\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_parse_time_grows_linearly():
    # a guard against quadratic behaviour (statement splitting, error recovery), not a stopwatch:
    # 16x the text may take at most 40x the time (best of three, so a busy machine does not fail it)
    one = (ROOT / "examples" / "grow-and-train.expand").read_text() + "widen a x2 @\ninsert layer\n"
    parse_errors = lambda text: pytest.raises(PlanError, parse, text)  # noqa: E731

    def best(text):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            parse_errors(text)
            times.append(time.perf_counter() - t)
        return min(times)

    best(one)  # warm the cached parser
    assert best(one * 64) < 40 * best(one * 4)


def test_statement_keywords_all_have_forms():
    # the grammar decides what starts a statement; FORMS is the help text for each of them
    assert {w.lower() for w in statement_keywords()} == set(FORMS)


@pytest.mark.parametrize("factor,hint", [("2", "like `x2`"), ("2x", "like `x2`"), ("1.5x", "like `x1.5`")])
def test_factor_without_x_hint_names_the_number(factor, hint):
    """`widen ffn 2x` (the x on the wrong side) was told to write `x2x` (break-it)."""
    with pytest.raises(PlanError) as ei:
        parse(f"widen ffn {factor}\n", "f.expand")
    d = ei.value.diagnostics[0]
    assert d.code == "SW102" and hint in d.help and "x2x" not in d.help
