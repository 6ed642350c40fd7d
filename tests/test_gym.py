"""The gymnasium wrapper: registration, reset(seed, options), step, render, time limit."""

import numpy as np
import pytest
import torch

from lewm_fast.envs import TwoRoom, render

gym = pytest.importorskip("gymnasium")


def test_make_reset_step_render():
    env = gym.make("lewm_fast.envs.gym:lewm_fast/TwoRoom-v1")
    obs, info = env.reset(seed=21)
    batched = TwoRoom(1)
    state = batched.reset(seed=21)
    assert obs["proprio"].tolist() == state["proprio"][0].tolist()
    assert obs["goal"].tolist() == state["goal"][0].tolist()
    assert env.observation_space.contains(obs) and set(info) == {"distance", "success"}
    frame = env.render()
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame, render(torch.from_numpy(obs["proprio"])[None])[0].numpy())
    action = np.array([0.4, -0.7], dtype=np.float32)
    obs2, reward, terminated, truncated, info = env.step(action)
    batched.step(torch.from_numpy(action)[None])
    assert obs2["proprio"].tolist() == batched.agent_xy[0].tolist()
    assert reward == 0.0 and not terminated and not truncated
    obs3, _ = env.reset()  # next episode of the same seed: a new start
    assert obs3["proprio"].tolist() != obs["proprio"].tolist()
    assert env.reset(seed=21)[0]["proprio"].tolist() == obs["proprio"].tolist()


def test_options_success_and_time_limit():
    env = gym.make("lewm_fast.envs.gym:lewm_fast/TwoRoom-v1")
    obs, info = env.reset(options={"agent_xy": [50.0, 50.0], "goal_xy": [70.0, 50.0]})
    assert obs["proprio"].tolist() == [50.0, 50.0] and info["distance"] == 20.0
    _, reward, terminated, truncated, info = env.step(np.array([1.0, 0.0], dtype=np.float32))
    assert terminated and reward == 1.0 and info["success"] and info["distance"] == 15.0
    env.reset(options={"state": [30.0, 30.0], "goal_state": [200.0, 200.0]})
    steps = 0
    truncated = False
    while not truncated:
        _, _, terminated, truncated, _ = env.step(np.zeros(2, dtype=np.float32))
        steps += 1
        assert not terminated
    assert steps == 100
    with pytest.raises(ValueError, match="both agent_xy and goal_xy"):
        env.reset(options={"agent_xy": [50.0, 50.0]})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"door": 3})


def test_env_checker_passes():
    from gymnasium.utils.env_checker import check_env

    check_env(gym.make("lewm_fast.envs.gym:lewm_fast/TwoRoom-v1").unwrapped, skip_render_check=False)
