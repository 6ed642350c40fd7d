"""A gymnasium single-environment wrapper of Two-Room (needs ``pip install lewm-fast[gym]``).

Importing this module registers ``lewm_fast/TwoRoom-v1`` (100-step time limit), so::

    import gymnasium as gym
    env = gym.make("lewm_fast.envs.gym:lewm_fast/TwoRoom-v1")  # imports and registers
    obs, info = env.reset(seed=0)
    frame = env.render()                                        # uint8 (224, 224, 3)

gymnasium releases before 1.0 also find it through the ``gymnasium.envs`` entry point
of the package. Observations are ``{"proprio": agent (x, y), "goal": goal (x, y)}``
float32; pixels come from ``render()`` (render_mode "rgb_array"). The action is (dx, dy)
in [-1, 1]^2. An episode terminates on success (distance < 16 px), reward 1.0 then and
0.0 otherwise; ``info`` holds ``distance`` and ``success``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.core import Env
from gymnasium.envs.registration import register as _register
from gymnasium.envs.registration import registry

from .two_room import DEFAULT_LAYOUT, TwoRoom, TwoRoomLayout, episode_generator, sample_start_goal

__all__ = ["TwoRoomGymEnv", "register", "ENV_ID"]

ENV_ID = "lewm_fast/TwoRoom-v1"


def _pop_either(options: dict, name: str, alias: str):
    value = options.pop(name, None)
    other = options.pop(alias, None)
    return value if value is not None else other


def _xy(value, name: str) -> torch.Tensor:
    array = np.asarray(value, dtype=np.float32)
    if array.size != 2:
        raise ValueError(f"reset option {name} must hold one (x, y) position, got shape {array.shape}")
    return torch.from_numpy(array.reshape(1, 2).copy())


class TwoRoomGymEnv(Env):
    """One Two-Room environment behind the gymnasium API (reset(seed, options), step, render).

    ``reset(seed=s)`` starts episode 0 of seed s (the same start and goal as episode 0 of
    a dataset generated with seed s); later unseeded resets take episodes 1, 2, ...
    ``options`` may give ``agent_xy`` and ``goal_xy`` (published names ``state`` and
    ``goal_state`` also work) to start from explicit positions.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = "rgb_array", layout: TwoRoomLayout = DEFAULT_LAYOUT):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.layout = layout
        self._env = TwoRoom(1, device="cpu", layout=layout)
        hi = float(layout.size - 1)
        box = spaces.Box(low=0.0, high=hi, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Dict({"proprio": box, "goal": box})
        self.action_space = spaces.Box(low=-1.0, high=1.0, shape=(2,), dtype=np.float32)
        self._seed: int | None = None
        self._episode = 0

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "proprio": self._env.agent_xy[0].numpy().copy(),
            "goal": self._env.goal_xy[0].numpy().copy(),
        }

    def _info(self) -> dict[str, Any]:
        dist = float(self._env.distance()[0])
        return {"distance": dist, "success": dist < self.layout.success_distance}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        agent = _pop_either(options, "agent_xy", "state")
        goal = _pop_either(options, "goal_xy", "goal_state")
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; expected agent_xy and goal_xy")
        if (agent is None) != (goal is None):
            raise ValueError("reset options must give both agent_xy and goal_xy, or neither")
        if agent is not None:
            self._env.reset(agent_xy=_xy(agent, "agent_xy"), goal_xy=_xy(goal, "goal_xy"))
            return self._obs(), self._info()
        if seed is not None:
            self._seed, self._episode = int(seed), 0
        elif self._seed is None:
            self._seed, self._episode = int(self.np_random.integers(2**62)), 0
        start, target = sample_start_goal(episode_generator(self._seed, self._episode), self.layout)
        self._env.reset(agent_xy=start[None], goal_xy=target[None])
        self._episode += 1
        return self._obs(), self._info()

    def step(self, action):
        action = torch.as_tensor(np.asarray(action, dtype=np.float32).reshape(1, 2))
        out = self._env.step(action)
        success = bool(out["success"][0])
        info = {"distance": float(out["distance"][0]), "success": success}
        return self._obs(), 1.0 if success else 0.0, success, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        return self._env.render()[0].numpy()

    def goal_image(self) -> np.ndarray:
        """The goal frame, uint8 (224, 224, 3)."""
        return self._env.render_goal()[0].numpy()


def register() -> None:
    """Register ``lewm_fast/TwoRoom-v1`` with gymnasium (idempotent; also the entry point hook)."""
    if ENV_ID not in registry:
        _register(id=ENV_ID, entry_point=TwoRoomGymEnv, max_episode_steps=100)


register()
