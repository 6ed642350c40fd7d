"""LeWM's published evaluation through stable-worldmodel's ``World`` (needs ``lewm-fast[swm]``).

:func:`evaluate_world` is the published ``eval.py`` in the dataset-driven mode of
``World.evaluate``: start rows drawn with ``numpy.random.default_rng(seed)`` among the rows
that leave ``goal_offset`` steps in their episode, the goal the state ``goal_offset`` steps
later, ``WorldModelPolicy`` with the published ``process`` scalers (a standard scaler per
cached column) and image transforms (ImageNet normalisation, then a resize to the model's
frame size), the Two-Room ``callables`` that put the agent and the target where the
dataset says, and ``eval_budget`` env steps. Any stable-worldmodel ``Solver`` plans:
lewm_fast's :class:`~lewm_fast.plan.CEMSolver` or the published one. stable_worldmodel and
torchvision are imported when it runs, so lewm_fast imports without them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["evaluate_world", "StandardScaler", "image_transform", "TWO_ROOM_CALLABLES"]

# set the agent and the target of swm/TwoRoom-v1 from the dataset's start and goal rows
TWO_ROOM_CALLABLES = (
    {"method": "_set_state", "args": {"state": {"value": "proprio", "in_dataset": True}}},
    {"method": "_set_goal_state", "args": {"goal_state": {"value": "goal_proprio", "in_dataset": True}}},
)
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class StandardScaler:
    """scikit-learn's ``StandardScaler`` (population standard deviation), the published
    ``process`` scalers: ``fit(x (N, D))``, ``transform``, ``inverse_transform``."""

    def fit(self, x: np.ndarray) -> StandardScaler:
        self.mean_, self.scale_ = x.mean(axis=0), x.std(axis=0)
        self.scale_ = np.where(self.scale_ == 0, 1.0, self.scale_)  # sklearn leaves constant columns alone
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) / self.scale_

    def inverse_transform(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale_ + self.mean_


def image_transform(size: int):
    """The published ``img_transform``: uint8 HWC -> float [0, 1] -> ImageNet normalisation ->
    resize to ``size`` (torchvision v2)."""
    from torchvision.transforms import v2 as transforms

    return transforms.Compose(
        [
            transforms.ToImage(),
            transforms.ToDtype(torch.float32, scale=True),
            transforms.Normalize(**IMAGENET),
            transforms.Resize(size=size),
        ]
    )


def _start_rows(dataset, episodes: int, goal_offset: int, seed: int) -> dict:
    """The published draw: rows leaving ``goal_offset`` steps, ``default_rng(seed).choice`` without
    replacement, sorted; their ``episode_idx`` and ``step_idx``."""
    col = "episode_idx" if "episode_idx" in dataset.column_names else "ep_idx"
    episode, step = dataset.get_col_data(col), dataset.get_col_data("step_idx")
    length = np.zeros(int(episode.max()) + 1, dtype=np.int64)
    np.maximum.at(length, episode, step + 1)
    valid = np.nonzero(step <= length[episode] - goal_offset - 1)[0]
    if len(valid) < episodes:
        raise ValueError(f"{episodes} episodes asked for, only {len(valid)} rows leave {goal_offset} steps")
    rows = np.sort(valid[np.random.default_rng(seed).choice(len(valid), size=episodes, replace=False)])
    data = dataset.get_row_data(rows)
    return {"episodes_idx": data[col].tolist(), "start_steps": data["step_idx"].tolist()}


def evaluate_world(
    solver,
    dataset,
    *,
    episodes: int = 50,
    goal_offset: int = 25,
    budget: int = 50,
    seed: int = 42,
    image_size: int = 224,
    horizon: int = 5,
    action_block: int = 5,
    keys: tuple[str, ...] = ("action", "proprio"),
    env_name: str = "swm/TwoRoom-v1",
    callables=TWO_ROOM_CALLABLES,
) -> dict:
    """Run LeWM's evaluation with ``solver`` through ``World.evaluate`` (dataset-driven mode).

    dataset: a stable-worldmodel dataset with ``episode_idx``, ``step_idx``, ``pixels`` and
    ``keys`` columns (``HDF5Dataset``), or the path of an HDF5 file in the published layout
    (``lewm-fast export-hdf5`` writes one). ``episodes`` envs run together, one per start row;
    the policy plans ``horizon`` model actions of ``action_block`` env actions and executes
    them all before replanning (``receding_horizon = horizon``, as published). Frames are
    rendered at 224 px and resized to ``image_size`` (the model's). Returns World's result
    (``success_rate`` in percent, ``episode_successes``) plus ``elapsed_s`` and the start rows.
    """
    import stable_worldmodel as swm

    if isinstance(dataset, (str, os.PathLike)):
        from stable_worldmodel.data import HDF5Dataset

        dataset = HDF5Dataset(path=Path(dataset), keys_to_cache=list(keys))
    process = {}
    for key in keys:
        values = dataset.get_col_data(key)
        process[key] = StandardScaler().fit(values[~np.isnan(values).any(axis=1)])
        if key != "action":
            process[f"goal_{key}"] = process[key]
    start = _start_rows(dataset, episodes, goal_offset, seed)
    config = swm.PlanConfig(horizon=horizon, receding_horizon=horizon, action_block=action_block)
    transform = {"pixels": image_transform(image_size), "goal": image_transform(image_size)}
    policy = swm.policy.WorldModelPolicy(solver=solver, config=config, process=process, transform=transform)
    world = swm.World(env_name, num_envs=episodes, image_shape=(224, 224), max_episode_steps=2 * budget)
    try:
        world.set_policy(policy)
        began = time.perf_counter()
        result = world.evaluate(
            dataset=dataset,
            goal_offset=goal_offset,
            eval_budget=budget,
            callables=[dict(c) for c in callables] if callables else None,
            **start,
        )
        result["elapsed_s"] = time.perf_counter() - began
    finally:
        world.close()
    return {**result, **start}
