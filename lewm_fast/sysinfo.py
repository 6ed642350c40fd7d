"""The environment record: where and with what a number was measured.

:func:`environment` is the record the benchmark results (``bench/results/*.json``, key
``"env"``), the pipeline's report (``report.json``, key ``"device"``) and ``lewm-fast info``
share: date, git commit, Python/torch/triton versions and the device (on CUDA its name,
capability and, through NVML, memory, driver and clocks; on a CPU its model name and
thread count). Nothing here runs at import; each call queries afresh.

The module is named ``sysinfo`` rather than ``environment`` so that it is not confused with
the Two-Room environments of :mod:`lewm_fast.envs`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from . import _checks

GIT_COMMIT_VAR = "LEWM_FAST_GIT_COMMIT"


def git_commit() -> str:
    """The short commit of the source tree, ``-dirty`` when tracked files changed, else ``"unknown"``.

    ``$LEWM_FAST_GIT_COMMIT`` replaces the query: a copy of the tree without ``.git`` (e.g. on
    a lent GPU machine) is told its commit.
    """
    if os.environ.get(GIT_COMMIT_VAR):
        return os.environ[GIT_COMMIT_VAR]
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        if commit:
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def triton_version() -> str | None:
    """The installed Triton's version, or None without Triton."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def nvml_info(index: int) -> dict[str, Any]:
    """NVML's view of CUDA device ``index``: name, memory, driver, clocks (and, where the board
    answers, current clocks, power limit, temperature); ``{"nvml": why}`` when NVML cannot say."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)

        def text(value):
            return value.decode() if isinstance(value, bytes) else value

        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        info = {
            "name": text(pynvml.nvmlDeviceGetName(handle)),
            "memory_total_bytes": int(memory.total),
            "memory_free_bytes": int(memory.free),
            "driver": text(pynvml.nvmlSystemGetDriverVersion()),
            "sm_clock_max_mhz": int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "mem_clock_max_mhz": int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
        }
        # Optional queries: not every board or driver answers them.
        optional = {
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, query in optional.items():
            try:
                info[key] = query()
            except Exception:  # NVMLError_NotSupported and friends
                pass
        pynvml.nvmlShutdown()
        return info
    except Exception as exc:  # NVML missing on the host, permissions, ...
        return {"nvml": f"unavailable: {exc}"}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict[str, Any]:
    """The environment record for ``device``: a flat JSON-ready dict.

    Always: ``date`` (UTC, ISO 8601), ``git_commit``, ``python``, ``torch``, ``triton`` (None
    without Triton), ``device_type``, ``device_name``. On CUDA also ``capability``
    (``"sm_90"``), ``cuda`` and the keys of :func:`nvml_info`; on a CPU ``cpu_count`` and
    ``threads`` (torch's intra-op threads).
    """
    device = torch.device(device)
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device_type": device.type,
        "triton": triton_version(),
    }
    if device.type == "cuda":
        index = _checks.with_index(device).index
        props = torch.cuda.get_device_properties(index)
        env.update(
            device_name=props.name,
            capability=f"sm_{props.major}{props.minor}",
            cuda=torch.version.cuda,
            **nvml_info(index),
        )
        env["device_name"] = env.get("name", props.name)
    else:
        env.update(device_name=cpu_name(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    return env
