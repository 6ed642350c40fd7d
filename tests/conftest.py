import os
import signal

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under the interpreter (it must be set
# before the kernels are defined; lewm_fast imports them lazily). With a GPU they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
