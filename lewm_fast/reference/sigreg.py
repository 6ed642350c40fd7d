"""SIGReg, the sketched isotropic-Gaussian regulariser, in plain PyTorch (spec section 3).

For embeddings z (T, B, D) and unit-norm random directions A (D, P), x = z @ A.
With knots t_k = linspace(0, 3, K), phi_k = exp(-t_k^2 / 2) and trapezoid weights
w_k = phi_k * (dt at the two ends, 2 dt inside):

    C = mean_B cos(t_k x),  S = mean_B sin(t_k x)
    statistic(t, p) = B * sum_k w_k ((C - phi_k)^2 + S^2)
    SIGReg = mean over (t, p) of statistic

This materialises the (T, B, P, K) tensor; it is the semantics, not the fast path.
"""

from __future__ import annotations

import torch
from torch import nn


def sigreg_quadrature(
    knots: int = 17, t_max: float = 3.0, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knots t (K,), Gaussian characteristic function phi (K,), quadrature weights w (K,)."""
    if knots < 2:
        raise ValueError(f"SIGReg needs at least 2 knots, got {knots}")
    t = torch.linspace(0, t_max, knots, dtype=torch.float32, device=device)
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt, dtype=torch.float32, device=device)
    weights[[0, -1]] = dt
    phi = torch.exp(-t.square() / 2.0)
    return t, phi, weights * phi


def draw_projections(dim: int, num_proj: int, device=None) -> torch.Tensor:
    """A (dim, num_proj) from the global generator, each column scaled to unit L2 norm.

    Consumes the generator exactly as the published code: one ``torch.randn(D, P)`` call.
    """
    a = torch.randn(dim, num_proj, device=device)
    return a.div_(a.norm(p=2, dim=0))


def sigreg_statistic(
    z: torch.Tensor, A: torch.Tensor, t: torch.Tensor, phi: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """SIGReg value (a 0-dim float32 tensor) for z (T, B, D) and directions A (D, P).

    The projection runs in z's dtype (as under bf16 autocast); the trigonometry in float32.
    """
    x = (z @ A.to(z.dtype)).float()  # (T, B, P)
    x_t = x.unsqueeze(-1) * t  # (T, B, P, K)
    err = (x_t.cos().mean(-3) - phi).square() + x_t.sin().mean(-3).square()  # (T, P, K)
    statistic = (err @ weights) * z.size(-2)  # (T, P)
    return statistic.mean()


class SIGReg(nn.Module):
    """SIGReg module: draws fresh directions at every call, ``forward(proj (T, B, D))`` -> scalar."""

    def __init__(self, knots: int = 17, num_proj: int = 1024):
        super().__init__()
        self.num_proj = num_proj
        t, phi, weights = sigreg_quadrature(knots)
        self.register_buffer("t", t)
        self.register_buffer("phi", phi)
        self.register_buffer("weights", weights)

    def forward(self, proj: torch.Tensor) -> torch.Tensor:
        """SIGReg of proj (T, B, D) along ``num_proj`` fresh random directions: a 0-dim tensor."""
        A = draw_projections(proj.size(-1), self.num_proj, device=proj.device)
        return sigreg_statistic(proj, A, self.t, self.phi, self.weights)
