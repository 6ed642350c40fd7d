"""Input checks shared by the public API: bad input raises ValueError saying what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def tensor(value, name: str, dims: Sequence[str]) -> torch.Tensor:
    """``value`` must be a tensor with ``len(dims)`` dimensions named by ``dims``."""
    layout = "(" + ", ".join(dims) + ")"
    if not torch.is_tensor(value):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if value.dim() != len(dims):
        raise ValueError(
            f"{name} must have {len(dims)} dimensions {layout}, got {value.dim()} with shape {_shape(value)}"
        )
    return value


def finite(value: torch.Tensor, name: str, hint: str = "") -> None:
    """Reject NaN/inf entries (one device sync)."""
    if not bool(torch.isfinite(value).all()):
        bad = "NaN" if bool(torch.isnan(value).any()) else "inf"
        raise ValueError(f"{name} contains {bad} values{hint}")


def pixels(value, name: str, dims: Sequence[str], channels: int, min_size: int) -> torch.Tensor:
    """Normalised float frames with the channel axis third from the end: (..., C, H, W)."""
    value = tensor(value, name, dims)
    if not value.is_floating_point():
        raise ValueError(
            f"{name} must be floating-point frames normalised as in spec section 5 "
            f"(ImageNet mean/std), got dtype {value.dtype}"
        )
    c, h, w = value.shape[-3:]
    if c != channels:
        raise ValueError(
            f"{name} must have {channels} channels in {dims[-3]} of ({', '.join(dims)}), got {c} "
            f"(shape {_shape(value)}); channels-last frames must be permuted to (..., C, H, W)"
        )
    if h < min_size or w < min_size:
        raise ValueError(f"{name} frames ({h}x{w}) are smaller than one {min_size}x{min_size} patch")
    finite(value, name)
    return value


def actions(value, name: str, dims: Sequence[str], width: int | None) -> torch.Tensor:
    """Model actions whose last axis has ``width`` numbers (frameskip x action_dim)."""
    value = tensor(value, name, dims)
    if width is not None and value.shape[-1] != width:
        raise ValueError(
            f"{name} must have {width} numbers per model action (frameskip x action_dim) in the "
            f"last axis of ({', '.join(dims)}), got {value.shape[-1]} (shape {_shape(value)})"
        )
    finite(value, name, hint="; window-edge NaN actions must be replaced by 0 before encoding")
    return value


def same_leading(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, n: int) -> None:
    """The first ``n`` dimensions of two tensors must agree."""
    if a.shape[:n] != b.shape[:n]:
        raise ValueError(
            f"{a_name} {_shape(a)} and {b_name} {_shape(b)} must agree in their first {n} dimension(s)"
        )
