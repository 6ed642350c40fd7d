"""The GPU smoke checks' reporting (tests/conftest.py): run in a child pytest on the CPU."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CHECKS = """
import pytest


@pytest.mark.smoke
def test_measures(smoke_line):
    print("captured")
    smoke_line("step 12 ms")


@pytest.mark.smoke
@pytest.mark.parametrize("x", [1, pytest.param(2, marks=pytest.mark.gpu)])
def test_fails_or_skips(x):
    assert x == 0


def test_not_smoke(smoke_line):
    smoke_line("not in the log's outcome lines")
"""


def test_smoke_log_gets_one_line_per_check_and_the_measured_lines(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: gpu\n    smoke: smoke\n")
    (tmp_path / "test_checks.py").write_text(CHECKS)
    log = tmp_path / "smoke.txt"
    env = {**os.environ, "LEWM_FAST_SMOKE_LOG": str(log), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_checks.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stdout + out.stderr  # one check fails on purpose
    assert "test_measures: step 12 ms" in out.stdout and "captured" not in out.stdout
    lines = log.read_text().splitlines()
    assert [line.split()[1] for line in lines if "::" in line] == ["PASSED", "FAILED", "SKIPPED"]
    assert lines[0] == "  test_measures: step 12 ms"  # written when measured, before the outcome line
    assert "  test_not_smoke: not in the log's outcome lines" in lines
