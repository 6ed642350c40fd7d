"""Input checks shared by the public API: bad input raises ValueError saying what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def shape(value: Any) -> str:
    """``value``'s shape as ``"(2, 3)"``: of a tensor or array, or of a shape tuple (whose
    entries may be names, ``("rows", 2)``); the type name for anything without a shape."""
    if hasattr(value, "shape"):
        value = value.shape
    if not isinstance(value, tuple):
        return type(value).__name__
    return "(" + ", ".join(str(s) for s in value) + ")"


def _is_integer(value: Any, numpy: bool) -> bool:
    kinds = (int, np.integer) if numpy else int
    return isinstance(value, kinds) and not isinstance(value, bool)


def integer(value: Any, name: str, minimum: int, *, numpy: bool = False) -> int:
    """``value`` as an ``int`` >= ``minimum``; else ValueError "<name> must be an integer >= <minimum>".

    Bools are refused; numpy integers are accepted only with ``numpy=True`` (config fields
    stay plain ints so that they serialise).
    """
    if not _is_integer(value, numpy) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive(value: Any, name: str, *, numpy: bool = False) -> int:
    """``integer(value, name, 1)`` worded "<name> must be a positive integer"."""
    if not _is_integer(value, numpy) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device(device)``.

    ValueError when a CUDA device is asked for and CUDA is not available.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return resolved


def with_index(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device with its index where it is CUDA (``cuda`` -> ``cuda:<current>``).

    Two spellings of one GPU then compare equal. Other devices are returned as given.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def tensor(value, name: str, dims: Sequence[str]) -> torch.Tensor:
    """``value`` must be a tensor with ``len(dims)`` dimensions named by ``dims``."""
    layout = "(" + ", ".join(dims) + ")"
    if not torch.is_tensor(value):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if value.dim() != len(dims):
        raise ValueError(
            f"{name} must have {len(dims)} dimensions {layout}, got {value.dim()} with shape {shape(value)}"
        )
    return value


def finite(value: torch.Tensor, name: str, hint: str = "") -> None:
    """Reject NaN/inf entries (one device sync)."""
    if not bool(torch.isfinite(value).all()):
        bad = "NaN" if bool(torch.isnan(value).any()) else "inf"
        raise ValueError(f"{name} contains {bad} values{hint}")


# The layout of a batch of frame sequences: envs or windows, time, channels, height, width.
FRAMES = ("B", "T", "C", "H", "W")

# ImageNet normalisation (spec section 5) maps [0, 1] pixel values into [-2.12, 2.64]. Frames
# reaching far beyond that were not normalised (e.g. a 0-255 range); the bound sits well
# above what torch.randn frames reach, so well-formed test inputs pass.
NORMALISED_LIMIT = 16.0


def pixels(
    value, name: str, dims: Sequence[str], channels: int, min_size: int, *, values: bool = True
) -> torch.Tensor:
    """Normalised float frames with the channel axis third from the end: (..., C, H, W).

    ValueError for another layout, dtype, channel count or a frame smaller than one patch.
    With ``values`` (one device sync) also for NaN/inf entries and for values beyond
    :data:`NORMALISED_LIMIT` (frames that were not normalised); without it the caller
    checks the values on the device with :func:`frame_faults`.
    """
    value = tensor(value, name, dims)
    if not value.is_floating_point():
        raise ValueError(
            f"{name} must be floating-point frames normalised as in spec section 5 "
            f"(ImageNet mean/std, e.g. lewm_fast.data.normalize_frames), got dtype {value.dtype}"
        )
    c, h, w = value.shape[-3:]
    if c != channels:
        raise ValueError(
            f"{name} must have {channels} channels in {dims[-3]} of ({', '.join(dims)}), got {c} "
            f"(shape {shape(value)}); channels-last frames must be permuted to (..., C, H, W)"
        )
    if h < min_size or w < min_size:
        raise ValueError(f"{name} frames ({h}x{w}) are smaller than one {min_size}x{min_size} patch")
    if values and value.numel():
        check_frame_faults(frame_faults(value.reshape(1, -1)).cpu(), name, axis=None)
    return value


def frame_faults(frames: torch.Tensor) -> torch.Tensor:
    """(2, B) float32 on the frames' device: per leading index b, the number of NaN/inf
    entries of ``frames[b]`` and its largest finite absolute value. No host sync."""
    x = frames.detach().reshape(frames.shape[0], -1)
    ok = torch.isfinite(x)
    bad = (~ok).sum(1).float()
    peak = torch.where(ok, x.abs(), torch.zeros((), dtype=x.dtype, device=x.device)).amax(1).float()
    return torch.stack([bad, peak])


def check_frame_faults(faults: torch.Tensor, name: str, axis: str | None = "env") -> None:
    """Raise ValueError for the first index whose :func:`frame_faults` (2, B) show NaN/inf
    entries or unnormalised values; ``axis`` names the index in the message."""
    bad, peak = faults[0].tolist(), faults[1].tolist()
    for b, count in enumerate(bad):
        if count:
            where = "" if axis is None else f"[{b}] (the frames of {axis} {b})"
            raise ValueError(f"{name}{where} contains {int(count)} NaN/inf values")
    for b, largest in enumerate(peak):
        if largest > NORMALISED_LIMIT:
            where = "" if axis is None else f"[{b}] (the frames of {axis} {b})"
            raise ValueError(
                f"{name}{where} reaches |value| = {largest:g}, beyond what ImageNet-normalised "
                f"frames can hold (about -2.1 to 2.6): normalise them first (spec section 5, "
                "lewm_fast.data.normalize_frames)"
            )


def actions(value, name: str, dims: Sequence[str], width: int | None) -> torch.Tensor:
    """Model actions whose last axis has ``width`` numbers (frameskip x action_dim)."""
    value = tensor(value, name, dims)
    if width is not None and value.shape[-1] != width:
        raise ValueError(
            f"{name} must have {width} numbers per model action (frameskip x action_dim) in the "
            f"last axis of ({', '.join(dims)}), got {value.shape[-1]} (shape {shape(value)})"
        )
    finite(value, name, hint="; window-edge NaN actions must be replaced by 0 before encoding")
    return value


def same_leading(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, n: int) -> None:
    """The first ``n`` dimensions of two tensors must agree."""
    if a.shape[:n] != b.shape[:n]:
        raise ValueError(
            f"{a_name} {shape(a)} and {b_name} {shape(b)} must agree in their first {n} dimension(s)"
        )
