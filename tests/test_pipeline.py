"""Tests of the pipeline text: parsing, printing, option types, errors and the CLI views."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from grail_graph.cli import main
from grail_graph.driver import default_pipeline
from grail_graph.errors import GrailError
from grail_graph.passes import PASSES, CompressionState, Pass, PassResult, parse_pipeline, print_pipeline, run_pipeline
from grail_graph.passes.base import option_fields, option_name
from grail_graph.passes.transform import (
    Calibrate,
    CalibrateOptions,
    Compensate,
    CompensateOptions,
    FindGroups,
    Rewrite,
    Select,
    SelectOptions,
)
from grail_graph.passes.validate import Validate, ValidateOptions

CANONICAL_TEXTS = [
    default_pipeline(),
    default_pipeline(sparsity=0.25, selector="gram", compensation="ridge", alpha=0.01, multiple=8, seed=3),
    default_pipeline(selector="magnitude", compensation="none", validate=False),
    "find-groups,select{method=random sparsity=0.0 multiple=1 seed=7 head-sparsity=0.0 heads=auto},compensate{method=none alpha=0.0 affine=false fallback=false},rewrite",
    "find-groups",
]


@dataclass(frozen=True)
class ToyOptions:
    flag: bool = False
    count: int = 1
    scale: float = 1.0
    label: str = "x"


class ToyPass(Pass):
    """Test pass with one option of each supported type. It reports a change when `flag` is set."""

    name = "toy"
    summary = "Test pass with options of every type."
    Options = ToyOptions

    def run(self, state: CompressionState) -> PassResult:
        return PassResult(self.options.flag, {"count": self.options.count})


class CountingFrontEnd:
    """Front-end stand-in that counts calls of `verify`."""

    def __init__(self) -> None:
        self.verify_calls = 0

    def verify(self) -> None:
        self.verify_calls += 1


@pytest.fixture
def toy_pass(monkeypatch: pytest.MonkeyPatch) -> type[Pass]:
    monkeypatch.setitem(PASSES, ToyPass.name, ToyPass)
    return ToyPass


def grail_error(text: str) -> str:
    with pytest.raises(GrailError) as caught:
        parse_pipeline(text)
    return str(caught.value)


# Round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", CANONICAL_TEXTS)
def test_print_of_parse_is_identity(text: str) -> None:
    assert print_pipeline(parse_pipeline(text)) == text


def test_parse_of_print_is_identity() -> None:
    passes = [
        FindGroups(),
        Calibrate(CalibrateOptions(batch_size=7, samples=100)),
        Select(SelectOptions(method="gram", sparsity=0.375, multiple=4, seed=11)),
        Compensate(CompensateOptions(method="ridge", alpha=0.1)),
        Rewrite(),
        Validate(ValidateOptions(batch_size=3, latency_runs=0)),
    ]

    assert parse_pipeline(print_pipeline(passes)) == passes


def test_parse_fills_defaults_and_spaces() -> None:
    passes = parse_pipeline(" find-groups , select{ sparsity=0.25 } ,rewrite")

    assert passes == [FindGroups(), Select(SelectOptions(sparsity=0.25)), Rewrite()]
    assert print_pipeline(passes) == "find-groups,select{method=wanda sparsity=0.25 multiple=1 seed=0 head-sparsity=0.0 heads=auto},rewrite"


def test_passes_with_different_options_differ() -> None:
    assert parse_pipeline("select{seed=1}") != parse_pipeline("select{seed=2}")


# Option types -------------------------------------------------------------------------------


def test_options_convert_to_field_types(toy_pass: type[Pass]) -> None:
    (toy,) = parse_pipeline("toy{flag=true count=12 scale=1e-2 label=abc}")

    assert toy.options.flag is True
    assert type(toy.options.count) is int
    assert toy.options.count == 12
    assert type(toy.options.scale) is float
    assert toy.options.scale == 0.01
    assert toy.options.label == "abc"


@pytest.mark.parametrize("raw, expected", [("true", True), ("False", False), ("TRUE", True)])
def test_bool_option_accepts_true_false(toy_pass: type[Pass], raw: str, expected: bool) -> None:
    (toy,) = parse_pipeline(f"toy{{flag={raw}}}")

    assert toy.options.flag is expected


def test_bool_option_prints_lowercase(toy_pass: type[Pass]) -> None:
    text = print_pipeline(parse_pipeline("toy{flag=True}"))

    assert text == "toy{flag=true count=1 scale=1.0 label=x}"


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("toy{flag=yes}", ["'yes'", "bool", "toy{flag}"]),
        ("toy{count=1.5}", ["'1.5'", "int", "toy{count}"]),
        ("toy{scale=big}", ["'big'", "float", "toy{scale}"]),
        ("select{seed=x}", ["'x'", "int", "select{seed}"]),
        ("select{sparsity=}", ["''", "float"]),
    ],
)
def test_option_wrong_type_rejected(toy_pass: type[Pass], text: str, fragments: list[str]) -> None:
    message = grail_error(text)

    for fragment in fragments:
        assert fragment in message


# Errors -------------------------------------------------------------------------------------


def test_unknown_pass_lists_known_passes() -> None:
    message = grail_error("find-groups,shrink{factor=2}")

    assert "unknown pass 'shrink'" in message
    for name in PASSES:
        assert name in message
    assert "--list-passes" in message


def test_empty_pass_name_is_rejected() -> None:
    assert "unknown pass ''" in grail_error("find-groups,,rewrite")


def test_unknown_option_lists_options() -> None:
    message = grail_error("select{ratio=0.5}")

    assert "pass 'select' has no option 'ratio'" in message
    assert "method, sparsity, multiple, seed" in message


def test_option_of_pass_without_options() -> None:
    message = grail_error("rewrite{fast=true}")

    assert "pass 'rewrite' has no option 'fast'" in message
    assert "Its options: none" in message


def test_option_without_value_is_rejected() -> None:
    message = grail_error("select{sparsity}")

    assert "option 'sparsity' of pass 'select' has no value" in message
    assert "sparsity=VALUE" in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("select{sparsity=1.0}", "sparsity must lie in [0, 1), got 1.0"),
        ("select{sparsity=-0.1}", "got -0.1"),
        ("select{sparsity=nan}", "got nan"),
        ("select{method=best}", "method 'best' is not one of"),
        ("select{multiple=0}", "multiple must be >= 1, got 0"),
        ("compensate{alpha=-1.0}", "got -1.0"),
        ("compensate{alpha=inf}", "got inf"),
        ("calibrate{batch-size=0}", "batch-size must be >= 1, got 0"),
        ("validate{latency-runs=-5}", "got -5"),
    ],
)
def test_out_of_range_value_names_value(text: str, fragment: str) -> None:
    message = grail_error(text)

    assert fragment in message
    assert "--list-passes" in message


@pytest.mark.parametrize(
    "text, problem",
    [
        ("select{sparsity=0.5", "unclosed '{'"),
        ("find-groups,select{method=wanda,rewrite", "unclosed '{'"),
        ("select}", "unmatched '}' at position 6"),
        ("select{sparsity=0.5}}", "unmatched '}' at position 20"),
    ],
)
def test_unbalanced_braces_are_rejected(text: str, problem: str) -> None:
    message = grail_error(text)

    assert problem in message
    assert repr(text) in message


def test_text_after_options_is_rejected() -> None:
    assert "must end with '}'" in grail_error("select{sparsity=0.5}x")


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_pipeline_is_rejected(text: str) -> None:
    assert "the pipeline is empty" in grail_error(text)


# Running ------------------------------------------------------------------------------------


def test_run_pipeline_records_each_pass(toy_pass: type[Pass]) -> None:
    frontend = CountingFrontEnd()
    state = CompressionState(frontend=frontend)

    records = run_pipeline(parse_pipeline("toy{flag=true count=3},toy{count=4}"), state)

    assert [record["pass"] for record in records] == ["toy", "toy"]
    assert [record["changed"] for record in records] == [True, False]
    assert [record["statistics"] for record in records] == [{"count": 3}, {"count": 4}]
    assert records[0]["options"] == {"flag": True, "count": 3, "scale": 1.0, "label": "x"}
    assert all(record["seconds"] >= 0 for record in records)
    assert frontend.verify_calls == 1


def test_run_pipeline_without_verify(toy_pass: type[Pass]) -> None:
    frontend = CountingFrontEnd()

    run_pipeline(parse_pipeline("toy{flag=true}"), CompressionState(frontend=frontend), verify_each=False)

    assert frontend.verify_calls == 0


# Command line -------------------------------------------------------------------------------


def test_list_passes_shows_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-passes"]) == 0
    out = capsys.readouterr().out

    for name, cls in PASSES.items():
        assert f"{name}: {cls.summary}" in out
        for field in option_fields(cls.Options):
            assert f"    {option_name(field.name)}=" in out
    assert "    sparsity=0.5  " in out
    assert "    latency-runs=50  " in out


def test_print_pipeline_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-pipeline"]) == 0

    assert capsys.readouterr().out.strip() == default_pipeline()


def test_print_pipeline_reflects_method_options(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--print-pipeline", "--sparsity", "0.3", "--selector", "gram", "--compensation", "none"]

    assert main(argv) == 0
    text = capsys.readouterr().out.strip()

    passes = parse_pipeline(text)
    select = next(p for p in passes if p.name == "select")
    compensate = next(p for p in passes if p.name == "compensate")
    assert select.options.sparsity == 0.3
    assert select.options.method == "gram"
    assert compensate.options.method == "none"
    assert [p.name for p in passes][:2] == ["find-groups", "calibrate"]


def test_print_pipeline_without_statistics(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--print-pipeline", "--selector", "magnitude", "--compensation", "none", "--no-validate"]

    assert main(argv) == 0
    text = capsys.readouterr().out.strip()

    assert [p.name for p in parse_pipeline(text)] == ["find-groups", "select", "compensate", "rewrite"]


def test_print_pipeline_canonicalizes_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-pipeline", "--pipeline", "find-groups , select{sparsity=0.25}"]) == 0

    assert capsys.readouterr().out.strip() == "find-groups,select{method=wanda sparsity=0.25 multiple=1 seed=0 head-sparsity=0.0 heads=auto}"


def test_print_pipeline_rejects_bad_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-pipeline", "--pipeline", "find-groups,prune"]) == 2
    captured = capsys.readouterr()

    assert captured.out == ""
    assert captured.err.startswith("grail-opt: error: unknown pass 'prune'")


def test_print_pipeline_rejects_sparsity_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-pipeline", "--sparsity", "1.0"]) == 2

    assert "1.0" in capsys.readouterr().err
