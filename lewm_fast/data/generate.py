"""Roll out Two-Room episodes with a data policy and store them as a dataset (spec section 4).

Episode e under seed s is a pure function of (s, e): its start, goal and per-step policy
randomness come from :func:`lewm_fast.envs.episode_generator` (s, e), and the rollout uses
the bit-exact :func:`lewm_fast.envs.step`, so a dataset does not depend on the device or
on how many episodes are rolled out together.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _checks
from ..envs.policies import NoisyExpert, UniformRandom, make_policy
from ..envs.two_room import (
    DEFAULT_LAYOUT,
    TwoRoomLayout,
    distance,
    episode_generator,
    layout_image,
    render,
    sample_start_goal,
    step,
)
from .dataset import DatasetWriter, TwoRoomDataset

__all__ = ["generate_dataset", "rollout", "draw_episodes"]


def draw_episodes(
    seed: int,
    episodes: range,
    policy: NoisyExpert | UniformRandom,
    max_steps: int,
    layout: TwoRoomLayout = DEFAULT_LAYOUT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Starts (C, 2), goals (C, 2) and policy randomness (C, max_steps, 2) of ``episodes`` (CPU)."""
    starts, goals, noise = [], [], []
    for e in episodes:
        gen = episode_generator(seed, e)
        start, goal = sample_start_goal(gen, layout)
        starts.append(start)
        goals.append(goal)
        noise.append(policy.draw(max_steps, gen))
    return torch.stack(starts), torch.stack(goals), torch.stack(noise)


@torch.no_grad()
def rollout(
    agent_xy: torch.Tensor,
    goal_xy: torch.Tensor,
    noise: torch.Tensor,
    policy: NoisyExpert | UniformRandom,
    layout: TwoRoomLayout = DEFAULT_LAYOUT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Roll C episodes until success or ``noise.shape[1]`` steps, on the device of the inputs.

    Args: starts (C, 2), goals (C, 2), policy randomness (C, T, 2).
    Returns positions (C, T + 1, 2), actions (C, T, 2) and lengths (C,) int64, the number
    of actions each episode took (it ends at the first step reaching distance < 16 px, or
    after T). Entries past an episode's length are scratch and must be ignored.
    """
    c, max_steps = noise.shape[:2]
    positions = torch.empty(c, max_steps + 1, 2, device=agent_xy.device)
    actions = torch.empty(c, max_steps, 2, device=agent_xy.device)
    lengths = torch.full((c,), max_steps, dtype=torch.int64, device=agent_xy.device)
    alive = torch.ones(c, dtype=torch.bool, device=agent_xy.device)
    positions[:, 0] = agent_xy
    p = agent_xy
    for t in range(max_steps):
        a = policy(p, goal_xy, noise[:, t])
        p = step(p, a, layout, check=False)
        actions[:, t] = a
        positions[:, t + 1] = p
        done = distance(p, goal_xy) < layout.success_distance
        lengths = torch.where(alive & done, torch.full_like(lengths, t + 1), lengths)
        alive = alive & ~done
        if (t + 1) % 10 == 0 and not bool(alive.any()):
            break
    return positions, actions, lengths


def _rows(positions, actions, lengths, goals, first_episode: int) -> dict[str, np.ndarray]:
    positions, actions = positions.cpu().numpy(), actions.cpu().numpy()
    lengths, goals = lengths.cpu().numpy(), goals.cpu().numpy()
    c, t1 = positions.shape[:2]
    ep_len = lengths + 1
    keep = np.arange(t1)[None, :] < ep_len[:, None]  # (C, T + 1)
    action = np.concatenate([actions, np.full((c, 1, 2), np.nan, np.float32)], axis=1)
    action[np.arange(c), lengths] = np.nan  # the last row of each episode takes no action
    return {
        "episode_idx": np.repeat(np.arange(first_episode, first_episode + c, dtype=np.int32), ep_len),
        "step_idx": np.nonzero(keep)[1].astype(np.int32),
        "proprio": positions[keep].astype(np.float32),
        "goal": np.repeat(goals.astype(np.float32), ep_len, axis=0),
        "action": action[keep].astype(np.float32),
        "ep_len": ep_len.astype(np.int64),
    }


def generate_dataset(
    path: str | os.PathLike,
    *,
    episodes: int = 10_000,
    policy: str = "expert",
    seed: int = 0,
    max_steps: int = 100,
    frames: bool = False,
    device: str | torch.device = "cpu",
    batch_episodes: int = 1024,
    shard_frames: int = 512,
    layout: TwoRoomLayout = DEFAULT_LAYOUT,
    force: bool = False,
    progress: bool = True,
) -> TwoRoomDataset:
    """Roll out ``episodes`` Two-Room episodes and write them to the dataset folder ``path``.

    ``policy`` is "expert" (the published noisy expert) or "random" (uniform actions).
    Each episode runs until success or ``max_steps`` actions and stores one row per
    visited state (ep_len = actions + 1; the last row's action is NaN). ``frames=True``
    also stores the uint8 frames in shards of ``shard_frames``; otherwise they are
    rendered from ``proprio`` when needed. Deterministic in ``seed`` (independent of
    ``device`` and ``batch_episodes``). The write is atomic; an existing dataset is
    replaced only with ``force=True``. Returns the opened dataset.
    """
    for name, value, low in (
        ("episodes", episodes, 1),
        ("max_steps", max_steps, 1),
        ("batch_episodes", batch_episodes, 1),
        ("seed", seed, 0),
    ):
        _checks.integer(value, name, low)
    actor = make_policy(policy, layout)
    device = torch.device(device)
    background = layout_image(layout, device) if frames else None
    offsets = 0
    parts: list[dict[str, np.ndarray]] = []
    with DatasetWriter(path, force=force, shard_rows=shard_frames) as writer:
        bar = tqdm(total=episodes, unit="episode", desc="generate-data", disable=not progress)
        for first in range(0, episodes, batch_episodes):
            chunk = range(first, min(first + batch_episodes, episodes))
            starts, goals, noise = draw_episodes(seed, chunk, actor, max_steps, layout)
            out = rollout(starts.to(device), goals.to(device), noise.to(device), actor, layout)
            part = _rows(*out, goals, first)
            part["ep_offset"] = offsets + np.concatenate([[0], np.cumsum(part["ep_len"])[:-1]]).astype(
                np.int64
            )
            offsets += int(part["ep_len"].sum())
            parts.append(part)
            if frames:
                proprio = torch.from_numpy(part["proprio"]).to(device)
                for i in range(0, proprio.shape[0], 256):
                    writer.add_frames(
                        render(proprio[i : i + 256], layout, background=background, check=False).cpu().numpy()
                    )
            bar.update(len(chunk))
        bar.close()
        columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        source = {
            "kind": "generated",
            "policy": actor.name,
            "seed": seed,
            "episodes": episodes,
            "max_steps": max_steps,
        }
        if isinstance(actor, NoisyExpert):
            source.update(noise_std=actor.noise_std, door_radius=actor.door_radius)
        writer.commit(columns, layout, source)
    return TwoRoomDataset.open(path)
