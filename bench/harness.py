"""The shared benchmark harness: timing, peak memory, environment and result files.

Every benchmark module ``bench_<op>.py`` defines ``run(report: Report, quick: bool)`` and
records the reference and the fast path measured in the same process on the same
device. Timing uses CUDA events on a GPU (``time.perf_counter`` on CPU), excludes
warm-up and reports the median with 20/80 % quantiles. Results are JSON rows plus the
environment (device through NVML, driver, clocks, torch/triton versions, git commit);
``Report.markdown()`` renders the table the README quotes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and 20/80 % quantiles over ``reps`` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


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


def time_fn(
    fn: Callable[..., Any],
    device: torch.device,
    *,
    setup: Callable[[], Any] | None = None,
    warmup: int = 5,
    reps: int = 30,
    max_seconds: float = 20.0,
) -> Timing:
    """Time ``fn(setup())`` (or ``fn()``); ``setup`` runs before each call and is not timed.

    Stops early (keeping at least 3 timed calls) once ``max_seconds`` of timed work has
    accumulated, so slow reference paths do not stall a whole benchmark run.
    """
    call = (lambda: fn(setup())) if setup is not None else fn
    for _ in range(warmup):
        call()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    for _ in range(reps):
        arg = setup() if setup is not None else None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg) if setup is not None else fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(arg) if setup is not None else fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
        if spent > max_seconds and len(times) >= 3:
            break
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


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


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        commit = out.stdout.strip()
        if commit:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _nvml_info(index: int) -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)

        def text(value):
            return value.decode() if isinstance(value, bytes) else value

        info = {
            "name": text(pynvml.nvmlDeviceGetName(handle)),
            "memory_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "driver": text(pynvml.nvmlSystemGetDriverVersion()),
            "sm_clock_max_mhz": int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "mem_clock_max_mhz": int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
        }
        pynvml.nvmlShutdown()
        return info
    except Exception as exc:  # NVML missing on the host, permissions, ...
        return {"nvml": f"unavailable: {exc}"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device_type": device.type,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(
            device_name=props.name,
            capability=f"sm_{props.major}{props.minor}",
            cuda=torch.version.cuda,
            **_nvml_info(index),
        )
        env["device_name"] = env.get("name", props.name)
    else:
        env.update(device_name=_cpu_name(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    return env


@dataclass
class Row:
    bench: str
    case: str
    impl: str  # "reference" or the fast path's name
    phase: str  # "fwd", "bwd", "fwd+bwd", "plan", "step", ...
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    peak_extra_bytes: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # physical units: "TFLOP/s", "GB/s", ...
    speedup: float | None = None  # reference median / this median, same bench/case/phase


class Report:
    """Collects rows for one device; computes speed-ups against the reference rows."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.env = environment(self.device)
        self.rows: list[Row] = []

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
        return {"env": self.env, "rows": [asdict(r) for r in self.rows]}

    def default_stem(self) -> str:
        name = "".join(c if c.isalnum() else "-" for c in str(self.env.get("device_name", "device")))
        name = "-".join(p for p in name.lower().split("-") if p)
        return f"{name}-{self.env['date'][:10]}"

    def save(self, folder: str | os.PathLike, stem: str | None = None) -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.md`` atomically into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = stem or self.default_stem()
        paths = (folder / f"{stem}.json", folder / f"{stem}.md")
        for path, text in zip(paths, (json.dumps(self.to_dict(), indent=2) + "\n", self.markdown())):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
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
            "| bench | case | phase | impl | median ms (p20-p80) | peak extra MiB | speed-up | units |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            mem = "-" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 2**20:.1f}"
            speed = "-" if r.speedup is None else f"{r.speedup:.2f}x"
            units = ", ".join(f"{v:.3g} {k}" for k, v in r.metrics.items()) or "-"
            lines.append(
                f"| {r.bench} | {r.case} | {r.phase} | {r.impl} | {r.median_ms:.3f} "
                f"({r.p20_ms:.3f}-{r.p80_ms:.3f}) | {mem} | {speed} | {units} |"
            )
        return "\n".join(lines) + "\n"
