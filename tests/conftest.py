"""Test configuration: the CPU interpreter switch, GPU skips, seeding, TF32 and smoke reporting.

Markers (registered in pyproject.toml):

- ``gpu``: needs a CUDA device; skipped without one.
- ``smoke``: one of the GPU smoke checks, the few parametrisations that return the
  numbers that matter first (about 90 s on an H200 in all, compile warm-ups included):
  ``python -m pytest -v -m "gpu and smoke"``.

Environment:

- ``LEWM_FAST_SMOKE_LOG=PATH``: every smoke check appends its result line (outcome,
  seconds, test id) to PATH as it finishes, and each measured line a check reports through
  the ``smoke_line`` fixture (errors, step time, peak VRAM) as it is measured, so a run
  cut short keeps what it saw.
"""

import contextlib
import os
import signal
import time

import pytest
import torch

from lewm_fast.backend import tf32

SMOKE_LOG_ENV = "LEWM_FAST_SMOKE_LOG"

# Without a GPU the Triton kernels run on CPU tensors under the interpreter (it must be set
# before the kernels are defined; lewm_fast imports them lazily). With a GPU they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


WORKERS_ENV = "LEWM_FAST_TEST_WORKERS"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The whole suite (``pytest`` with no test paths) on a machine without CUDA runs in one
    pytest-xdist worker per core (``$LEWM_FAST_TEST_WORKERS`` to choose, 0 for none): most
    tests are single-threaded Python (the Triton interpreter), so 2 cores run CI's suite about
    2.8x faster (744 -> 262 s measured). An explicit ``-n``, ``-p no:xdist``, named test
    paths or a CUDA device leave pytest as it was (GPU tests share one device)."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    source = getattr(config, "args_source", None)  # pytest >= 7.2
    if config.getoption("numprocesses", None) is not None or getattr(source, "name", "") != "TESTPATHS":
        return
    if torch.cuda.is_available():
        return
    workers = int(os.environ.get(WORKERS_ENV) or _cores())
    if workers > 1:
        config.option.numprocesses = workers
        config.option.dist = "load"


# Under pytest-xdist each worker process gets an equal share of the cores for torch's
# intra-op threads, so parallel workers do not oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, _cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A per-test time limit in seconds for .ci/gpu-validate on a machine without pytest-timeout:
# the test fails and the run goes on to the next one (and still writes its report).
_TEST_TIMEOUT = float(os.environ.get("LEWM_FAST_TEST_TIMEOUT") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _TEST_TIMEOUT <= 0:
        yield
        return

    def expire(signum, frame):
        pytest.fail(f"over the {_TEST_TIMEOUT:g} s limit of LEWM_FAST_TEST_TIMEOUT", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, _TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def no_tf32():
    """float32 CUDA matmuls and cuDNN convolutions in IEEE float32 for the test (cuDNN allows
    TF32 convolutions by default): for CUDA results compared with the CPU at fp32 tolerances."""
    with tf32(False):
        yield


@pytest.fixture
def faithful_sqrt(monkeypatch):
    """``torch.sqrt`` rounded to float32 and moved one float32 ulp up on every other element
    (returned in the input's dtype) for the test: a faithful but not correctly rounded root,
    worse than the CPU's MKL one. Code whose bits must not depend on the device's sqrt gives
    the same result under it. Returns the real ``torch.sqrt``."""
    real = torch.sqrt

    def sqrt(x, *args, **kwargs):
        s = real(x, *args, **kwargs).to(torch.float32)
        odd = torch.arange(s.numel(), device=s.device).view(s.shape) % 2 == 1
        return torch.where(odd, torch.nextafter(s, torch.full_like(s, float("inf"))), s).to(x.dtype)

    monkeypatch.setattr(torch, "sqrt", sqrt)
    return real


def _append_smoke_log(line: str) -> None:
    path = os.environ.get(SMOKE_LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture
def smoke_line(request):
    """``smoke_line(text)``: report a measured result of this check now, one line, flushed:
    on the terminal (past pytest's output capture) and appended to ``$LEWM_FAST_SMOKE_LOG``."""
    config = request.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")

    def write(text: str) -> None:
        line = f"  {request.node.name}: {text}"
        if reporter is not None:
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                reporter.write_line(line)
                reporter.flush()
        _append_smoke_log(line)

    return write


def pytest_runtest_logreport(report):
    """One line per smoke check in ``$LEWM_FAST_SMOKE_LOG`` as it finishes (a skip or an error
    in setup counts as finishing)."""
    if "smoke" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        stamp = time.strftime("%H:%M:%S")
        _append_smoke_log(f"{stamp} {report.outcome.upper():7} {report.duration:6.1f} s  {report.nodeid}")
    elif report.when == "teardown" and report.outcome != "passed":
        _append_smoke_log(f"{time.strftime('%H:%M:%S')} ERROR   teardown  {report.nodeid}")
