"""The shared benchmark harness on the CPU: timing, speed-ups, result files."""

import inspect
import json

import pytest
import torch

from lewm_fast.bench import harness


def test_time_fn_counts_and_orders_quantiles():
    calls = []
    timing = harness.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=7)
    assert len(calls) == 9 and timing.reps == 7
    assert 0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms
    # On the CPU the one clock is the wall clock: the median is the wall time per call.
    assert timing.clock == "wall" and timing.wall_ms == timing.median_ms


def test_grad_to_none_clears_gradients_before_each_call():
    x = torch.ones(3, requires_grad=True)
    seen = []

    def step():
        seen.append(x.grad is None)
        (2 * x).sum().backward()

    harness.time_fn(step, torch.device("cpu"), warmup=1, reps=4, grad_to_none=[x])
    assert seen == [True] * 5 and torch.equal(x.grad, torch.full((3,), 2.0))


def test_setup_is_not_timed_and_feeds_fn():
    seen = []
    harness.time_fn(seen.append, torch.device("cpu"), setup=lambda: len(seen), warmup=1, reps=3)
    assert seen == [0, 1, 2, 3]


def test_report_speedup_and_files(tmp_path):
    report = harness.Report("cpu")
    assert report.env["device_type"] == "cpu" and report.env["torch"] == torch.__version__
    slow = harness.Timing(10.0, 9.0, 11.0, 5)
    fast = harness.Timing(2.5, 2.0, 3.0, 5, wall_ms=2.75, clock="device", kernel_ms=0.04, kernels=1234)
    report.add("toy", "n=3", "fast", "fwd", fast, **{"GB/s": 1.5})
    report.add("toy", "n=3", "reference", "fwd", slow)
    assert report.rows[0].speedup == 4.0 and report.rows[1].speedup is None
    json_path, md_path = report.save(tmp_path, "toy")
    data = json.loads(json_path.read_text())
    assert data["rows"][0]["speedup"] == 4.0 and data["env"]["git_commit"]
    assert data["rows"][0]["wall_ms"] == 2.75 and data["rows"][0]["clock"] == "device"
    assert data["rows"][1]["wall_ms"] is None and data["rows"][1]["clock"] == "wall"
    table = md_path.read_text()
    assert data["rows"][0]["kernel_ms"] == 0.04 and data["rows"][1]["kernel_ms"] is None
    assert data["rows"][0]["kernels"] == 1234 and data["rows"][1]["kernels"] is None
    assert (
        "| toy | n=3 | fwd | fast | 2.500 (2.000-3.000) | 2.750 | - | 4.00x "
        "| kernels 0.040 ms in 1,234, 1.5 GB/s |" in table
    )
    assert "| toy | n=3 | fwd | reference | 10.000 (9.000-11.000) `wall` | - | - | - | - |" in table
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
    """bench_plan on a tiny setting: reference and fast rows for each case, with speed-ups;
    no sweep with --quick, and the sweep's rows when asked for."""
    from lewm_fast.bench import bench_plan

    tiny = {"horizon": 3, "num_samples": 8, "n_steps": 2, "topk": 2}
    monkeypatch.setattr(bench_plan, "QUICK_CPU", tiny)
    monkeypatch.setattr(bench_plan, "ENV_CASES", (1, 3))
    monkeypatch.setitem(bench_plan.SWEEPS, False, ((8,), (2,)))
    report = harness.Report("cpu")
    bench_plan.run(report, quick=True)
    rows = {(r.case, r.impl): r for r in report.rows}
    assert rows[("1 env, S=8, 2 it", "reference")].median_ms > 0
    assert rows[("1 env, S=8, 2 it", "fast-fp32")].speedup is not None
    assert ("3 envs, S=8, 2 it", "fast-fp32") in rows
    assert not any(case.startswith("sweep") for case, _ in rows)
    fast_model, _, config = bench_plan._models(torch.device("cpu"))
    size, width = config.encoder.image_size, config.action_encoder.input_dim
    bench_plan._sweep(report, fast_model, width, size, tiny, ("fast-fp32", None), {"warmup": 0, "reps": 1})
    assert report.rows[-1].case == "sweep: 2 envs x S=8" and report.rows[-1].impl == "fast-fp32"
    assert all(r.metrics["plans/s"] > 0 for r in report.rows)


def test_do_bench_keywords_exist_in_installed_triton():
    """The keywords harness passes to triton.testing.do_bench are in its signature."""
    triton_testing = pytest.importorskip("triton.testing")
    params = inspect.signature(triton_testing.do_bench).parameters
    assert {"warmup", "rep", "grad_to_none", "quantiles"} <= set(params)


@pytest.mark.gpu
def test_time_fn_on_cuda_reports_device_and_wall_time():
    a = torch.randn(1024, 1024, device="cuda", requires_grad=True)
    for setup in (None, lambda: a):
        fn = (lambda: (a @ a).sum().backward()) if setup is None else (lambda t: (t @ t).sum().backward())
        timing = harness.time_fn(fn, torch.device("cuda"), setup=setup, reps=10, grad_to_none=[a])
        assert timing.clock == "device" and timing.reps >= 3
        assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms and timing.wall_ms > 0
        # the matmul backward's kernels: at least the 2 GFLOP of a @ a, at most the device time
        assert timing.kernel_ms is not None and 0 < timing.kernel_ms <= 2 * timing.median_ms
        assert timing.kernels is not None and timing.kernels >= 1


def test_kernel_time_is_none_without_cuda_and_says_why():
    """Off CUDA the profiler has no kernels to sum: kernel_profile warns and gives None, and
    time_fn leaves Timing.kernel_ms and Timing.kernels unset (it measures only CUDA calls)."""
    call = harness._Call(lambda: torch.ones(3).sum(), None)
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    with pytest.warns(RuntimeWarning, match="kernel time not measured"):
        assert harness.kernel_profile(call) is None
    timing = harness.time_fn(lambda: torch.ones(3).sum(), torch.device("cpu"), reps=3)
    assert timing.kernel_ms is None and timing.kernels is None
