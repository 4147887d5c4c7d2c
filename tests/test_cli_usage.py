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
