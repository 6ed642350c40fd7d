"""AdaLN-Zero modulation: the public functional forms of the fused AdaLN kernels.

A ConditionalBlock (DiT's ``DiTBlock``, ``facebookresearch/DiT`` ``models.py``; spec
section 1) feeds each branch ``norm(modulate(LayerNorm(x), shift, scale))`` with DiT's
``modulate(h, shift, scale) = h * (1 + scale) + shift``, and adds the branch back as the
gated residual ``x + gate * branch``. On CUDA these run as the fused Triton ops of
``lewm_fast.kernels.adaln`` (``lewm_fast::adaln``, ``lewm_fast::gated_residual``,
``lewm_fast::gated_adaln``: one pass over the tokens each); elsewhere as the same
formula in plain PyTorch. ``lewm_fast.ConditionalBlock`` is built from them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
from . import backend as _backend
from .reference.modules import modulate

__all__ = ["adaln_modulate", "gated_residual", "gated_adaln_modulate", "autocast_dtype"]

EPS1 = 1e-6  # the block's norm1 / norm2: LayerNorm without affine (DiT's eps)
EPS2 = 1e-5  # the branch's own affine LayerNorm (nn.LayerNorm's default)


def _check(x, broadcast: dict, weight=None, bias=None) -> dict:
    """x (..., D) floating point with D >= 1; each tensor of ``broadcast`` on x's device and
    broadcastable to x's shape (returned expanded to it); weight and bias None or (D,)."""
    if not torch.is_tensor(x) or x.dim() < 1:
        raise ValueError(f"x must be a torch.Tensor of shape (..., D), got {_checks.shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one feature in its last axis, got shape {_checks.shape(x)}")
    out = {}
    for name, t in broadcast.items():
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if t.shape != x.shape:
            try:
                t = t.expand(x.shape)
            except RuntimeError:
                raise ValueError(
                    f"{name} {_checks.shape(t)} must have x's shape {_checks.shape(x)} or broadcast to it"
                ) from None
        out[name] = t
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not torch.is_tensor(t) or t.shape != (D,) or t.device != x.device):
            raise ValueError(f"{name} must be None or a ({D}) tensor on {x.device}, got {_checks.shape(t)}")
    return out


def _kernels(backend: str, x: torch.Tensor, op: str):
    """``lewm_fast.kernels.adaln`` when the fused kernels run for ``x``, else None (PyTorch).

    "auto" also takes PyTorch for rows wider than the kernels' ``MAX_D``; a forced "triton"
    raises BackendUnavailableError there."""
    if _backend.resolve(backend, x, op) == "torch":
        return None
    from .kernels import adaln

    if x.shape[-1] > adaln.MAX_D:
        if _backend.requested(backend) == "triton":
            raise _backend.BackendUnavailableError(
                f"{op}: the fused AdaLN kernels take at most {adaln.MAX_D} features, got {x.shape[-1]}"
            )
        return None
    return adaln


def _affine(x: torch.Tensor, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' weight and bias: ones / zeros where None."""
    D = x.shape[-1]
    weight = x.new_ones(D) if weight is None else weight
    return weight, (x.new_zeros(D) if bias is None else bias)


def _modulate_norm(x, shift, scale, weight, bias, eps1: float, eps2: float, out_dtype=None) -> torch.Tensor:
    """The formula in PyTorch: LayerNorm(modulate(LayerNorm(x, eps1), shift, scale), eps2).

    Low-precision activations with float32 affine parameters (outside autocast) normalise in
    float32 and round to the activations' dtype, as the CPU kernel does on its own; CUDA's
    layer_norm rejects that mix, so it is spelled out here for every device."""
    D = x.shape[-1]
    h = F.layer_norm(x, (D,), eps=eps1)
    m = modulate(h, shift, scale)
    if weight is not None and weight.dtype != m.dtype and autocast_dtype(m) is None:
        y = F.layer_norm(m.float(), (D,), weight.float(), _float(bias), eps=eps2).to(m.dtype)
    else:
        y = F.layer_norm(m, (D,), weight, bias, eps=eps2)
    return y if out_dtype is None else y.to(out_dtype)


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives GEMMs on x's device (None when autocast is off there): what
    a branch input that feeds a Linear should be written in."""
    kind = x.device.type
    try:
        enabled = torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4 takes no device argument (CUDA only)
        enabled = kind == "cuda" and torch.is_autocast_enabled()
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(kind)
    return torch.get_autocast_gpu_dtype() if kind == "cuda" else torch.get_autocast_cpu_dtype()


def adaln_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps1: float = EPS1,
    eps2: float = EPS2,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The input of an AdaLN-Zero branch, for tokens x (N, D) or (B, T, D) (any (..., D)).

    ``h = LayerNorm(x, eps1)`` (no affine), ``m = h * (1 + scale) + shift`` (DiT's
    ``modulate``), ``y = LayerNorm(m, eps2) * weight + bias`` (the branch's own norm; no
    affine where weight/bias are None). shift and scale have x's shape or broadcast to it
    (e.g. (B, 1, D)); weight and bias are (D,). Returns y of x's shape, in ``out_dtype``
    (default x's dtype; give the dtype the next GEMM reads, e.g. :func:`autocast_dtype`, and
    the fused kernel rounds on store instead of a cast kernel after it), differentiable in
    every tensor argument.

    ``backend``: "auto", "triton" or "torch" (see :mod:`lewm_fast.backend`); "triton" is
    one fused kernel (rows of at most ``lewm_fast.kernels.adaln.MAX_D`` = 2048 features),
    which "auto" takes for CUDA tensors that fit. Raises ValueError for a non-tensor or
    non-floating x, or a shift/scale/weight/bias of the wrong shape or device, and
    BackendUnavailableError when a forced backend cannot run.

    >>> x, shift, scale = torch.randn(3, 2, 5, 8).unbind(0)
    >>> adaln_modulate(x, shift, scale).shape
    torch.Size([2, 5, 8])
    """
    t = _check(x, {"shift": shift, "scale": scale}, weight, bias)
    kernels = _kernels(backend, x, "adaln_modulate")
    if kernels is None:
        return _modulate_norm(x, t["shift"], t["scale"], weight, bias, eps1, eps2, out_dtype)
    dtype = out_dtype or x.dtype
    return kernels.adaln(x, t["shift"], t["scale"], *_affine(x, weight, bias), eps1, eps2, dtype)[0]


def gated_residual(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """The AdaLN-Zero gated residual ``x + gate * y`` for x (N, D) or (B, T, D) (any (..., D)).

    gate and y have x's shape or broadcast to it. Returns x's shape in the promoted dtype of
    the three, differentiable in all three. ``backend`` and the errors raised as in
    :func:`adaln_modulate`.
    """
    t = _check(x, {"gate": gate, "y": y})
    kernels = _kernels(backend, x, "gated_residual")
    if kernels is None:
        return x + t["gate"] * t["y"]
    return kernels.gated_residual(x, t["gate"], t["y"])


def gated_adaln_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    res: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps1: float = EPS1,
    eps2: float = EPS2,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = gated_residual(x, gate, res)`` and ``y = adaln_modulate(out, shift, scale,
    weight, bias)`` together: a block's residual and the next branch's input, for x (N, D) or
    (B, T, D) (any (..., D)); gate, res, shift and scale have x's shape or broadcast to it.

    Returns (out, y), both of x's shape (out in the promoted dtype of x, gate and res; y in
    ``out_dtype``, default out's), differentiable in every tensor argument; "triton"
    computes both in one fused kernel. ``backend`` and the errors raised as in
    :func:`adaln_modulate`.
    """
    t = _check(x, {"gate": gate, "res": res, "shift": shift, "scale": scale}, weight, bias)
    kernels = _kernels(backend, x, "gated_adaln_modulate")
    if kernels is None:
        out = x + t["gate"] * t["res"]
        return out, _modulate_norm(out, t["shift"], t["scale"], weight, bias, eps1, eps2, out_dtype)
    promoted = torch.promote_types(torch.promote_types(x.dtype, t["gate"].dtype), t["res"].dtype)
    out, y, _ = kernels.gated_adaln(
        x,
        t["gate"],
        t["res"],
        t["shift"],
        t["scale"],
        *_affine(x, weight, bias),
        eps1,
        eps2,
        out_dtype or promoted,
    )
    return out, y
