"""What a new user sees first (issue 25): `detkit --version`, and `--help` listing the commands in
workflow order (detect, train, eval, benchmark, export, anchors, convert)."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import detkit
from detkit.cli import WORKFLOW_ORDER, app


def test_version_prints_the_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"detkit {detkit.__version__}"


def test_help_lists_commands_in_workflow_order():
    listed = subprocess.run([sys.executable, "-m", "detkit", "--help"], capture_output=True, text=True, check=True)
    commands = [line.split()[0] for line in listed.stdout.split("Commands:")[1].splitlines() if line.strip()]
    assert commands == list(WORKFLOW_ORDER)


PYTHON_TYPE_LEAKS = ("list[", "<list", "{", "}", "<str>", "<int>", "<float>", "<bool>", "<path>",
                     "Optional", "NoneType", "<class", "typing.")


def test_no_help_page_shows_python_types():
    """Usage lines and value placeholders read like a normal command line: `detkit detect
    [OPTIONS] SOURCE...`, `--classes <ids>`; never typer's `{sources}...`, `<list[str]>`, `<int>`."""
    runner = CliRunner()
    for command in WORKFLOW_ORDER:
        page = runner.invoke(app, [command, "--help"], prog_name="detkit")
        assert page.exit_code == 0, page.output
        leaks = [leak for leak in PYTHON_TYPE_LEAKS if leak in page.output]
        assert not leaks, f"detkit {command} --help shows {leaks}:\n{page.output}"
        usage = page.output.splitlines()[0]
        assert usage.startswith(f"Usage: detkit {command} [OPTIONS]"), usage
    usages = {command: runner.invoke(app, [command, "--help"], prog_name="detkit").output.splitlines()[0]
              for command in ("detect", "benchmark", "convert")}
    assert usages == {"detect": "Usage: detkit detect [OPTIONS] SOURCE...",
                      "benchmark": "Usage: detkit benchmark [OPTIONS] CFG",
                      "convert": "Usage: detkit convert [OPTIONS] KIND SOURCE"}
    detect = runner.invoke(app, ["detect", "--help"]).output
    for row in ("--classes <ids>", "--conf <score>", "--out <dir>", "--batch <n>", "SOURCE...  images"):
        assert row in detect


def test_benchmark_help_names_the_unit_it_prints():
    """The rate is printed in GFLOP/s below 1 TFLOP/s (detkit.bench.BenchReport.format), so the
    help must not promise TFLOP/s only."""
    page = " ".join(CliRunner().invoke(app, ["benchmark", "--help"]).output.split())
    assert "GFLOP/s" in page and "FLOPs = 2 x MACs" in page


def test_missing_argument_is_named_as_in_the_usage_line():
    result = CliRunner().invoke(app, ["detect"], prog_name="detkit")
    assert result.exit_code == 2 and "SOURCE" in result.output and "{" not in result.output
