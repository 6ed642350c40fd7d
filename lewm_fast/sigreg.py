"""SIGReg: the public drop-in module and functional form.

``SIGReg(knots=17, num_proj=1024)`` draws its projection matrix exactly like the published
module (one ``torch.randn(D, P)`` from the global generator per call), so a seeded run
gives the same loss. The math is :mod:`lewm_fast.reference.sigreg` until the fused
kernel lands.
"""

from __future__ import annotations

import functools

import torch

from . import _checks
from .reference import sigreg as _ref

__all__ = ["SIGReg", "sigreg"]


@functools.lru_cache(maxsize=16)
def _quadrature(knots: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ref.sigreg_quadrature(knots, device=device)


def _check(z: torch.Tensor, A: torch.Tensor | None = None) -> None:
    _checks.tensor(z, "z", ("T", "B", "D"))
    if not z.is_floating_point():
        raise ValueError(f"z must be floating point, got {z.dtype}")
    if z.shape[1] < 1 or z.shape[2] < 1:
        raise ValueError(f"z must have a non-empty batch and embedding axis, got shape {tuple(z.shape)}")
    if A is not None:
        _checks.tensor(A, "A", ("D", "P"))
        if A.shape[0] != z.shape[-1]:
            raise ValueError(
                f"A must have D = {z.shape[-1]} rows to project z {tuple(z.shape)}, "
                f"got A of shape {tuple(A.shape)}"
            )


def sigreg(z: torch.Tensor, A: torch.Tensor, knots: int = 17) -> torch.Tensor:
    """SIGReg statistic for embeddings z (T, B, D) and unit-norm directions A (D, P).

    Returns ``mean_{t,p} B * sum_k w_k ((C_k - phi_k)^2 + S_k^2)`` as a 0-dim float32
    tensor (spec section 3), differentiable in z.
    """
    _check(z, A)
    t, phi, weights = _quadrature(knots, z.device)
    return _ref.sigreg_statistic(z, A, t, phi, weights)


class SIGReg(_ref.SIGReg):
    """Drop-in SIGReg module: ``forward(proj (T, B, D))`` -> scalar, fresh directions each call."""

    def forward(self, proj: torch.Tensor) -> torch.Tensor:
        _check(proj)
        return super().forward(proj)
