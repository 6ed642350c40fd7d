"""Batched CEM elite selection and refit: every env in one call.

``cem_refit(candidates (B, S, T, A), costs (B, S), mean (B, T, A), std (B, T, A), topk)``
does, per env, what :func:`lewm_fast.reference.cem.cem_refit` does for one: the elites are
the ``topk`` lowest costs with NaN costs ordered after all others and then dropped; the new
mean and unbiased std are taken over the remaining elites, or the previous ones are kept
when fewer than two remain. Nothing here synchronises with the host, so it runs inside a
CUDA graph; NaN costs are reported through ``nan_count`` instead of a warning.

Backends: ``"torch"`` (PyTorch ops), ``"cuda"`` (the csrc extension: the CUDA kernel on
CUDA tensors, its C++ twin on CPU tensors) and ``"auto"``: the CUDA kernel on CUDA tensors
when it builds, else the PyTorch ops. ``$LEWM_FAST_BACKEND`` replaces ``"auto"``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks, _csrc
from .. import backend as _backend

__all__ = ["Refit", "cem_refit", "cem_refit_torch", "CUDA_MAX_SHARED_ITEMS"]

# S + topk the CUDA kernel holds in shared memory (csrc/cem_refit_kernel.cuh).
CUDA_MAX_SHARED_ITEMS = 12000


class Refit(NamedTuple):
    """Output of :func:`cem_refit`."""

    mean: torch.Tensor  # (B, T, A) elite mean
    std: torch.Tensor  # (B, T, A) elite unbiased std
    elite_cost: torch.Tensor  # (B,) mean cost of the elites (NaN if all costs are NaN)
    nan_count: torch.Tensor  # (B,) int32, NaN costs among the S samples


def _check(candidates, costs, mean, std, topk) -> None:
    for name, value, dims in (
        ("candidates", candidates, 4),
        ("costs", costs, 2),
        ("mean", mean, 3),
        ("std", std, 3),
    ):
        if not torch.is_tensor(value) or value.dim() != dims:
            got = _checks.shape(value) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"cem_refit: {name} must be a {dims}-d tensor, got {got}")
    b, s, t, a = candidates.shape
    if tuple(costs.shape) != (b, s):
        raise ValueError(
            f"cem_refit: costs must be (B, S) = ({b}, {s}) to match candidates {_checks.shape(candidates)}, "
            f"got {_checks.shape(costs)}"
        )
    for name, value in (("mean", mean), ("std", std)):
        if tuple(value.shape) != (b, t, a):
            raise ValueError(
                f"cem_refit: {name} must be (B, T, A) = ({b}, {t}, {a}), got {_checks.shape(value)}"
            )
    if isinstance(topk, bool) or not isinstance(topk, int) or not 2 <= topk <= s:
        raise ValueError(
            f"cem_refit: topk must be an int in [2, S = {s}] (the unbiased std needs two elites)"
        )
    devices = {v.device for v in (candidates, costs, mean, std)}
    if len(devices) != 1:
        raise ValueError(f"cem_refit: all inputs must be on one device, got {sorted(map(str, devices))}")


def cem_refit_torch(
    candidates: torch.Tensor, costs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, topk: int
) -> Refit:
    """The refit in PyTorch ops (shapes as in :func:`cem_refit`); float32 accumulation."""
    b, s, t, a = candidates.shape
    nan = torch.isnan(costs)
    # Sort keys in float64: NaN -> +inf and a genuine +inf -> the largest double, so NaN
    # costs come after every other cost (float32 values are exact in float64).
    key = costs.double()
    key = torch.where(key == float("inf"), torch.finfo(torch.float64).max, key)
    key = torch.where(nan, float("inf"), key)
    idx = torch.topk(key, topk, dim=1, largest=False, sorted=True).indices  # (B, K)
    elite_costs = costs.gather(1, idx)
    kept = ~torch.isnan(elite_costs)  # (B, K)
    weight = kept.to(candidates.dtype)
    n = weight.sum(dim=1)  # (B,)
    elites = candidates.gather(1, idx[:, :, None, None].expand(b, topk, t, a))  # (B, K, T, A)
    w = weight[:, :, None, None]
    new_mean = (elites * w).sum(dim=1) / n.clamp(min=1)[:, None, None]
    sq = ((elites - new_mean[:, None]) * w).square().sum(dim=1)
    new_std = (sq / (n - 1).clamp(min=1)[:, None, None]).sqrt()
    ok = (n >= 2)[:, None, None]
    elite_cost = torch.where(kept, elite_costs, 0.0).sum(dim=1) / n  # 0 / 0 = NaN with no elite
    return Refit(
        torch.where(ok, new_mean, mean),
        torch.where(ok, new_std, std),
        elite_cost,
        nan.sum(dim=1, dtype=torch.int32),
    )


def _extension(tensor: torch.Tensor) -> str:
    return "cem_refit_cuda" if tensor.is_cuda else "cem_refit_cpu"


def csrc_unavailable_reason(candidates: torch.Tensor, topk: int | None = None) -> str | None:
    """Why the csrc kernels cannot run on these candidates (None when they can)."""
    if candidates.device.type not in ("cpu", "cuda"):
        return f"the csrc extension has no kernel for {candidates.device.type} tensors"
    if candidates.is_cuda and topk is not None and candidates.shape[1] + topk > CUDA_MAX_SHARED_ITEMS:
        return f"the CUDA kernel takes S + topk <= {CUDA_MAX_SHARED_ITEMS}"
    return _csrc.unavailable_reason(_extension(candidates), candidates.device)


def cem_refit(
    candidates: torch.Tensor,
    costs: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    topk: int,
    *,
    backend: str | None = "auto",
) -> Refit:
    """Per-env elite selection and refit for all B envs at once.

    candidates (B, S, T, A), costs (B, S), mean and std (B, T, A) (the distribution the
    candidates were drawn from, kept for envs with fewer than two non-NaN elites), topk in
    [2, S]. Returns :class:`Refit` (mean, std (B, T, A); elite_cost (B,); nan_count (B,)).
    The csrc kernels take float32; other dtypes are cast.
    """
    _check(candidates, costs, mean, std, topk)
    choice = _backend.resolve(
        backend,
        candidates,
        "cem_refit",
        supported=("cuda", "torch"),
        cuda_unavailable_reason=lambda t: csrc_unavailable_reason(t, topk),
    )
    if choice == "cuda":
        args = (x.float().contiguous() for x in (candidates, costs, mean, std))
        return Refit(*torch.ops.lewm_fast.cem_refit(*args, topk))
    return cem_refit_torch(candidates, costs, mean, std, topk)
