"""Ahead-of-time builds of the Triton kernels, for checking them on a machine without a GPU.

``compile_for(spec, capability)`` builds one kernel configuration to a cubin for a CUDA
target (e.g. 80, 86, 89, 90) with ``triton.compile``; ``resource_usage`` reads its
registers, stack and local memory with the ``cuobjdump`` shipped inside Triton's package.
Each kernel module lists the configurations its dispatch can pick in ``aot_specs()``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import triton


@dataclass(frozen=True)
class KernelSpec:
    """One kernel configuration: argument types, constexpr values and warps."""

    name: str
    fn: Any
    pointers: dict[str, str]  # argument -> "*fp32" / "*bf16" / "*fp16"
    constexprs: dict[str, Any]
    num_warps: int
    floats: tuple[str, ...] = ()  # float scalar arguments; all other scalars are i32
    tags: dict[str, Any] = field(default_factory=dict)

    def signature(self) -> dict[str, str]:
        sig = {}
        for arg in self.fn.arg_names:
            if arg in self.constexprs:
                sig[arg] = "constexpr"
            elif arg in self.pointers:
                sig[arg] = self.pointers[arg]
            elif arg in self.floats:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
        return sig


def supported() -> str | None:
    """None if this Triton can build kernels ahead of time here, else the reason."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as exc:
        return f"triton {triton.__version__} lacks the AOT API ({exc})"
    if not {"constexprs", "constants"} & set(_ast_source_parameters(ASTSource)):
        return f"triton {triton.__version__} has an ASTSource without constexprs/constants"
    if cuobjdump() is None:
        return "cuobjdump is not shipped with this Triton package"
    return None


def _ast_source_parameters(ast_source) -> list[str]:
    import inspect

    return list(inspect.signature(ast_source.__init__).parameters)


def cuobjdump() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.isfile(path) else None


def compile_for(spec: KernelSpec, capability: int):
    """Build ``spec`` for sm_<capability>; returns triton's compiled kernel (with ``asm``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Triton >= 3.3 names the compile-time arguments constexprs=, Triton 3.2 constants=.
    key = "constexprs" if "constexprs" in _ast_source_parameters(ASTSource) else "constants"
    source = ASTSource(fn=spec.fn, signature=spec.signature(), **{key: dict(spec.constexprs)})
    return triton.compile(
        source, target=GPUTarget("cuda", capability, 32), options={"num_warps": spec.num_warps}
    )


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


def _modules():
    from . import adaln, sigreg

    return {"sigreg": sigreg, "adaln": adaln}


def _build(job: tuple[str, int, int]) -> dict[str, Any]:
    module, index, arch = job
    spec = list(_modules()[module].aot_specs())[index]
    return {"kernel": spec.name, "arch": arch, **resource_usage(compile_for(spec, arch).asm["cubin"])}


def build_all(archs=(80, 86, 89, 90), workers: int | None = None) -> list[dict[str, Any]]:
    """Build every listed configuration of every kernel for every architecture."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time builds need real Triton kernels: unset TRITON_INTERPRET")
    jobs = [
        (name, i, arch)
        for name, mod in _modules().items()
        for i, _ in enumerate(mod.aot_specs())
        for arch in archs
    ]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=context) as pool:
        return list(pool.map(_build, jobs))


def main(argv: list[str] | None = None) -> None:
    """``python -m lewm_fast.kernels._aot``: one JSON line of resource usage per build."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m lewm_fast.kernels._aot",
        description="Build every kernel configuration the dispatch can pick for each CUDA "
        "architecture (no GPU needed) and print one JSON line of registers, stack, shared and "
        "local memory per build.",
    )
    parser.add_argument(
        "--arch", type=int, nargs="+", default=[80, 86, 89, 90], help="compute capabilities (default: 80-90)"
    )
    parser.add_argument("--workers", type=int, default=None, help="build processes (default: CPU count)")
    args = parser.parse_args(argv)
    reason = supported()
    if reason:
        raise SystemExit(f"cannot build ahead of time: {reason}")
    for row in build_all(tuple(args.arch), args.workers):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
