"""bench/bench_eval.py runs the reference and fast evaluations on the CPU and links speed-ups."""

from lewm_fast.bench import bench_eval, harness


def test_bench_eval_runs_reference_and_fast(monkeypatch):
    monkeypatch.setattr(bench_eval, "QUICK_CPU", {"episodes": 3, "num_samples": 8, "n_steps": 1, "topk": 2})
    monkeypatch.setattr(bench_eval, "DATASET_EPISODES", 6)
    report = harness.Report("cpu")
    bench_eval.run(report, quick=True)
    rows = {(r.impl, r.phase): r for r in report.rows}
    assert set(rows) == {
        ("reference", "eval"),
        ("reference", "plan"),
        ("fast-fp32 cold", "eval"),
        ("fast-fp32", "eval"),
        ("fast-fp32", "plan"),
    }
    assert {r.bench for r in report.rows} == {"eval"}
    assert all(r.median_ms > 0 for r in report.rows)
    assert rows[("fast-fp32", "eval")].speedup is not None and rows[("fast-fp32", "plan")].speedup is not None
    assert rows[("reference", "plan")].reps in (1, 2)  # two 25-step plans, one if every episode succeeds
    assert rows[("fast-fp32", "eval")].metrics["episodes/s"] > 0
    assert 0 <= rows[("reference", "eval")].metrics["success %"] <= 100
