"""The shared benchmark harness: timing, peak memory, environment and result files.

Every benchmark module ``bench_<op>.py`` defines ``run(report: Report, quick: bool)`` and
records the reference and the fast path measured in the same process on the same
device. Timing (:func:`time_fn`) excludes warm-up and reports the median with 20/80 %
quantiles of the device time per call on a GPU (``triton.testing.do_bench``: CUDA events,
L2 flushed before each call) and, separately, the wall time per call with the device
synchronised (``time.perf_counter``; the only clock on a CPU). Results are JSON rows plus the
environment record of :func:`lewm_fast.sysinfo.environment` (device through NVML, driver,
clocks, torch/triton versions, git commit); ``Report.markdown()`` renders the table the
README quotes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lewm_fast.sysinfo import environment


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call.

    ``median_ms``, ``p20_ms``, ``p80_ms``: quantiles over ``reps`` timed calls of the clock
    ``clock`` names: ``"device"`` (CUDA events around each call, the L2 cache flushed
    before it, calls queued back to back) or ``"wall"`` (``time.perf_counter``; the CPU).
    ``wall_ms``: the median wall time of one call with the device synchronised before and
    after it (launches, device work and the final synchronisation). On CUDA it exceeds the
    device time when the host's launches, not the GPU, set the pace.
    ``kernel_ms``: the device time of the call's kernels alone (torch.profiler, summed per
    call; CUDA, calls under :data:`KERNEL_TIME_MAX_WALL_MS` only). Where it is far below
    ``median_ms`` the GPU waited for the host: the first H200 run timed the fused AdaLN-Zero
    and SIGReg ops by their host time.
    ``kernels``: device kernels per call counted by the same profile (launches, including
    those a CUDA graph replays), the measured counterpart of the performance model's count.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    wall_ms: float | None = None
    clock: str = "wall"
    kernel_ms: float | None = None
    kernels: float | None = None


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# triton.testing.do_bench calls fn once, 5 times to estimate its time, once to warm up
# (warmup=0 rounds up to one call in every Triton release), then the timed calls.
_DO_BENCH_UNTIMED_CALLS = 7
_L2_FLUSH_BYTES = 256 * 2**20  # what do_bench zeroes between calls; above any GPU's L2


def _clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def _wall_times(call, device, grad_to_none, reps: int, max_seconds: float) -> list[float]:
    """Wall ms of up to ``reps`` calls, the device synchronised around each; >= 3 calls."""
    times: list[float] = []
    spent = 0.0
    for _ in range(reps):
        arg = call.setup() if call.setup is not None else None
        _clear_grads(grad_to_none)
        synchronize(device)
        t0 = time.perf_counter()
        call.run(arg)
        synchronize(device)
        ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
        if spent > max_seconds and len(times) >= 3:
            break
    return times


def _do_bench_times(fn, grad_to_none, reps: int, wall_ms: float) -> tuple[list[float], int]:
    """(p50, p20, p80) device ms of ``fn`` from ``triton.testing.do_bench``, and its timed calls.

    Keywords used (``warmup``, ``rep``, ``grad_to_none``, ``quantiles``) mean the same from
    Triton 2.1 to 3.9; ``return_mode`` and ``fast_flush`` changed and are not passed. With
    several quantiles every release returns a list.
    """
    from triton.testing import do_bench

    calls = 0

    def counted():
        nonlocal calls
        calls += 1
        fn()

    # rep is the timed duration in ms: about ``reps`` calls at the wall time per call (more
    # when the device time, which do_bench estimates, is below it).
    quantiles = do_bench(
        counted,
        warmup=0,
        rep=max(reps * wall_ms, 1e-3),
        grad_to_none=list(grad_to_none) or None,
        quantiles=[0.5, 0.2, 0.8],
    )
    return [float(q) for q in quantiles], max(1, calls - _DO_BENCH_UNTIMED_CALLS)


def _event_times(call, device, grad_to_none, reps, max_seconds, flush_l2) -> list[float]:
    """Device ms of up to ``reps`` calls between CUDA events, queued back to back as do_bench
    does (``setup`` runs outside the events); the L2 cache zeroed before each when asked."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
    events = []
    t0 = time.perf_counter()
    for _ in range(reps):
        arg = call.setup() if call.setup is not None else None
        _clear_grads(grad_to_none)
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call.run(arg)
        end.record()
        events.append((start, end))
        if time.perf_counter() - t0 > max_seconds and len(events) >= 3:
            break
    synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


@dataclass(frozen=True)
class _Call:
    fn: Callable[..., Any]
    setup: Callable[[], Any] | None

    def run(self, arg: Any) -> Any:
        return self.fn(arg) if self.setup is not None else self.fn()


def time_fn(
    fn: Callable[..., Any],
    device: torch.device,
    *,
    setup: Callable[[], Any] | None = None,
    warmup: int = 5,
    reps: int = 30,
    max_seconds: float = 20.0,
    grad_to_none: Sequence[torch.Tensor] = (),
    flush_l2: bool = True,
) -> Timing:
    """Time ``fn(setup())`` (or ``fn()``); ``setup`` runs before each call and is not timed.

    After ``warmup`` calls: ``reps`` calls with the device synchronised around each give
    the wall time per call. On CUDA a second set of calls gives the device time per call:
    ``triton.testing.do_bench`` (CUDA events, L2 flushed, quantiles) when there is no
    ``setup``, ``flush_l2`` holds and its extra untimed calls fit in ``max_seconds``; else
    the same method in a loop here (CUDA events, calls back to back, L2 flushed unless
    ``flush_l2`` is False). ``grad_to_none`` tensors get ``.grad = None`` before each call, so a
    timed backward does not also time the accumulation into an old gradient.

    Each set stops early (keeping at least 3 timed calls) once ``max_seconds`` of timed work
    has accumulated, so slow reference paths do not stall a whole benchmark run.
    """
    call = _Call(fn, setup)
    for _ in range(warmup):
        _clear_grads(grad_to_none)
        call.run(call.setup() if setup is not None else None)
    synchronize(device)
    wall = sorted(_wall_times(call, device, grad_to_none, reps, max_seconds))
    wall_ms = statistics.median(wall)
    if device.type != "cuda":
        return Timing(wall_ms, _quantile(wall, 0.2), _quantile(wall, 0.8), len(wall), wall_ms, "wall")
    fits = (_DO_BENCH_UNTIMED_CALLS + reps) * wall_ms <= max_seconds * 1e3
    profiled = kernel_profile(call, grad_to_none, wall_ms) if wall_ms <= KERNEL_TIME_MAX_WALL_MS else None
    kernel_ms, kernels = profiled or (None, None)
    if setup is None and flush_l2 and fits and _has_do_bench():
        (median, p20, p80), count = _do_bench_times(fn, grad_to_none, reps, wall_ms)
        return Timing(median, p20, p80, count, wall_ms, "device", kernel_ms, kernels)
    times = sorted(_event_times(call, device, grad_to_none, reps, max_seconds, flush_l2))
    return Timing(
        statistics.median(times),
        _quantile(times, 0.2),
        _quantile(times, 0.8),
        len(times),
        wall_ms,
        "device",
        kernel_ms,
        kernels,
    )


# Calls up to 5 s are profiled (a 50-env plan, 3.2 s on the first H200 run, included), in as
# many calls as fit in about a second (at least one, at most KERNEL_TIME_CALLS).
KERNEL_TIME_MAX_WALL_MS = 5000.0
KERNEL_TIME_CALLS = 5
KERNEL_TIME_BUDGET_MS = 1000.0


def device_time_us(event) -> float:
    """A profiler event's own device time in microseconds (``self_device_time_total``, named
    ``self_cuda_time_total`` before torch 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def kernel_profile(
    call: _Call, grad_to_none: Sequence[torch.Tensor] = (), wall_ms: float = 0.0
) -> tuple[float, float] | None:
    """(milliseconds of CUDA kernel time, number of CUDA kernels) per call of ``call``
    (torch.profiler over ``1 .. KERNEL_TIME_CALLS`` calls, as many as take about
    ``KERNEL_TIME_BUDGET_MS`` at ``wall_ms`` each; their ``setup`` runs before, outside the
    profile), or None where the profiler cannot give them (it then warns; the timing goes on)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    calls = max(1, min(KERNEL_TIME_CALLS, int(KERNEL_TIME_BUDGET_MS // max(wall_ms, 1e-3))))
    try:
        args = [call.setup() if call.setup is not None else None for _ in range(calls)]  # not profiled
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for arg in args:
                _clear_grads(grad_to_none)
                call.run(arg)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as error:  # a profiler failure must not cost the timing
        warnings.warn(
            f"kernel time not measured: {type(error).__name__}: {error}", RuntimeWarning, stacklevel=2
        )
        return None
    return sum(device_time_us(e) for e in kernels) / 1e3 / calls, len(kernels) / calls


def _has_do_bench() -> bool:
    try:
        from triton.testing import do_bench  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Whether the fused Triton kernels can be benchmarked on ``device`` (CUDA with triton)."""
    from lewm_fast import backend

    return device.type == "cuda" and backend.triton_unavailable_reason(torch.empty(1, device=device)) is None


def peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at peak by ``fn()`` beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: dict) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_fn(lambda: torch.mm(a, b, out=c), device, **reps)
    return 2 * n**3 / (timing.median_ms * 1e9)


def _copy_gbps(device: torch.device, nbytes: int, reps: dict) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, **reps)
    return 2 * nbytes / (timing.median_ms * 1e6)  # bytes read + bytes written


def measure_peaks(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """Measured (not datasheet) peak rates of ``device``, taken at the start of a benchmark run.

    - ``matmul_tflops`` {dtype: TFLOP/s}: ``torch.mm`` of two n x n matrices, 2 n^3 flops,
      for bfloat16 and float32 (n = 8192 on CUDA, 1024 on CPU; halved with ``quick``).
      float32 on CUDA runs as the process is configured (``matmul_allow_tf32`` records it).
    - ``copy_gbps``: ``dst.copy_(src)`` of ``copy_bytes`` (1 GiB on CUDA, 64 MiB on CPU;
      a quarter with ``quick``), counting bytes read + written.

    A dtype the device cannot run is recorded under ``errors``; nothing raises.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = (8192 if cuda else 1024) // (2 if quick else 1)
    nbytes = (2**30 if cuda else 64 * 2**20) // (4 if quick else 1)
    reps = {"warmup": 3 if quick else 5, "reps": 10 if quick else 30, "max_seconds": 5.0}
    out: dict[str, Any] = {"matmul_n": n, "matmul_tflops": {}, "copy_bytes": nbytes, "errors": {}}
    if cuda:
        from lewm_fast.backend import tf32_state  # reading allow_tf32 can raise on torch >= 2.9

        out["matmul_allow_tf32"] = tf32_state()["matmul"]
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        try:
            out["matmul_tflops"][name] = _matmul_tflops(device, dtype, n, reps)
        except (RuntimeError, TypeError) as exc:
            out["errors"][f"matmul_{name}"] = f"{type(exc).__name__}: {exc}"
    try:
        out["copy_gbps"] = _copy_gbps(device, nbytes, reps)
    except RuntimeError as exc:
        out["errors"]["copy"] = f"{type(exc).__name__}: {exc}"
    if cuda:
        torch.cuda.empty_cache()
    return out


@dataclass
class Row:
    bench: str
    case: str
    impl: str  # "reference" or the fast path's name
    phase: str  # "fwd", "bwd", "fwd+bwd", "plan", "step", ...
    median_ms: float  # with p20_ms, p80_ms: the time Timing.clock names (device on CUDA)
    p20_ms: float
    p80_ms: float
    reps: int
    peak_extra_bytes: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # physical units: "TFLOP/s", "GB/s", ...
    speedup: float | None = None  # reference median / this median, same bench/case/phase
    wall_ms: float | None = None  # median wall time per call, device synchronised (Timing.wall_ms)
    clock: str = "wall"  # "device" or "wall": what median_ms measures
    kernel_ms: float | None = None  # device time of the call's kernels alone (Timing.kernel_ms)
    kernels: float | None = None  # device kernels per call (Timing.kernels)


class Report:
    """Collects rows for one device; computes speed-ups against the reference rows."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.env = environment(self.device)
        self.rows: list[Row] = []
        self.projection: dict[str, Any] | None = None  # see .projection.project

    def add(
        self,
        bench: str,
        case: str,
        impl: str,
        phase: str,
        timing: Timing,
        peak_extra_bytes: int | None = None,
        **metrics: float,
    ) -> Row:
        row = Row(
            bench,
            case,
            impl,
            phase,
            timing.median_ms,
            timing.p20_ms,
            timing.p80_ms,
            timing.reps,
            peak_extra_bytes,
            dict(metrics),
            wall_ms=timing.wall_ms,
            clock=timing.clock,
            kernel_ms=timing.kernel_ms,
            kernels=timing.kernels,
        )
        self.rows.append(row)
        self._link()
        return row

    def _link(self) -> None:
        ref = {(r.bench, r.case, r.phase): r for r in self.rows if r.impl == "reference"}
        for r in self.rows:
            base = ref.get((r.bench, r.case, r.phase))
            if r.impl != "reference" and base is not None and r.median_ms > 0:
                r.speedup = base.median_ms / r.median_ms

    def to_dict(self) -> dict[str, Any]:
        out = {"env": self.env, "rows": [asdict(r) for r in self.rows]}
        if self.projection is not None:
            out["projection"] = self.projection
        return out

    def default_stem(self) -> str:
        name = "".join(c if c.isalnum() else "-" for c in str(self.env.get("device_name", "device")))
        name = "-".join(p for p in name.lower().split("-") if p)
        return f"{name}-{self.env['date'][:10]}"

    def save(self, folder: str | os.PathLike, stem: str | None = None) -> tuple[Path, Path]:
        """Write ``<stem>.json`` (non-finite numbers as null) and ``<stem>.md`` atomically into ``folder``."""
        from lewm_fast._io import write_json_atomic, write_text_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = stem or self.default_stem()
        paths = (folder / f"{stem}.json", folder / f"{stem}.md")
        write_json_atomic(paths[0], self.to_dict())
        write_text_atomic(paths[1], self.markdown())
        return paths

    def markdown(self) -> str:
        env = self.env
        lines = [
            f"Device: **{env.get('device_name')}** ({env.get('device_type')}"
            + (f", driver {env['driver']}" if env.get("driver") else "")
            + f"), "
            f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('git_commit')}, "
            f"{env.get('date')}",
            "",
        ]
        peak = env.get("peak")
        if peak:
            rates = ", ".join(f"{v:.3g} TFLOP/s {k}" for k, v in peak.get("matmul_tflops", {}).items())
            copy = peak.get("copy_gbps")
            lines += [
                f"Measured peaks: matmul {rates or 'not measured'} (n={peak.get('matmul_n')}); "
                f"copy {'not measured' if copy is None else f'{copy:.4g} GB/s'}.",
                "",
            ]
        if env.get("failed"):
            lines += [
                "Failed: " + "; ".join(f"{name} ({why})" for name, why in env["failed"].items()),
                "",
            ]
        device_rows = any(r.clock == "device" for r in self.rows)
        lines += [
            (
                "ms (p20-p80): device time per call (CUDA events, L2 flushed before each call), "
                "marked `wall` on rows timed by the wall clock; "
                if device_rows
                else "ms (p20-p80): wall time per call; "
            )
            + "wall ms: median wall time per call, the device synchronised around it"
            + (
                "; kernels: device time of the call's kernels alone (torch.profiler)." if device_rows else "."
            ),
            "",
            "| bench | case | phase | impl | ms (p20-p80) | wall ms | peak extra MiB | speed-up | units |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            mem = "-" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 2**20:.1f}"
            speed = "-" if r.speedup is None else f"{r.speedup:.2f}x"
            units = ", ".join(f"{v:.3g} {k}" for k, v in r.metrics.items()) or "-"
            if r.kernel_ms is not None:
                count = "" if r.kernels is None else f" in {r.kernels:,.0f}"
                units = f"kernels {r.kernel_ms:.3f} ms{count}" + ("" if units == "-" else f", {units}")
            wall = "-" if r.wall_ms is None else f"{r.wall_ms:.3f}"
            mark = " `wall`" if device_rows and r.clock == "wall" else ""
            lines.append(
                f"| {r.bench} | {r.case} | {r.phase} | {r.impl} | {r.median_ms:.3f} "
                f"({r.p20_ms:.3f}-{r.p80_ms:.3f}){mark} | {wall} | {mem} | {speed} | {units} |"
            )
        if self.projection is not None:
            from .projection import projection_markdown

            lines += ["", projection_markdown(self.projection, self.env)]
        return "\n".join(lines).rstrip() + "\n"
