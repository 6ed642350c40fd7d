"""bench/bench_train.py runs on the CPU in quick mode and reports physical units."""

from lewm_fast import LeWMConfig
from lewm_fast.bench import bench_train, harness


def test_bench_train_quick_on_cpu():
    report = harness.Report("cpu")
    bench_train.run(report, quick=True)
    rows = {(r.case, r.impl): r for r in report.rows}
    assert all(r.bench == "train" and r.phase == "step" for r in report.rows)
    main = {impl for case, impl in rows if case == "tiny-B8-fp32"}
    assert main == {"reference", "fast-whole", "fast-checkpoint", "fast-two_pass", "fast-8GiB-whole"}
    for (_case, impl), row in rows.items():
        assert row.metrics["samples/s"] > 0 and row.metrics["TFLOP/s"] > 0
        assert (row.speedup is None) == (impl == "reference")
    assert rows[("tiny-B8-fp32", "fast-8GiB-whole")].metrics["grad_rel_err"] == 0.0
    assert {case for case, _ in rows} == {"tiny-B8-fp32"}  # --quick: no batch sweep


def test_step_flops_match_the_issue_estimate():
    """About 5 TFLOP per step at batch 128 (issue 6); linear in the batch."""
    paper = LeWMConfig.preset("paper")
    flops = bench_train.step_flops(paper, 128)
    assert 5.0e12 < flops < 5.5e12
    assert abs(bench_train.step_flops(paper, 256) / flops - 2) < 1e-9
