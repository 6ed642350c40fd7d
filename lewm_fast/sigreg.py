"""SIGReg: the public drop-in module and functional form.

``SIGReg(knots=17, num_proj=1024)`` draws its projection matrix exactly like the published
module (one ``torch.randn(D, P)`` from the global generator per call), so a seeded run
gives the same loss. On CUDA it runs the fused Triton kernel (``lewm_fast.kernels.sigreg``),
which never materialises the (T, B, P, K) tensor; elsewhere the reference math.

Multi-process training: C and S are means over the *global* batch. With
``distributed=True`` (the default when ``torch.distributed`` is initialised with more than
one process) every rank all-reduces its cos/sin sums before forming the statistic, so each
rank gets the single-process value of the whole batch, and the gradient with respect to
each rank's z is exactly its slice of the single-process gradient. The module broadcasts
rank 0's projection matrix so every rank projects the same way. (Data-parallel wrappers
that *average* parameter gradients over ranks scale this term by 1 / world_size; a trainer
that wants the single-process gradient multiplies the SIGReg term by the world size.)
"""

from __future__ import annotations

import functools

import torch

from . import _checks
from . import backend as _backend
from .reference import sigreg as _ref

__all__ = ["SIGReg", "sigreg"]

T_MAX = 3.0  # the last knot (spec section 3)


@functools.lru_cache(maxsize=16)
def _quadrature(knots: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ref.sigreg_quadrature(knots, T_MAX, device=device)


def _check(z: torch.Tensor, A: torch.Tensor | None = None) -> None:
    _checks.tensor(z, "z", ("T", "B", "D"))
    if not z.is_floating_point():
        raise ValueError(f"z must be floating point, got {z.dtype}")
    if z.shape[1] < 1 or z.shape[2] < 1:
        raise ValueError(f"z must have a non-empty batch and embedding axis, got shape {_checks.shape(z)}")
    if A is not None:
        _checks.tensor(A, "A", ("D", "P"))
        if A.shape[0] != z.shape[-1]:
            raise ValueError(
                f"A must have D = {z.shape[-1]} rows to project z {_checks.shape(z)}, "
                f"got A of shape {_checks.shape(A)}"
            )


def _distributed(requested: bool | None) -> bool:
    """Whether to all-reduce: None -> on when torch.distributed runs more than one process."""
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if requested and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("SIGReg distributed=True needs an initialised torch.distributed process group")
    return active if requested is None else bool(requested)


def _all_reduced(local: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``local``, differentiable as the identity in ``local``."""
    import torch.distributed as dist

    total = local.detach().clone()
    dist.all_reduce(total)
    return local + (total - local.detach())


def _trig_sums_torch(z: torch.Tensor, A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum_b cos / sin (t_k x) as (2, T, K, P) float32, in plain PyTorch."""
    x = (z @ A.to(z.dtype)).float()  # (T, B, P)
    x_t = x.unsqueeze(-1) * t  # (T, B, P, K)
    return torch.stack([x_t.cos().sum(1), x_t.sin().sum(1)]).transpose(-1, -2)


def _statistic_from_sums(sums: torch.Tensor, phi: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """SIGReg from (2, T, K, P) sums; n is the k = 0 cosine sum (cos 0 = 1 per sample)."""
    n = sums[0, 0, 0, 0].detach()
    C, S = sums[0] / n, sums[1] / n  # (T, K, P)
    err = (C - phi[:, None]).square() + S.square()
    return (n * (weights[:, None] * err).sum(1)).mean()


def _dispatch(z, A, t, phi, weights, backend, distributed) -> torch.Tensor:
    name = _backend.resolve(backend, z, "sigreg")
    global_batch = _distributed(distributed)
    dt = T_MAX / (t.numel() - 1)
    if name == "triton":
        from .kernels import sigreg as kernel

        if not global_batch:
            return kernel.statistic(z, A, phi, weights, dt)[0]
        sums = kernel.trig_sums(z, A, phi, weights, dt)
    else:
        if not global_batch:
            return _ref.sigreg_statistic(z, A, t, phi, weights)
        sums = _trig_sums_torch(z, A, t)
    return _statistic_from_sums(_all_reduced(sums), phi, weights)


def sigreg(
    z: torch.Tensor,
    A: torch.Tensor,
    knots: int = 17,
    *,
    backend: str = "auto",
    distributed: bool | None = None,
) -> torch.Tensor:
    """SIGReg statistic for embeddings z (T, B, D) and unit-norm directions A (D, P).

    Returns ``mean_{t,p} B * sum_k w_k ((C_k - phi_k)^2 + S_k^2)`` as a 0-dim float32
    tensor (spec section 3), differentiable in z (and A). ``backend``: "auto", "triton"
    or "torch" (see :mod:`lewm_fast.backend`). ``distributed``: all-reduce the moment
    sums over the default process group (every rank must pass the same A).
    """
    _check(z, A)
    t, phi, weights = _quadrature(knots, z.device)
    return _dispatch(z, A, t, phi, weights, backend, distributed)


class SIGReg(_ref.SIGReg):
    """Drop-in SIGReg module: ``forward(proj (T, B, D))`` -> scalar, fresh directions each call.

    ``backend`` and ``distributed`` as in :func:`sigreg`; the published arguments
    ``knots`` and ``num_proj`` keep their meaning and defaults. As the published module,
    it raises RuntimeError for ``proj`` on another device than its buffers (``.to(device)``).
    """

    def __init__(
        self, knots: int = 17, num_proj: int = 1024, *, backend: str = "auto", distributed: bool | None = None
    ):
        super().__init__(knots, num_proj)
        self.backend = _backend.check_name(backend)
        self.distributed = distributed

    def forward(self, proj: torch.Tensor) -> torch.Tensor:
        """SIGReg of embeddings proj (T, B, D) along ``num_proj`` fresh random directions
        (drawn from the global torch generator): a 0-dim float32 tensor."""
        _check(proj)
        for name, buffer in (("t", self.t), ("phi", self.phi), ("weights", self.weights)):
            if buffer.device != proj.device:  # a kernel would read another device's memory
                raise RuntimeError(
                    f"SIGReg's buffer {name!r} is on {buffer.device} but proj is on {proj.device}: "
                    f"move the module first, sigreg.to({str(proj.device)!r})"
                )
        A = _ref.draw_projections(proj.size(-1), self.num_proj, device=proj.device)
        if _distributed(self.distributed):
            import torch.distributed as dist

            dist.broadcast(A, src=0)
        return _dispatch(proj, A, self.t, self.phi, self.weights, self.backend, self.distributed)
