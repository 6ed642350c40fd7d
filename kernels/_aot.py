"""Compile-faithful builds of the Triton kernels, for checking them on a machine without a GPU.

The kernels are compiled exactly as a GPU run would compile them: each launcher of
``sigreg.py``, ``adaln.py`` and ``block_step.py`` is called the way the library calls it
(CPU tensors of the real dtypes, sizes and strides), and its ``kernel[grid](...)`` goes
through Triton's own JIT path (argument binding, signature specialisation -- integers equal
to 1 become constants, integers and pointers divisible by 16 are marked so -- option
parsing and the kernel cache), with two substitutions:

- a stand-in driver (:class:`StandInDriver`) reports a CUDA target of the chosen compute
  capability instead of asking a GPU, and keys Triton's kernel cache by that target;
- every launch is turned into a compile-only warm-up (``warmup=True``), so nothing runs.

A kernel that only fails under specialisation (e.g. a method call on an integer argument
that is a constant when it equals 1) fails here as it would on the GPU; the interpreter,
which does not specialise, cannot see it. Triton's per-target kernel cache deduplicates
the builds by specialisation key, so each distinct kernel is compiled once per target.
``resource_usage`` reads the registers, stack and local memory of each cubin with the
``cuobjdump`` shipped inside Triton's package; each row adds the dynamic shared memory the
launch asks for (``DYNAMIC_SHARED``, bytes; cuobjdump's ``SHARED`` is the static part).

Each kernel module lists its cases in ``compile_cases()``: ``(name, call)`` pairs whose
``call()`` runs one launcher. ``python -m lewm_fast.kernels._aot`` prints one JSON line
per (case, target, kernel) -- or per failing case -- and ``tests/test_aot.py`` checks them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import os
import re
import subprocess
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import triton

ARCHS = (80, 86, 89, 90)


class StandInDriver:
    """The part of a Triton driver that the JIT path asks before compiling: the target
    (a CUDA GPU of ``capability``, e.g. 90 for sm_90), the current device and stream."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.capability = capability
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Triton keeps one kernel cache per device: one per target here.
        return f"stand-in-sm_{self.capability}"

    def get_current_stream(self, device=None):
        return 0


def supported() -> str | None:
    """None if this Triton's JIT internals fit the stand-in and cuobjdump is there, else why not."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        return f"triton {triton.__version__} lacks the JIT internals the stand-in driver uses ({exc})"
    if not (hasattr(driver, "set_active") and "_active" in vars(driver)):
        return f"triton {triton.__version__} cannot swap its active driver"
    params = inspect.signature(JITFunction.run).parameters
    if not {"grid", "warmup"} <= set(params):
        return f"triton {triton.__version__}: JITFunction.run takes no grid/warmup keywords"
    if cuobjdump() is None:
        return "cuobjdump is not shipped with this Triton package"
    return None


def cuobjdump() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.isfile(path) else None


def resource_usage(cubin: bytes) -> dict[str, int]:
    """{"REG", "STACK", "SHARED", "LOCAL"} of the (single) function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{out}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, match.groups())))


@contextlib.contextmanager
def compile_only(capability: int) -> Iterator[list[tuple[str, Any]]]:
    """Within the block, every Triton launch compiles for sm_<capability> and runs nothing.

    Yields a list that collects ``(kernel name, compiled kernel)`` for each launch. The
    active driver and ``JITFunction.run`` are restored on exit.
    """
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    launches: list[tuple[str, Any]] = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self.fn.__name__, kernel))
        return kernel

    # Restore the previous active driver itself: reset_active() would create the default
    # one, which fails without a GPU.
    previous = vars(driver).get("_active")
    driver.set_active(StandInDriver(capability))
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = original
        driver._active = previous


def _modules():
    from . import adaln, block_step, sigreg

    return {"sigreg": sigreg, "adaln": adaln, "block_step": block_step}


def cases() -> list[tuple[str, Callable[[], Any]]]:
    """Every ``(name, call)`` of every kernel module, names prefixed with the module."""
    return [
        (f"{mod}.{name}", call) for mod, module in _modules().items() for name, call in module.compile_cases()
    ]


def case_names() -> list[str]:
    return [name for name, _ in cases()]


def _probe(capability: int) -> str | None:
    """None if a trivial kernel compiles through the stand-in, else the reason it does not."""
    import torch
    import triton.language as tl

    @triton.jit
    def _copy(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)

    try:
        with compile_only(capability) as launches:
            x = torch.empty(64)
            _copy[(1,)](x, torch.empty_like(x), 64, BLOCK=64)
        launches[0][1].asm["cubin"]
    except Exception as exc:  # the stand-in does not fit this Triton's JIT internals
        why = f"{type(exc).__name__}: {exc}"
        return f"triton {triton.__version__}: the stand-in driver cannot compile here ({why})"
    return None


def build(capability: int, patterns: tuple[str, ...] = ("*",)) -> list[dict[str, Any]]:
    """Compile every case whose name matches one of ``patterns`` (fnmatch) for
    sm_<capability>: one row per (case, kernel) or per failing case."""
    import torch

    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    usage: dict[str, dict[str, int]] = {}  # by kernel hash: each distinct kernel is read once
    for name, call in cases():
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        with compile_only(capability) as launches:
            try:
                call()
            except Exception as exc:
                message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                rows.append({"case": name, "arch": capability, "error": message[-3000:]})
                continue
        for kernel_name, kernel in launches:
            if kernel.hash not in usage:
                usage[kernel.hash] = resource_usage(kernel.asm["cubin"])
            row = {"case": name, "arch": capability, "kernel": kernel_name, **usage[kernel.hash]}
            rows.append({**row, "DYNAMIC_SHARED": kernel.metadata.shared})
    return rows


def _build_rows(job: tuple[int, tuple[str, ...]]) -> list[dict[str, Any]]:
    capability, patterns = job
    reason = _probe(capability)
    if reason:
        return [{"unsupported": reason}]
    return build(capability, patterns)


def build_all(archs=ARCHS, workers: int | None = None, patterns=("*",)) -> list[dict[str, Any]]:
    """:func:`build` for every target, one process per target (at most ``workers`` at once)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile-faithful builds need real Triton kernels: unset TRITON_INTERPRET")
    reason = supported()
    if reason:
        return [{"unsupported": reason}]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=context) as pool:
        jobs = [(arch, tuple(patterns)) for arch in archs]
        return [row for rows in pool.map(_build_rows, jobs) for row in rows]


def main(argv: list[str] | None = None) -> None:
    """``python -m lewm_fast.kernels._aot``: one JSON line per (case, target, kernel)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m lewm_fast.kernels._aot",
        description="Compile every kernel the launchers issue, as the library calls them, through "
        "Triton's JIT path for each CUDA architecture (no GPU needed), and print one JSON line per "
        "(case, architecture, kernel) with its registers, stack, shared and local memory, or per "
        'failing case with its "error"; one {"unsupported": reason} line where this Triton cannot.',
    )
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (default: 80 86 89 90)"
    )
    parser.add_argument("--workers", type=int, default=None, help="build processes (default: CPU count)")
    parser.add_argument(
        "--case", nargs="+", default=["*"], metavar="PATTERN", help="only the cases matching (fnmatch)"
    )
    args = parser.parse_args(argv)
    names = case_names()
    if not any(fnmatch.fnmatchcase(name, p) for name in names for p in args.case):
        parser.error(f"--case {' '.join(args.case)} matches no case; the cases are:\n" + "\n".join(names))
    for row in build_all(tuple(args.arch), args.workers, args.case):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
