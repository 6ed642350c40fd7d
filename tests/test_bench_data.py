"""bench/bench_data.py runs on the CPU in quick mode and reports physical units."""

from lewm_fast.bench import bench_data, harness


def test_bench_data_quick_on_cpu():
    report = harness.Report("cpu")
    bench_data.run(report, quick=True)
    rows = {(r.case, r.impl): r for r in report.rows}
    assert {impl for _, impl in rows} == {"reference", "lewm_fast", "stored", "rendered"}
    render = rows[("render N=32", "lewm_fast")]
    assert render.metrics["frames/s"] > 0 and render.speedup is not None
    for impl in ("stored", "rendered"):
        assert rows[("windows B=16", impl)].metrics["windows/s"] > 0
