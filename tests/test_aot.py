"""Compile-faithful build check: every kernel launch the library issues compiles for sm_80,
sm_86, sm_89 and sm_90 through Triton's own JIT path -- signature specialisation included --
and its cubin uses no local memory (no register spills). Triton 3.2 to 3.6 leave one or two
spilled registers (8 to 16 bytes of stack, measured) in a few configurations; from Triton
3.8 on, none may spill.

Runs without a GPU and proves compilation, not execution (``.ci/gpu-validate`` leaves it
out): ``python -m lewm_fast.kernels._aot`` calls each launcher with CPU tensors under a
stand-in driver that reports the target and turns every launch into a compile-only
warm-up; Triton's kernel cache compiles each specialisation key once per target. The
builds run once per session in that subprocess (without the interpreter the other tests
use); each (case, architecture) is then its own test.
"""

import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from lewm_fast.kernels import _aot, adaln, block_step, sigreg  # noqa: E402

_TRITON = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
STACK_ALLOWED = 0 if _TRITON >= (3, 8) else 16  # bytes
NAMES = _aot.case_names()
# The most shared memory one block may ask for (bytes, opt-in), per compute capability.
MAX_SHARED = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}


@pytest.fixture(scope="module")
def builds():
    reason = _aot.supported()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "lewm_fast.kernels._aot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    unsupported = [row["unsupported"] for row in rows if "unsupported" in row]
    if unsupported:
        pytest.skip(unsupported[0])
    by_case: dict = {}
    for row in rows:
        by_case.setdefault((row["case"], row["arch"]), []).append(row)
    return by_case


def test_cases_cover_every_kernel_dtype_and_tile():
    assert len(NAMES) == len(set(NAMES))
    kernels = {n for mod in (sigreg, adaln) for n in vars(mod) if n.startswith("_") and n.endswith("_kernel")}
    assert len(kernels) == 8  # SIGReg: two forwards (Triton >= 3.3, and < 3.3) and the backward
    for dtype in ("fp32", "bf16", "fp16"):
        for op in ("fwd", "sums", "fwd_loop", "sums_loop", "bwd", "bwd+A", "sums_bwd", "sums_bwd+A"):
            assert f"sigreg.{op}[{dtype},real]" in NAMES
    # every row width the AdaLN launchers accept maps to a tile some case compiles
    tiles = {adaln.row_config(d)["BLOCK_D"] for d in range(1, adaln.MAX_D + 1)}
    widths = {192} | {int(m) for n in NAMES for m in re.findall(r"D=(\d+)", n) if n.startswith("adaln.")}
    assert {adaln.row_config(d)["BLOCK_D"] for d in widths} == tiles
    assert {1, 191, adaln.MAX_D} <= widths


def test_block_step_cases_cover_its_dtypes_and_tiles():
    names = [n for n in NAMES if n.startswith("block_step.")]
    for dtype in ("fp32", "bf16", "fp16", "fp32+bf16"):
        assert any(f"[{dtype}," in n for n in names), dtype
    for past, t in ((0, 1), (1, 1), (2, 1), (0, 3)):
        for n in (300, 15_000):  # the 16- and 32-row tiles (bfloat16)
            assert f"block_step.block_step_fwd[bf16,N={n},past={past},t={t}]" in names
    assert {block_step.tile_config(n, 1, 192, 2048, False)["BLOCK_C"] for n in (300, 15_000)} == {16, 32}


def test_every_kernel_is_compiled(builds):
    kernels = {
        n
        for mod in (sigreg, adaln, block_step)
        for n in vars(mod)
        if n.startswith("_") and n.endswith("_kernel")
    }
    for arch in _aot.ARCHS:
        built = {row.get("kernel") for (case, a), rows in builds.items() if a == arch for row in rows}
        assert kernels <= built, f"sm_{arch}: never compiled {sorted(kernels - built)}"


@pytest.mark.parametrize("arch", _aot.ARCHS, ids=[f"sm_{a}" for a in _aot.ARCHS])
@pytest.mark.parametrize("name", NAMES)
def test_compiles_without_spills(builds, name, arch):
    rows = builds.get((name, arch))
    assert rows, f"{name} launched no kernel on sm_{arch}"
    for row in rows:
        assert "error" not in row, f"{name} does not compile for sm_{arch}:\n{row['error']}"
        spilled = row["LOCAL"] != 0 or row["STACK"] > STACK_ALLOWED
        assert not spilled, f"spills or local memory on sm_{arch}: {row}"
        assert row["REG"] <= 255
        assert row["DYNAMIC_SHARED"] <= MAX_SHARED[arch], f"more shared memory than sm_{arch} has: {row}"
