"""Data-collection policies for Two-Room, vectorised and seeded (spec section 4).

A policy splits into randomness and a pure map: ``draw(n, generator)`` takes the per-step
randomness from a CPU ``torch.Generator`` (so a seed gives the same numbers on every
device), and ``policy(agent_xy, goal_xy, randomness)`` turns it into (N, 2) actions with
exact float32 arithmetic. ``act`` does both for a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks
from .two_room import DEFAULT_LAYOUT, TwoRoomLayout, norm_xy

__all__ = ["NoisyExpert", "UniformRandom", "POLICIES", "make_policy"]


def _unit(vec: torch.Tensor) -> torch.Tensor:
    norm = norm_xy(vec)[:, None]
    return torch.where(norm > 0, vec / norm, torch.zeros_like(vec))


class _Policy:
    name: str

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, agent_xy: torch.Tensor, goal_xy: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def act(
        self, agent_xy: torch.Tensor, goal_xy: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Actions (N, 2) for agents (N, 2) heading to goals (N, 2), randomness from ``generator``."""
        if agent_xy.dim() != 2 or agent_xy.shape[1] != 2 or goal_xy.shape != agent_xy.shape:
            raise ValueError(
                f"agent_xy and goal_xy must both have shape (N, 2), got {_checks.shape(agent_xy)} "
                f"and {_checks.shape(goal_xy)}"
            )
        noise = self.draw(agent_xy.shape[0], generator).to(agent_xy.device)
        return self(agent_xy, goal_xy, noise)


@dataclass(frozen=True)
class NoisyExpert(_Policy):
    """The published data policy.

    Target = the door centre (112, 49) while the goal is in the other room (opposite side
    of x = 112) and the agent is farther than ``door_radius`` = 10.5 px from the door
    centre, else the goal. Action = clip(unit(target - agent) + N(0, noise_std^2), -1, 1)
    per component, noise_std = 2.0. (The published 5% action-repeat option never fires, so
    there is none here.)
    """

    layout: TwoRoomLayout = DEFAULT_LAYOUT
    noise_std: float = 2.0
    door_radius: float = 10.5
    name = "expert"

    def __post_init__(self) -> None:
        if not self.noise_std >= 0 or not self.door_radius >= 0:
            raise ValueError(
                f"noise_std and door_radius must be non-negative, got {self.noise_std}, {self.door_radius}"
            )

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian noise N(0, noise_std^2), float32 (n, 2) on the CPU."""
        return torch.randn(n, 2, generator=generator) * float(self.noise_std)

    def __call__(self, agent_xy: torch.Tensor, goal_xy: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Actions (N, 2) from positions (N, 2), goals (N, 2) and drawn noise (N, 2)."""
        center = float(self.layout.wall_center)
        door = torch.tensor(self.layout.door_xy, dtype=torch.float32, device=agent_xy.device)
        to_door = door - agent_xy
        far = norm_xy(to_door) > self.door_radius
        other_room = (agent_xy[:, 0] < center) != (goal_xy[:, 0] < center)
        target = torch.where((other_room & far)[:, None], door.expand_as(goal_xy), goal_xy)
        return torch.clamp(_unit(target - agent_xy) + noise, -1.0, 1.0)


@dataclass(frozen=True)
class UniformRandom(_Policy):
    """Actions uniform in [-1, 1)^2, independent of state (the public replication's policy)."""

    name = "random"

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform draws in [-1, 1), float32 (n, 2) on the CPU."""
        return torch.rand(n, 2, generator=generator) * 2.0 - 1.0

    def __call__(self, agent_xy: torch.Tensor, goal_xy: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise.to(torch.float32)


POLICIES = {"expert": NoisyExpert, "random": UniformRandom}


def make_policy(name: str, layout: TwoRoomLayout = DEFAULT_LAYOUT) -> NoisyExpert | UniformRandom:
    """The policy called ``name`` ("expert" or "random") for ``layout``."""
    if name == "expert":
        return NoisyExpert(layout=layout)
    if name == "random":
        return UniformRandom()
    raise ValueError(f"unknown policy {name!r}; expected one of {sorted(POLICIES)}")
