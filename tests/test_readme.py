"""The README shows what the lab does: its plugin example is docs/example_test.py, and its
"real output of istio-lab run" is what a run prints today, line for line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _block(after: str, language: str = "") -> str:
    start = README.index(f"```{language}\n", README.index(after)) + len(language) + 4
    return README[start:README.index("```\n", start)]


def test_the_plugin_example_is_the_tested_file():
    assert _block("**Your own tests**", "python") == (REPO / "docs" / "example_test.py").read_text()


@pytest.mark.kernel
def test_the_real_output_is_what_a_run_prints():
    shown = _block("full report (this machine")
    ran = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--backend", "legacy"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "120"})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == shown  # no port the kernel chose appears in the report
