"""Explicit backend selection for every op that has a fast path.

Each op takes ``backend="auto" | "triton" | "torch"`` (and ``"cuda"`` where ``csrc/`` has
an extension). ``"auto"`` picks the fastest backend that can run on the given tensor and
falls back to the plain PyTorch reference math; a forced backend that cannot run raises.

The environment variable ``LEWM_FAST_BACKEND`` (``auto``, ``triton``, ``torch`` or
``cuda``) replaces the ``"auto"`` default everywhere, e.g. ``LEWM_FAST_BACKEND=torch`` to
run everything on the reference math while debugging; an explicit non-auto argument
still wins. Under ``TRITON_INTERPRET=1`` Triton kernels run on CPU tensors (that is how
the CPU test suite exercises them).

Nothing here touches a GPU at import time; availability checks run lazily and are cached.

TF32 switches: ``tf32_state()`` reads and ``set_tf32()`` / ``tf32()`` set whether float32
CUDA matmuls (cuBLAS) and cuDNN convolutions may run in TF32, through
``torch.backends.cuda.matmul.fp32_precision`` / ``torch.backends.cudnn.conv.fp32_precision``
where the installed torch has them (>= 2.9) and the legacy ``allow_tf32`` flags otherwise.
Read TF32 state only through them: on recent torch, reading a legacy ``allow_tf32`` after
an ``fp32_precision`` was set raises (seen on torch 2.13).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator, Sequence

import torch

ENV_VAR = "LEWM_FAST_BACKEND"
BACKENDS = ("auto", "triton", "torch", "cuda")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run on this machine or for these tensors."""


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """True if the ``triton`` package can be imported (checked once, lazily)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install must not break the torch path
        return False
    return True


def triton_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_name(backend: str | None) -> str:
    """Validate a backend name (None means "auto") and return it."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def requested(backend: str | None) -> str:
    """The backend asked for: the argument, with ``"auto"``/None replaced by ``$LEWM_FAST_BACKEND``."""
    backend = check_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"${ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        backend = env
    return backend


def triton_unavailable_reason(tensor: torch.Tensor) -> str | None:
    """Why a Triton kernel cannot run on ``tensor`` (None if it can)."""
    if not triton_importable():
        return "triton is not installed (or fails to import)"
    if tensor.is_cuda:
        return None
    if triton_interpreter():
        return None if tensor.device.type == "cpu" else f"tensor on {tensor.device}"
    return f"the tensor is on {tensor.device}; Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"


def resolve(
    backend: str | None,
    tensor: torch.Tensor,
    op: str,
    supported: Sequence[str] = ("triton", "torch"),
    cuda_unavailable_reason=None,
) -> str:
    """The concrete backend ("triton", "cuda" or "torch") an op runs for ``tensor``.

    ``supported`` lists the op's backends in order of preference for ``"auto"``;
    ``cuda_unavailable_reason(tensor)`` tells why the op's csrc extension cannot run (or
    None when it can). A forced backend that cannot run raises BackendUnavailableError.
    """
    choice = requested(backend)

    def reason(name: str) -> str | None:
        if name == "torch":
            return None
        if name not in supported:
            return f"{op} has no {name!r} backend (it has {list(supported)})"
        if name == "triton":
            return triton_unavailable_reason(tensor)
        if cuda_unavailable_reason is None:
            return f"{op} has no 'cuda' backend"
        return cuda_unavailable_reason(tensor)

    if choice != "auto":
        why = reason(choice)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend={choice!r} cannot run: {why}")
        return choice
    for name in supported:
        if name == "triton" and not tensor.is_cuda:
            continue  # auto uses the interpreter only when asked to explicitly
        if name == "cuda" and not tensor.is_cuda:
            continue
        if reason(name) is None:
            return name
    return "torch"


# ------------------------------------------------------------------ TF32 switches

TF32_SWITCHES = ("matmul", "conv")


def _fp32_precision_holder(switch: str):
    """The object whose ``fp32_precision`` governs ``switch``, or None on a torch without it."""
    if switch == "matmul":
        holder = torch.backends.cuda.matmul
    else:
        holder = getattr(torch.backends.cudnn, "conv", None)
    return holder if holder is not None and hasattr(holder, "fp32_precision") else None


def _legacy_holder(switch: str):
    return torch.backends.cuda.matmul if switch == "matmul" else torch.backends.cudnn


def tf32_state() -> dict[str, bool]:
    """Whether float32 CUDA work may use TF32: ``{"matmul": cuBLAS matmuls, "conv": cuDNN
    convolutions}`` (torch's defaults: False and True)."""
    state = {}
    for switch in TF32_SWITCHES:
        holder = _fp32_precision_holder(switch)
        if holder is not None:
            # the getter resolves "none" through the parent settings; "none" at the top is IEEE
            state[switch] = holder.fp32_precision == "tf32"
        else:
            state[switch] = bool(_legacy_holder(switch).allow_tf32)
    return state


def set_tf32(matmul: bool | None = None, conv: bool | None = None) -> dict[str, bool]:
    """Allow (True) or forbid (False) TF32 for float32 CUDA matmuls and/or cuDNN convolutions;
    None leaves a switch as it is. Returns the previous ``tf32_state()``, so
    ``set_tf32(**previous)`` restores it.

    With the ``fp32_precision`` API a switch is first set to ``"none"`` (inherit from
    ``torch.backends.fp32_precision``) and pinned to ``"tf32"`` / ``"ieee"`` only where the
    inherited value differs, so a restore leaves torch's defaults ("none" for matmul,
    "tf32" for conv) as they were.
    """
    previous = tf32_state()
    for switch, enabled in (("matmul", matmul), ("conv", conv)):
        if enabled is None:
            continue
        enabled = bool(enabled)
        holder = _fp32_precision_holder(switch)
        if holder is None:
            _legacy_holder(switch).allow_tf32 = enabled
            continue
        holder.fp32_precision = "none"
        if (holder.fp32_precision == "tf32") != enabled:
            holder.fp32_precision = "tf32" if enabled else "ieee"
    return previous


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Context manager: TF32 allowed (True) or forbidden (False) for both float32 CUDA matmuls
    and cuDNN convolutions inside the block; the previous state is restored on exit.

    >>> with tf32(False):  # CUDA float32 results comparable with the CPU at fp32 tolerances
    ...     pass
    """
    previous = set_tf32(matmul=enabled, conv=enabled)
    try:
        yield
    finally:
        set_tf32(**previous)
