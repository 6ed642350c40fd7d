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

Attention kernels: :func:`choose_sdpa` picks the scaled-dot-product-attention backend for an
attention shape by documented capability rules (the rules are in its docstring), and
:func:`sdpa_context` enables it, with the math backend as the fallback for calls it cannot
run; the trainer applies both around its training step and records the choice.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


# ------------------------------------------------------------------ attention backends

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
# torch.nn.attention.SDPBackend member of each name
_SDPA_MEMBERS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


@dataclass(frozen=True)
class SdpaChoice:
    """The attention backend a shape runs with: ``backend`` (one of :data:`SDPA_BACKENDS`)
    and the rule, in words, that chose it (``reason``)."""

    backend: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"sdpa_backend": self.backend, "sdpa_reason": self.reason}


def _sdpa_name(value: int) -> str | None:
    """Our name of a ``torch.nn.attention.SDPBackend`` value (None for ERROR or unknown)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return None
    for name, member in _SDPA_MEMBERS.items():
        if getattr(SDPBackend, member, None) is not None and int(getattr(SDPBackend, member)) == int(value):
            return name
    return None


def _torch_pick(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]) -> str | None:
    """The backend torch itself would run for q = k = v of (1, heads, length, head_dim) under
    the current flags, or None when this torch cannot say (``torch._fused_sdp_choice``)."""
    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        return None
    q = torch.empty((1, *shape), device=device, dtype=dtype)
    try:
        return _sdpa_name(choice(q, q, q))
    except RuntimeError:
        return None


def choose_sdpa(
    device: torch.device | str,
    dtype: torch.dtype,
    shape: tuple[int, int, int],
    *,
    capability: tuple[int, int] | None = None,
    torch_default: str | None = None,
) -> SdpaChoice:
    """The fastest SDPA backend for attention over ``shape = (heads, length, head_dim)`` in
    ``dtype`` on ``device``, without dropout or mask (the LeWM encoder's attention).

    Rules, first match wins:

    - not CUDA: ``"flash"``, PyTorch's CPU flash-attention kernel (any floating dtype,
      no dropout, no mask).
    - CUDA, and torch's own pick for this shape (``torch_default``) is ``"cudnn"``: cuDNN
      attention. Torch enables it by default only where it vetted it (sm90/sm100 with a
      recent cuDNN: cuDNN before 9.15.1 gave wrong results for sequence lengths that are not
      a multiple of 128, pytorch/pytorch#169849, and the encoder's is 257); there it is the
      fastest half-precision kernel. This library never forces it where torch does not.
    - CUDA, bfloat16/float16, compute capability >= 8.0, head_dim a multiple of 8 and at
      most 256: ``"flash"`` (FlashAttention-2).
    - CUDA, compute capability >= 5.0 (8.0 for bfloat16), head_dim a multiple of 8 (half)
      or 4 (float32): ``"efficient"`` (memory-efficient attention, the only fused kernel
      for float32).
    - otherwise ``"math"``.

    ``capability`` (major, minor) and ``torch_default`` (a name of :data:`SDPA_BACKENDS`)
    replace the device queries, so the rules can be checked without a GPU. When neither is
    given the choice is then checked on the device: if torch cannot run the chosen kernel
    for this shape under :func:`sdpa_context`, the backend it does run is returned, with
    the reason saying so. Raises ValueError for a bad shape or a non-float dtype.
    """
    device = torch.device(device)
    if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"shape must be (heads, length, head_dim) of positive ints, got {shape!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"attention runs in a floating dtype, got {dtype}")
    head_dim = shape[2]
    half = dtype in (torch.bfloat16, torch.float16)
    probe = capability is None and torch_default is None
    if device.type != "cuda":
        choice = SdpaChoice("flash", f"{device.type}: the CPU flash-attention kernel (no dropout or mask)")
    else:
        if capability is None:
            capability = tuple(torch.cuda.get_device_capability(device))
        if torch_default is None and probe:
            torch_default = _torch_pick(device, dtype, shape)
        sm = f"sm{capability[0]}{capability[1]}"
        if torch_default == "cudnn":
            choice = SdpaChoice("cudnn", f"{sm}: torch's own default for this shape is cuDNN attention")
        elif half and tuple(capability) >= (8, 0) and head_dim % 8 == 0 and head_dim <= 256:
            choice = SdpaChoice("flash", f"{sm}, {_dtype_name(dtype)}, head_dim {head_dim}: FlashAttention-2")
        elif (
            tuple(capability) >= ((8, 0) if dtype == torch.bfloat16 else (5, 0))
            and head_dim % (8 if half else 4) == 0
        ):
            choice = SdpaChoice(
                "efficient", f"{sm}, {_dtype_name(dtype)}, head_dim {head_dim}: memory-efficient attention"
            )
        else:
            choice = SdpaChoice("math", f"{sm}, {_dtype_name(dtype)}, head_dim {head_dim}: no fused kernel")
    if probe:
        with sdpa_context(choice.backend):
            runs = _torch_pick(device, dtype, shape)
        if runs is not None and runs != choice.backend:
            choice = SdpaChoice(runs, f"{choice.reason}; torch cannot run {choice.backend} here, runs {runs}")
    return choice


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sdpa_context(backend: str | None):
    """Context manager enabling the SDPA ``backend`` and, for calls it cannot run (e.g.
    attention with dropout on the CPU), the math fallback; ``None`` changes nothing.

    Uses ``torch.nn.attention.sdpa_kernel`` (torch >= 2.3), else the older
    ``torch.backends.cuda.sdp_kernel`` flags (no cuDNN there). Raises ValueError for an
    unknown name.
    """
    if backend is None:
        return contextlib.nullcontext()
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"SDPA backend must be one of {SDPA_BACKENDS}, got {backend!r}")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(
            enable_flash=backend == "flash", enable_math=True, enable_mem_efficient=backend == "efficient"
        )
    members = [getattr(SDPBackend, _SDPA_MEMBERS[name], None) for name in dict.fromkeys((backend, "math"))]
    return sdpa_kernel([m for m in members if m is not None])
