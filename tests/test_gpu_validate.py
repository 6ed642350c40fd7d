""".ci/gpu-validate --dry-run on the CPU: every stage leaves its line in summary.txt and
the archive holds the benchmark results, so the plumbing of the one GPU run is tested in CI."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = "install csrc smoke bench-quick tests-gpu tests-rest bench-rest profile model".split()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_dry_run_writes_every_stage_and_the_results(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "OUT": str(out), "TMPDIR": str(work), "PYTHON": sys.executable}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run = subprocess.run(
        ["bash", str(ROOT / ".ci" / "gpu-validate"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = summary.splitlines()
    assert lines[0].startswith("gpu-validate --dry-run, commit ")
    for stage in STAGES:
        assert any(line.startswith(f"{stage}: ") for line in lines), f"no {stage} line in\n{summary}"
    for stage in ("smoke", "bench-quick", "tests-gpu", "tests-rest", "profile"):
        (line,) = [line for line in lines if line.startswith(f"{stage}: ")]
        assert line.startswith(f"{stage}: ok in "), line
    assert " passed" in next(line for line in lines if line.startswith("smoke: "))
    assert lines[-1].startswith("done in ")

    with tarfile.open(out / "gpu-validate.tar.gz") as archive:
        names = archive.getnames()
        (result,) = [n for n in names if n.startswith("./results/quick/") and n.endswith(".json")]
        rows = json.load(archive.extractfile(result))["rows"]
        assert archive.extractfile("./summary.txt").read().decode() == summary
    assert {"./smoke.xml", "./tests-gpu.xml", "./tests-rest.xml", "./plan-profile.md"} <= set(names)
    assert {r["bench"] for r in rows} >= {"sigreg", "adaln_modulate_norm"}
    assert all(r["median_ms"] > 0 and r["wall_ms"] > 0 for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["gpu-validate.tar.gz", "summary.txt"]


def test_unknown_argument_is_refused(tmp_path):
    run = subprocess.run(
        ["bash", str(ROOT / ".ci" / "gpu-validate"), "--dryrun"],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "usage" in run.stderr and not list(tmp_path.iterdir())
