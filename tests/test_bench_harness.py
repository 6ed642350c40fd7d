"""The shared benchmark harness on the CPU: timing, speed-ups, result files."""

import json

import torch

from lewm_fast.bench import harness


def test_time_fn_counts_and_orders_quantiles():
    calls = []
    timing = harness.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=7)
    assert len(calls) == 9 and timing.reps == 7
    assert 0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_setup_is_not_timed_and_feeds_fn():
    seen = []
    harness.time_fn(seen.append, torch.device("cpu"), setup=lambda: len(seen), warmup=1, reps=3)
    assert seen == [0, 1, 2, 3]


def test_report_speedup_and_files(tmp_path):
    report = harness.Report("cpu")
    assert report.env["device_type"] == "cpu" and report.env["torch"] == torch.__version__
    slow = harness.Timing(10.0, 9.0, 11.0, 5)
    fast = harness.Timing(2.5, 2.0, 3.0, 5)
    report.add("toy", "n=3", "fast", "fwd", fast, **{"GB/s": 1.5})
    report.add("toy", "n=3", "reference", "fwd", slow)
    assert report.rows[0].speedup == 4.0 and report.rows[1].speedup is None
    json_path, md_path = report.save(tmp_path, "toy")
    data = json.loads(json_path.read_text())
    assert data["rows"][0]["speedup"] == 4.0 and data["env"]["git_commit"]
    table = md_path.read_text()
    assert "| toy | n=3 | fwd | fast | 2.500 (2.000-3.000) | - | 4.00x | 1.5 GB/s |" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.json", "toy.md"]


def test_benchmarks_run_on_cpu(tmp_path):
    """Every bench_<op>.py runs (reference rows only without a GPU) and writes its results."""
    from lewm_fast.bench.__main__ import available, main

    assert {"sigreg", "adaln"} <= set(available())
    assert (
        main(
            [
                "--device",
                "cpu",
                "--quick",
                "--only",
                "sigreg",
                "adaln",
                "--out",
                str(tmp_path),
                "--stem",
                "cpu",
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "cpu.json").read_text())["rows"]
    benches = {(r["bench"], r["impl"], r["phase"]) for r in rows}
    assert ("sigreg", "reference", "fwd+bwd") in benches
    assert ("adaln_modulate_norm", "reference", "bwd") in benches
    assert all(r["median_ms"] > 0 for r in rows)


def test_bench_plan_runs_reference_and_fast(monkeypatch):
    """bench_plan on a tiny setting: reference and fast rows for each case, with speed-ups."""
    from lewm_fast.bench import bench_plan

    monkeypatch.setattr(bench_plan, "QUICK_CPU", {"horizon": 3, "num_samples": 8, "n_steps": 2, "topk": 2})
    monkeypatch.setattr(bench_plan, "ENV_CASES", (1, 3))
    monkeypatch.setitem(bench_plan.SWEEPS, (False, True), ((8,), (2,)))
    report = harness.Report("cpu")
    bench_plan.run(report, quick=True)
    rows = {(r.case, r.impl): r for r in report.rows}
    assert rows[("1 env, S=8, 2 it", "reference")].median_ms > 0
    assert rows[("1 env, S=8, 2 it", "fast-fp32")].speedup is not None
    assert ("3 envs, S=8, 2 it", "fast-fp32") in rows
    assert ("sweep: 2 envs x S=8", "fast-fp32") in rows
    assert all(r.metrics["plans/s"] > 0 for r in report.rows)
