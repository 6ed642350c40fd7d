"""Build and load the C++/CUDA extensions of ``csrc/`` on first use (see csrc/README.md).

Each extension is compiled with ``torch.utils.cpp_extension.load`` (ninja) into
``<cache>/csrc/<name>-<arch>-<hash>``, where the hash covers the sources, the torch and
CUDA versions, the Python ABI, the compiler flags and the target architecture, so a
changed source or another GPU generation gets its own build and an unchanged one is
reused across processes. ``<cache>`` is ``$LEWM_FAST_CACHE_DIR``, else
``$XDG_CACHE_HOME/lewm_fast``, else ``~/.cache/lewm_fast``.

Extensions only register kernels (``TORCH_LIBRARY_IMPL``); the op schemas are defined here,
in the ``lewm_fast`` namespace, together with fake (meta) implementations so torch.compile
can trace through them. A failed build (no compiler, no nvcc, a compile error) warns once
per extension and architecture; callers then use their PyTorch path.

Nothing here runs at import time: no compiler call, no GPU query.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["EXTENSIONS", "cache_dir", "source_dir", "load", "unavailable_reason", "define_ops"]


@dataclass(frozen=True)
class Extension:
    binding: str  # the one file that registers the kernels
    sources: tuple[str, ...] = ()  # further compiled sources (.cu)
    headers: tuple[str, ...] = ()  # included files: part of the cache key
    cuda: bool = False


EXTENSIONS: dict[str, Extension] = {
    "cem_refit_cpu": Extension("cem_refit_cpu.cpp", headers=("cem_refit.h",)),
    "cem_refit_cuda": Extension(
        "cem_refit_cuda.cpp",
        sources=("cem_refit_cuda.cu",),
        headers=("cem_refit.h", "cem_refit_kernel.cuh"),
        cuda=True,
    ),
}

_SCHEMAS = {
    "cem_refit": "cem_refit(Tensor candidates, Tensor costs, Tensor mean, Tensor std, int topk) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
}

_CFLAGS = ("-O3",)
_CUDA_CFLAGS = ("-O3",)
_lock = threading.Lock()


def source_dir() -> Path:
    """Folder of the C++/CUDA sources: ``csrc/`` in a checkout, ``lewm_fast/csrc`` in a wheel."""
    from . import csrc

    return Path(csrc.__file__).resolve().parent


def cache_dir() -> Path:
    """Root of the build cache (``$LEWM_FAST_CACHE_DIR`` or the XDG cache folder)."""
    root = os.environ.get("LEWM_FAST_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lewm_fast"


def _fake_cem_refit(candidates, costs, mean, std, topk):
    envs = candidates.shape[0]
    return (
        torch.empty_like(mean),
        torch.empty_like(std),
        costs.new_empty((envs,)),
        costs.new_empty((envs,), dtype=torch.int32),
    )


_FAKES = {"cem_refit": _fake_cem_refit}


@functools.lru_cache(maxsize=1)
def define_ops() -> torch.library.Library:
    """Define the op schemas of all extensions (once; kept alive by the cache)."""
    lib = torch.library.Library("lewm_fast", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
        torch.library.register_fake(f"lewm_fast::{name}", _FAKES[name], lib=lib)
    return lib


def cuda_arch(device: torch.device) -> str:
    """``sm_XY`` of a CUDA device (queried lazily, on first use of a CUDA extension)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _cuda_flags(arch: str) -> list[str]:
    cc = arch.removeprefix("sm_")
    return [*_CUDA_CFLAGS, f"-gencode=arch=compute_{cc},code=sm_{cc}"]


def _key(name: str, arch: str) -> str:
    ext = EXTENSIONS[name]
    root = source_dir()
    digest = hashlib.sha256()
    for file in (ext.binding, *ext.sources, *ext.headers):
        digest.update(file.encode() + b"\0" + (root / file).read_bytes() + b"\0")
    flags = _cuda_flags(arch) if ext.cuda else []
    for part in (torch.__version__, torch.version.cuda, sys.version_info[:2], arch, _CFLAGS, flags):
        digest.update(repr(part).encode() + b"\0")
    return digest.hexdigest()[:16]


def _no_toolchain_reason(ext: Extension) -> str | None:
    from torch.utils import cpp_extension

    if ext.cuda:
        if torch.version.cuda is None:
            return "this PyTorch build has no CUDA support"
        if cpp_extension.CUDA_HOME is None:
            return "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    return None


@functools.cache
def _build(name: str, arch: str) -> str | None:
    """Build and load one extension; None on success, else why it failed (warned once)."""
    ext = EXTENSIONS[name]
    reason = _no_toolchain_reason(ext)
    if reason is None:
        from torch.utils import cpp_extension

        key = _key(name, arch)
        build_dir = cache_dir() / "csrc" / f"{name}-{arch}-{key}"
        root = source_dir()
        try:
            define_ops()
            build_dir.mkdir(parents=True, exist_ok=True)
            kwargs = {}
            if ext.cuda:
                kwargs = {"extra_cuda_cflags": _cuda_flags(arch), "with_cuda": True}
            cpp_extension.load(
                name=f"lewm_fast_{name}_{key}",
                sources=[str(root / f) for f in (ext.binding, *ext.sources)],
                extra_cflags=list(_CFLAGS),
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
                **kwargs,
            )
        except Exception as exc:  # compiler missing or failing, unwritable cache, load error
            text = " ".join(str(exc).split())
            reason = f"building it failed: {type(exc).__name__}: {text[-1500:]}"
    if reason is not None:
        warnings.warn(
            f"lewm_fast: the C++/CUDA extension {name!r} ({arch}) is unavailable ({reason}); "
            "using the PyTorch path instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return reason


def _arch_of(name: str, device: torch.device) -> str:
    return cuda_arch(device) if EXTENSIONS[name].cuda else "cpu"


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why extension ``name`` cannot run on ``device`` (None when it is built and loaded).

    The first call builds it (or finds it in the cache); a failure warns once.
    """
    if name not in EXTENSIONS:
        raise ValueError(f"unknown csrc extension {name!r}; expected one of {sorted(EXTENSIONS)}")
    device = torch.device(device)
    if EXTENSIONS[name].cuda != (device.type == "cuda"):
        kind = "CUDA" if EXTENSIONS[name].cuda else "CPU"
        return f"extension {name!r} runs on {kind} tensors, not on {device}"
    with _lock:
        return _build(name, _arch_of(name, device))


def load(name: str, device: torch.device) -> bool:
    """Build/load extension ``name`` for ``device``; True if its kernels are registered."""
    return unavailable_reason(name, device) is None
