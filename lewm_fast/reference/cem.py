"""The cross-entropy method (CEM) planner of spec section 6, one environment at a time.

Plain and readable: the semantics the batched, graph-captured ``lewm_fast.plan.CEMSolver``
is tested against. It plans against any ``get_cost(info, candidates (B, S, T, A)) -> (B, S)``
(the published world-model API, e.g. ``JEPA.get_cost``), calling it with B = 1.

Per env: mean = zeros (T, A) (or the warm-start ``init_action`` in its first rows), std =
``var_scale`` everywhere; then ``n_steps`` times: draw ``num_samples`` candidates
mean + std * N(0, 1), overwrite candidate 0 with the mean, score them, and refit mean and
std to the ``topk`` lowest-cost candidates (the elites). The plan is the final mean.

NaN costs are never elites: elites are the lowest non-NaN costs (ties go to the lower
sample index), and a warning says how many NaN costs were masked. With fewer than two
non-NaN elites the unbiased std is undefined, so the distribution is left unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["cem_refit", "cem_plan_env", "cem_plan"]


def cem_refit(
    candidates: torch.Tensor, costs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CEM refit for one env.

    candidates (S, T, A), costs (S,), mean and std (T, A) -> (mean (T, A), std (T, A),
    elite_cost ()): the elites are the ``topk`` lowest non-NaN costs; the new mean is their
    mean and the new std their unbiased standard deviation (divisor n - 1). elite_cost is
    the mean of the elite costs (NaN if every cost is NaN).
    """
    nan = torch.isnan(costs)
    if nan.any():
        warnings.warn(
            f"CEM: {int(nan.sum())} of {costs.numel()} candidate costs are NaN; they are "
            "never selected as elites",
            RuntimeWarning,
            stacklevel=2,
        )
    valid = torch.nonzero(~nan).squeeze(1)
    elites = valid[torch.argsort(costs[valid], stable=True)][:topk]
    if elites.numel() == 0:
        return mean, std, costs.new_tensor(float("nan"))
    elite_cost = costs[elites].mean()
    if elites.numel() < 2:  # the unbiased std needs two elites: keep the distribution
        return mean, std, elite_cost
    chosen = candidates[elites]
    return chosen.mean(dim=0), chosen.std(dim=0), elite_cost


def _repeat_for_samples(value, num_samples: int):
    """One env's info value -> (1, S, ...) as the published solver passes it to get_cost."""
    if torch.is_tensor(value):
        return value.unsqueeze(0).unsqueeze(0).expand(1, num_samples, *value.shape)
    if isinstance(value, np.ndarray):
        return np.repeat(value[None, None], num_samples, axis=1)
    return value


@torch.no_grad()
def cem_plan_env(
    get_cost: Callable[[dict, torch.Tensor], torch.Tensor],
    info: dict,
    *,
    horizon: int,
    action_dim: int,
    num_samples: int = 300,
    n_steps: int = 30,
    topk: int = 30,
    var_scale: float = 1.0,
    init_action: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Plan one env with CEM.

    info: that env's entries without an env axis (e.g. ``pixels`` (H, C, h, w), ``goal``
    (1, C, h, w)); they reach ``get_cost`` as (1, S, ...). init_action: (T0, A) with
    T0 <= horizon, the first rows of the initial mean. Returns ``actions`` (horizon, A), the
    final mean; ``std`` (horizon, A); ``cost`` (), the mean elite cost of the last iteration.
    """
    mean = torch.zeros(horizon, action_dim, device=device)
    if init_action is not None:
        mean[: init_action.shape[0]] = init_action.to(device)
    std = torch.full((horizon, action_dim), float(var_scale), device=device)
    expanded = {key: _repeat_for_samples(value, num_samples) for key, value in info.items()}
    elite_cost = torch.tensor(float("nan"))
    for _ in range(n_steps):
        noise = torch.randn(num_samples, horizon, action_dim, generator=generator, device=device)
        candidates = noise * std + mean
        candidates[0] = mean
        costs = get_cost(dict(expanded), candidates.unsqueeze(0))
        if not torch.is_tensor(costs) or tuple(costs.shape) != (1, num_samples):
            shape = tuple(costs.shape) if torch.is_tensor(costs) else type(costs).__name__
            raise ValueError(f"get_cost must return costs of shape (1, {num_samples}), got {shape}")
        mean, std, elite_cost = cem_refit(candidates, costs[0].float().to(device), mean, std, topk)
    return {"actions": mean, "std": std, "cost": elite_cost}


def cem_plan(
    get_cost: Callable[[dict, torch.Tensor], torch.Tensor],
    info_dict: dict,
    *,
    init_action: torch.Tensor | None = None,
    **kwargs,
) -> dict:
    """Plan B envs one after the other with :func:`cem_plan_env`.

    info_dict values carry a leading env axis B; init_action is (B, T0, A) or None; the other
    keyword arguments are those of :func:`cem_plan_env`. Returns ``actions`` and ``std``
    (B, horizon, A) and ``costs`` (B,).
    """
    sizes = {len(v) for v in info_dict.values() if torch.is_tensor(v) or isinstance(v, np.ndarray)}
    if len(sizes) != 1:
        raise ValueError(f"info_dict arrays must share one leading env axis, got sizes {sorted(sizes)}")
    envs = sizes.pop()
    plans = [
        cem_plan_env(
            get_cost,
            {
                k: (v[b] if torch.is_tensor(v) or isinstance(v, np.ndarray) else v)
                for k, v in info_dict.items()
            },
            init_action=None if init_action is None else init_action[b],
            **kwargs,
        )
        for b in range(envs)
    ]
    return {
        "actions": torch.stack([p["actions"] for p in plans]),
        "std": torch.stack([p["std"] for p in plans]),
        "costs": torch.stack([p["cost"] for p in plans]),
    }
