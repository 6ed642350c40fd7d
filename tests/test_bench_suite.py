"""The benchmark suite around the harness: `lewm-fast bench` on the CPU, measured peaks,
the pipeline projection on synthetic rows, and the README results section."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lewm_fast import cli
from lewm_fast.bench import projection, readme

ROOT = Path(__file__).resolve().parents[1]


def test_lewm_fast_bench_quick_on_cpu(tmp_path, capsys):
    assert cli.main(["bench", "--device", "cpu", "--quick", "--only", "sigreg", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.with_suffix(".md").is_file() and json_path.name.endswith(".json")
    data = json.loads(json_path.read_text())
    peak = data["env"]["peak"]
    assert set(peak["matmul_tflops"]) | set(peak["errors"]) >= {"float32"}
    assert peak["matmul_tflops"]["float32"] > 0 and peak["copy_gbps"] > 0
    assert {r["bench"] for r in data["rows"]} == {"sigreg"}
    proj = data["projection"]
    assert proj["reference"]["train"] is None and proj["fast"]["total_seconds"] is None
    assert any("no bench=train/phase=step row" in why for why in proj["fast"]["missing"])
    md = json_path.with_suffix(".md").read_text()
    assert "Measured peaks: matmul" in md and "| reference | not measured |" in md
    assert "[bench] wrote" in capsys.readouterr().out


def test_bench_cli_errors_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--only", "no-such-bench"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "tpu"])
    assert "--device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--update-readme", "--readme", str(tmp_path / "missing.md")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0 and "usage: lewm-fast bench" in capsys.readouterr().out
    # python -m bench keeps working from the repository root
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--update-readme" in out.stdout


# ------------------------------------------------------------------ projection
def _row(bench, case, impl, phase, ms, **metrics):
    return {
        "bench": bench,
        "case": case,
        "impl": impl,
        "phase": phase,
        "median_ms": ms,
        "p20_ms": ms,
        "p80_ms": ms,
        "reps": 5,
        "peak_extra_bytes": None,
        "metrics": metrics,
        "speedup": None,
    }


def _train(impl, ms, batch=128, case=None):
    return _row(
        "train", case or f"whole batch {batch}", impl, "step", ms, **{"samples/s": batch / (ms / 1e3)}
    )


PLAN_ROWS = [
    _row("plan", "1 env, S=300, 30 it", "reference", "plan", 1500.0),
    _row("plan", "1 env, S=300, 30 it", "fast-bf16-graph", "plan", 20.0),
    _row("plan", "50 envs, S=300, 30 it", "fast-fp32-graph", "plan", 90.0),
    _row("plan", "50 envs, S=300, 30 it", "fast-bf16-graph", "plan", 60.0),
    _row("plan", "sweep: 50 envs x S=300", "fast-bf16-graph", "plan", 1.0),  # sweeps are not the protocol
]


def test_projection_from_train_and_plan_rows():
    rows = [_train("reference", 400.0), _train("fast", 150.0), _train("fast-8GiB", 190.0)] + PLAN_ROWS
    rows += [_train("fast", 10.0, batch=32)]  # other batch sizes are ignored, not rescaled
    proj = projection.project(rows)
    ref, fast = proj["reference"], proj["fast"]
    assert ref["train"]["step_ms"] == 400.0 and fast["train"]["impl"] == "fast"
    assert ref["train"]["seconds"]["10"] == pytest.approx(0.4 * 5138 * 10)
    assert fast["train"]["seconds"]["100"] == pytest.approx(0.15 * 5138 * 100)
    assert ref["eval"]["seconds"] == pytest.approx(100 * 1.5)  # 50 episodes x 2 plans, one env at a time
    assert fast["eval"]["seconds"] == pytest.approx(2 * 0.06) and fast["eval"]["impl"] == "fast-bf16-graph"
    assert ref["total_seconds"]["100"] == pytest.approx(0.4 * 5138 * 100 + 150.0)
    assert fast["total_seconds"]["10"] == pytest.approx(0.15 * 5138 * 10 + 0.12)
    assert ref["missing"] == [] and fast["missing"] == []
    md = projection.projection_markdown(proj, {"device_type": "cuda"})
    assert "| reference | 400.0 ms (reference) | 5.71 h | 57.09 h | 2.5 min (reference) |" in md
    assert "reduced models" not in md


def test_projection_says_not_measured():
    proj = projection.project([_train("reference", 100.0, batch=64), PLAN_ROWS[1]])
    assert proj["reference"]["train"] is None and proj["reference"]["eval"] is None
    assert "rows at batch [64] are not rescaled" in proj["reference"]["missing"][0]
    assert proj["fast"]["eval"]["seconds"] == pytest.approx(100 * 0.02)  # only the 1-env case
    assert proj["fast"]["train"] is None and proj["fast"]["total_seconds"] is None
    assert projection.project([])["fast"]["missing"]  # nothing measured: nothing projected


def test_projection_prefers_whole_eval_rows_and_reads_batch_from_case():
    rows = [
        _row("train", "B=128 whole", "reference", "step", 300.0),  # no samples/s: batch from the case
        _row("eval", "50 episodes", "fast", "eval", 8000.0),
    ] + PLAN_ROWS
    proj = projection.project(rows)
    assert proj["reference"]["train"]["step_ms"] == 300.0
    assert proj["fast"]["eval"]["seconds"] == 8.0 and proj["fast"]["eval"]["source"].startswith("eval row")
    assert projection.row_batch({"case": "batch 256", "metrics": {}}) == 256
    assert projection.row_batch({"case": "whole", "metrics": {}}) is None


# ------------------------------------------------------------------ README section
def _result(device, date, rows):
    env = {"device_name": device, "date": date, "torch": "2.11", "git_commit": "abc", "device_type": "cuda"}
    env["peak"] = {"matmul_tflops": {"bfloat16": 700.0}, "copy_gbps": 2900.0}
    return {"env": env, "rows": rows}


RESULT_ROWS = [
    _row("sigreg", "T4-B128-D192-P1024-K17", "reference", "fwd+bwd", 10.0),
    _row("sigreg", "T4-B128-D192-P1024-K17", "triton", "fwd+bwd", 0.5),
    _row("sigreg", "T4-B128-D192-P1024-K17", "triton", "fwd", 0.1),
    _train("reference", 400.0),
    _train("fast", 150.0),
] + PLAN_ROWS


def _readme_copy(tmp_path):
    path = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", path)
    return path


def test_readme_sections_are_in_sync_with_the_committed_results(tmp_path):
    """README's generated sections are what `lewm-fast bench --update-readme` makes of the
    committed bench/results and bench/model/model.json (copied beside a copy of README)."""
    path = _readme_copy(tmp_path)
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    committed = readme._tracked(ROOT / "bench" / "results")
    for file in (ROOT / "bench" / "results").glob("*.json"):
        if committed is None or file.resolve() in committed:
            shutil.copy(file, results)
    shutil.copy(ROOT / "bench" / "model" / "model.json", results.parent / "model.json")
    model_json = results.parent / "model.json"
    assert readme.update_readme(path, results, tracked_only=False, model_json=model_json) is False
    assert path.read_text() == (ROOT / "README.md").read_text()


def test_readme_section_without_results_says_not_yet_measured(tmp_path):
    path = _readme_copy(tmp_path)
    readme.update_readme(path, tmp_path / "no-results", tracked_only=False)
    assert "| training step, batch 128 | — | not yet measured | not yet measured | — |" in path.read_text()
    assert "Projected paper-recipe pipeline wall-clock: not yet measured." in path.read_text()


def test_readme_regenerated_from_newest_result_per_device(tmp_path):
    path = _readme_copy(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    old = [_row("sigreg", "T4-B128-D192-P1024-K17", "reference", "fwd+bwd", 99.0)]
    (results / "h100-old.json").write_text(json.dumps(_result("NVIDIA H100", "2026-01-01T00:00:00", old)))
    new = _result("NVIDIA H100", "2026-02-01T00:00:00", RESULT_ROWS)
    (results / "h100-new.json").write_text(json.dumps(new))
    (results / "broken.json").write_text("{not json")
    assert readme.update_readme(path, results, tracked_only=False) is True
    text = path.read_text()
    section = text[text.index(readme.BEGIN) : text.index(readme.END)]
    expected = [
        ("SIGReg fwd+bwd (T=4, B=128, D=192, P=1024, K=17)", "10 ms", "0.5 ms (triton)", "20.00x"),
        ("plan latency, 50 envs together (300 x 30 CEM)", "not yet measured", "60 ms (fast-bf16-graph)", "—"),
        ("training step, batch 128", "400 ms", "150 ms (fast)", "2.67x"),
    ]
    for label, ref, fast, speed in expected:
        assert f"| {label} | NVIDIA H100 | {ref} | {fast} | {speed} |" in section
    assert "| NVIDIA H100 | fast | 2.14 h | 21.41 h |" in section
    assert "99" not in section and "h100-new.json" in section and "700 TFLOP/s bfloat16" in section
    assert text.endswith((ROOT / "README.md").read_text().split(readme.END)[1])  # the rest is untouched
    assert readme.update_readme(path, results, tracked_only=False) is False  # idempotent


def test_readme_uses_committed_results_only(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    path = _readme_copy(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    subprocess.run([git, "init", "-q"], cwd=tmp_path, check=True)
    (results / "a100.json").write_text(json.dumps(_result("NVIDIA A100", "2026-01-01", RESULT_ROWS)))
    (results / "h200.json").write_text(json.dumps(_result("NVIDIA H200", "2026-03-01", RESULT_ROWS)))
    subprocess.run([git, "add", "results/a100.json"], cwd=tmp_path, check=True)
    readme.update_readme(path, results)
    assert "NVIDIA A100" in path.read_text() and "NVIDIA H200" not in path.read_text()
    args = ["--update-readme", "--readme", str(path), "--results", str(results), "--include-uncommitted"]
    assert cli.main(["bench", *args]) == 0
    assert "NVIDIA H200" in path.read_text()


def test_readme_markers_are_required(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench:begin"):
        readme.update_readme(path, tmp_path)
    path.write_text(f"{readme.END}\n{readme.BEGIN}\n")
    with pytest.raises(ValueError, match="once each"):
        readme.update_readme(path, tmp_path)


@pytest.mark.gpu
def test_peaks_and_nvml_on_cuda():
    import torch

    from lewm_fast.bench import harness
    from lewm_fast.sysinfo import environment

    env = environment(torch.device("cuda"))
    assert env["device_name"] and (env.get("driver") or env.get("nvml"))
    peak = harness.measure_peaks(torch.device("cuda"), quick=True)
    assert peak["matmul_tflops"]["bfloat16"] > 0 and peak["copy_gbps"] > 0 and not peak["errors"]


def test_a_failing_benchmark_keeps_the_others_rows(tmp_path, monkeypatch, capsys):
    """One benchmark raising does not lose the rows measured before and after it; exit code 1."""
    from lewm_fast.bench import __main__ as bench_main
    from lewm_fast.bench import bench_sigreg

    def broken(report, quick):
        raise RuntimeError("CUDA error: invalid configuration argument")

    monkeypatch.setattr(bench_main, "available", lambda: ["adaln", "sigreg"])
    monkeypatch.setattr(bench_sigreg, "run", broken)
    monkeypatch.setenv("LEWM_FAST_GIT_COMMIT", "0123456789ab")
    args = ["--device", "cpu", "--quick", "--no-peaks", "--out", str(tmp_path), "--stem", "r"]
    assert bench_main.main(args) == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["env"]["failed"] == {"sigreg": "RuntimeError: CUDA error: invalid configuration argument"}
    assert data["env"]["git_commit"] == "0123456789ab"
    assert data["rows"] and all(row["bench"].startswith("adaln") for row in data["rows"])
    assert "Failed: sigreg (RuntimeError" in (tmp_path / "r.md").read_text()
    assert "sigreg FAILED" in capsys.readouterr().out


def test_plan_profile_on_cpu(tmp_path):
    """profile_plan reports wall time, the call count and the top operators of one solve."""
    from lewm_fast.bench import profile_plan

    out = tmp_path / "profile.md"
    args = ["--device", "cpu", "--envs", "1", "--steps", "1", "--top", "3", "--out", str(out)]
    assert profile_plan.main(args) == 0
    text = out.read_text()
    assert "### 1 env, fp32, S=300, 1 iterations (CPU)" in text and "eager solve:" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 and all(float(r.split("|")[3]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        profile_plan.main(["--device", "cpu", "--steps", "0"])
