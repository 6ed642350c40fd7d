"""Ahead-of-time build check: every kernel configuration the dispatch can pick compiles for
sm_80, sm_86, sm_89 and sm_90, and its cubin uses no local memory (no register spills).
Triton 3.2 to 3.6 leave one or two spilled registers (8 to 16 bytes of stack, measured)
in a few configurations; from Triton 3.8 on, none may spill.

Runs without a GPU: ``triton.compile`` targets each architecture and the ``cuobjdump``
shipped with Triton reads the resource usage. The builds run once per session in a
subprocess (``python -m lewm_fast.kernels._aot``, without the interpreter the other tests
use); each (configuration, architecture) is then its own test.
"""

import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from lewm_fast.kernels import _aot, adaln, sigreg  # noqa: E402

ARCHS = (80, 86, 89, 90)
_TRITON = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
STACK_ALLOWED = 0 if _TRITON >= (3, 8) else 16  # bytes
NAMES = [spec.name for mod in (sigreg, adaln) for spec in mod.aot_specs()]


@pytest.fixture(scope="module")
def usage():
    reason = _aot.supported()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "lewm_fast.kernels._aot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {(row["kernel"], row["arch"]): row for row in rows}


def test_every_dispatch_configuration_is_listed():
    assert len(NAMES) == len(set(NAMES))
    # forward and backward of both SIGReg modes for each input dtype
    assert sum(n.startswith("sigreg_fwd") for n in NAMES) == 3 * 2
    assert sum(n.startswith("sigreg_bwd") for n in NAMES) == 3 * 4
    # every row width the AdaLN launchers accept maps to a listed tile
    widths = {adaln.row_config(d)["BLOCK_D"] for d in range(1, adaln.MAX_D + 1)}
    for kernel in ("adaln_fwd", "adaln_bwd", "gated_fwd", "gated_adaln_fwd", "gated_bwd"):
        listed = {int(n.split("D<=")[1].split(",")[0]) for n in NAMES if n.startswith(kernel + "[")}
        assert listed == widths, kernel


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("name", NAMES)
def test_builds_without_spills(usage, name, arch):
    res = usage[(name, arch)]
    assert res["LOCAL"] == 0 and res["STACK"] <= STACK_ALLOWED, f"spills or local memory on sm_{arch}: {res}"
    assert res["REG"] <= 255
