"""Data policies: the published noisy expert's targets and noise, uniform random, seeding."""

import pytest
import torch

from lewm_fast.envs import NoisyExpert, UniformRandom, make_policy
from lewm_fast.envs.two_room import episode_generator


def _unit(v):
    return v / v.norm(dim=1, keepdim=True)


def test_expert_without_noise_heads_for_door_then_goal():
    policy = NoisyExpert()
    agent = torch.tensor([[50.0, 150.0], [180.0, 30.0], [50.0, 150.0], [105.0, 45.0], [112.0, 200.0]])
    goal = torch.tensor([[180.0, 150.0], [30.0, 190.0], [90.0, 20.0], [190.0, 60.0], [20.0, 20.0]])
    zero = torch.zeros(5, 2)
    door = torch.tensor([112.0, 49.0])
    want = torch.stack(
        [
            _unit((door - agent[0])[None])[0],  # other room, far from the door: the door
            _unit((door - agent[1])[None])[0],
            _unit((goal[2] - agent[2])[None])[0],  # same room: the goal
            _unit((goal[3] - agent[3])[None])[0],  # other room but within 10.5 px of the door: the goal
            _unit((door - agent[4])[None])[0],  # x = 112 is the right room; goal on the left
        ]
    )
    got = policy(agent, goal, zero)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-7)
    assert torch.allclose(got.norm(dim=1), torch.ones(5))


def test_expert_noise_is_added_then_clipped():
    policy = NoisyExpert()
    agent = torch.tensor([[50.0, 150.0], [50.0, 150.0]])
    goal = torch.tensor([[60.0, 150.0], [60.0, 150.0]])  # same room, straight +x
    noise = torch.tensor([[0.3, -0.4], [5.0, -3.0]])
    assert policy(agent, goal, noise).tolist() == [[1.0, -0.4000000059604645], [1.0, -1.0]]
    gen = torch.Generator().manual_seed(0)
    draws = policy.draw(200_000, gen)
    assert draws.shape == (200_000, 2) and draws.dtype == torch.float32
    assert abs(draws.std().item() - 2.0) < 0.02 and abs(draws.mean().item()) < 0.02


def test_expert_at_the_goal_gives_pure_noise():
    policy = NoisyExpert()
    xy = torch.tensor([[60.0, 70.0]])
    noise = torch.tensor([[0.25, -0.5]])
    assert policy(xy, xy, noise).tolist() == [[0.25, -0.5]]


def test_uniform_random_range_and_seeding():
    policy = UniformRandom()
    a = policy.act(torch.zeros(50_000, 2), torch.zeros(50_000, 2), torch.Generator().manual_seed(4))
    assert a.min() >= -1 and a.max() < 1 and a.min() < -0.99 and a.max() > 0.99
    assert abs(a.mean().item()) < 0.02
    b = policy.act(torch.zeros(50_000, 2), torch.zeros(50_000, 2), torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_episode_streams_are_independent_and_reproducible():
    draws = [NoisyExpert().draw(100, episode_generator(9, e)) for e in range(3)]
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[2], NoisyExpert().draw(100, episode_generator(9, 2)))
    assert not torch.equal(draws[0], NoisyExpert().draw(100, episode_generator(10, 0)))
    with pytest.raises(ValueError, match="seed"):
        episode_generator(-1, 0)


def test_make_policy():
    assert isinstance(make_policy("expert"), NoisyExpert)
    assert isinstance(make_policy("random"), UniformRandom)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("greedy")
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        NoisyExpert().act(torch.zeros(3, 2), torch.zeros(2, 2))
