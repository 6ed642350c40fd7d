"""The published Two-Room evaluation protocol: row selection, MPC, success, results, CLI."""

import json
import statistics

import numpy as np
import pytest
import torch
from helpers import model_pair, small_config

import lewm_fast
from lewm_fast import cli, stats
from lewm_fast.data import TwoRoomDataset, action_stats, generate_dataset
from lewm_fast.data.dataset import DatasetWriter
from lewm_fast.envs import DEFAULT_LAYOUT, TwoRoomLayout, distance
from lewm_fast.envs import step as env_step
from lewm_fast.pipeline import EvalConfig
from lewm_fast.plan import (
    CEMSolver,
    PlanConfig,
    blocks_to_actions,
    evaluate,
    plan_seed,
    read_episodes,
    select_start_rows,
)

SMALL_PLAN = {"num_samples": 16, "n_steps": 2, "topk": 4}
TIMING_KEYS = ("elapsed_s", "warmup_s", "plan_latency_ms")


@pytest.fixture(scope="module")
def model():
    public, _ = model_pair(small_config(), seed=1)
    return public.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("eval") / "ds", episodes=24, seed=0, progress=False)


def _line_dataset(path, episodes=4, length=60):
    """Episode e: the agent walks straight down column x = 40 + 10 e, y = 30 + 2 i at step i."""
    rows = episodes * length
    step = np.tile(np.arange(length), episodes)
    proprio = np.stack([np.repeat(40.0 + 10 * np.arange(episodes), length), 30.0 + 2 * step], axis=1)
    action = np.stack([np.where(step % 2, 0.1, -0.1), np.where(step % 2, 0.5, 0.3)], axis=1)
    action[step == length - 1] = np.nan
    columns = {
        "episode_idx": np.repeat(np.arange(episodes), length).astype(np.int32),
        "step_idx": step.astype(np.int32),
        "proprio": proprio.astype(np.float32),
        "action": action.astype(np.float32),
        "ep_len": np.full(episodes, length, np.int64),
        "ep_offset": np.arange(episodes, dtype=np.int64) * length,
    }
    assert columns["proprio"].shape == (rows, 2)
    with DatasetWriter(path) as writer:
        writer.commit(columns, DEFAULT_LAYOUT, {"test": "line"})
    return TwoRoomDataset.open(path)


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    return _line_dataset(tmp_path_factory.mktemp("eval") / "line")


class Scripted:
    """A solver that returns ``plan(call, envs)`` (B, 5, 10) and records what it was given."""

    def __init__(self, plan):
        self.plan = plan
        self.calls = []

    def solve(self, info_dict, init_action=None):
        self.calls.append({"info": info_dict, "init": init_action})
        envs = info_dict["pixels"].shape[0]
        return {"actions": self.plan(len(self.calls) - 1, envs)}


def _drop_timing(result):
    """``result`` without its wall-clock numbers (those of the whole call and of each run)."""
    for key in TIMING_KEYS:
        result.pop(key)
    for run in result["seed_runs"]["runs"]:
        run.pop("elapsed_s")
    return result


def _z(raw, mean, std):
    """The z-scored block (10,) whose 5 raw actions are all ``raw`` (2,)."""
    z = (torch.tensor(raw, dtype=torch.float32) - mean) / std
    return z.repeat(5)


# ------------------------------------------------------------------ row selection


def test_row_selection_is_the_published_draw(data, model):
    """Independent transcription: eligible rows leave 25 steps in their episode; default_rng(42)
    draws without replacement among all but the last of them (as the published script does)."""
    eligible = [
        int(data.ep_offset[e]) + s
        for e in range(data.num_episodes)
        for s in range(int(data.ep_len[e]))
        if s + 25 <= int(data.ep_len[e]) - 1
    ]
    picked = np.random.default_rng(42).choice(len(eligible) - 1, size=6, replace=False)
    want = sorted(eligible[i] for i in picked)
    assert select_start_rows(data, 6, 25, 42).tolist() == want
    assert select_start_rows(data, 6, 25, 7).tolist() != want

    result = evaluate(model, data, episodes=6, budget=1, progress=False, **SMALL_PLAN)
    episode = result["per_episode"]
    assert episode["row"] == want
    assert episode["episode_idx"] == [int(data.episode_idx[r]) for r in want]
    assert episode["start_step"] == [int(data.step_idx[r]) for r in want]
    assert episode["start_xy"] == data.proprio[want].astype(np.float64).tolist()
    assert episode["goal_xy"] == data.proprio[np.array(want) + 25].astype(np.float64).tolist()
    assert result["dataset"]["eligible_rows"] == len(eligible)


# ------------------------------------------------------------------ actions


def test_blocks_to_actions_by_hand():
    blocks = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]])  # (B=1, R=2, k=2 x A=2)
    mean, std = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 3.0])
    want = torch.tensor([[[2.5, 5.0], [6.5, 11.0], [10.5, 17.0], [14.5, 23.0]]])
    assert torch.equal(blocks_to_actions(blocks, mean, std), want)
    with pytest.raises(ValueError, match="mean and std"):
        blocks_to_actions(torch.zeros(1, 2, 5), mean, std)


def test_executed_actions_are_the_denormalised_blocks(line, model):
    """10 env steps of a scripted plan land where the hand-de-normalised raw actions take the agent."""
    mean, std = torch.tensor([0.1, -0.2]), torch.tensor([0.05, 0.08])
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3, 5, 10, generator=gen)
    solver = Scripted(lambda call, envs: z)
    result = evaluate(
        model, line, episodes=3, budget=10, seed=5, action_stats=(mean, std), solver=solver, progress=False
    )
    assert result["plans"] == 1 and result["env_steps"] == 10
    assert not any(result["per_episode"]["success"])
    for b in range(3):
        xy = np.array(result["per_episode"]["start_xy"][b], dtype=np.float32)
        for step in range(10):
            block, j = divmod(step, 5)  # raw action j of model action ``block``
            a = z[b, block, 2 * j : 2 * j + 2].numpy() * std.numpy() + mean.numpy()
            xy = xy + np.clip(a, -1, 1) * np.float32(5)  # far from walls and borders
        np.testing.assert_allclose(result["per_episode"]["final_xy"][b], xy, rtol=0, atol=1e-4)
    assert result["action_stats"]["source"] == "given"


def test_default_action_stats_are_the_training_windows_stats(line, model):
    solver = Scripted(lambda call, envs: torch.zeros(envs, 5, 10))
    result = evaluate(model, line, episodes=2, budget=1, solver=solver, progress=False)
    mean, std = action_stats(np.array(line.action))
    assert result["action_stats"]["mean"] == mean.astype(np.float64).tolist()
    assert result["action_stats"]["std"] == std.astype(np.float64).tolist()
    # a zero plan executes the mean action: one step of 5 * mean from the start
    start = np.array(result["per_episode"]["start_xy"], dtype=np.float32)
    np.testing.assert_allclose(result["per_episode"]["final_xy"], start + 5 * mean, atol=1e-4)


# ------------------------------------------------------------------ success


def test_success_mid_plan_is_recorded_and_frozen(line, model):
    """Goals lie 50 px below the start. Even envs walk down 5 px per step: within 16 px after 7
    steps, in the middle of the first 25-step plan, and then frozen (they would walk on past
    the goal). Odd envs walk up into the border and never succeed."""
    mean, std = torch.tensor([0.1, -0.2]), torch.tensor([0.5, 2.0])
    down, up = _z([0.0, 1.0], mean, std), _z([0.0, -1.0], mean, std)

    def plan(call, envs):
        return torch.stack([down if b % 2 == 0 else up for b in range(envs)])[:, None].expand(envs, 5, 10)

    solver = Scripted(plan)
    result = evaluate(model, line, episodes=4, action_stats=(mean, std), solver=solver, progress=False)
    ep = result["per_episode"]
    assert ep["success"] == [True, False, True, False]
    assert ep["steps_to_success"] == [7, None, 7, None]
    for b in (0, 2):
        start, goal = ep["start_xy"][b], ep["goal_xy"][b]
        assert goal == [start[0], start[1] + 50.0]
        assert ep["final_xy"][b] == [start[0], start[1] + 35.0]  # frozen at step 7
        assert ep["final_distance"][b] == 15.0
    for b in (1, 3):
        assert ep["final_xy"][b] == [ep["start_xy"][b][0], 21.0]  # clamped at the border
        assert ep["final_distance"][b] == pytest.approx(ep["goal_xy"][b][1] - 21.0)
    assert result["success_rate"] == 0.5 and result["successes"] == 2
    assert result["steps_to_success_mean"] == 7.0
    assert result["plans"] == 2 and result["env_steps"] == 50


def test_all_successful_stops_replanning(line, model):
    mean, std = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    down = _z([0.0, 1.0], mean, std)
    solver = Scripted(lambda call, envs: down.view(1, 1, 10).expand(envs, 5, 10))
    result = evaluate(model, line, episodes=3, action_stats=(mean, std), solver=solver, progress=False)
    assert result["success_rate"] == 1.0
    assert result["plans"] == 1 and result["env_steps"] == 25 and len(solver.calls) == 1


def test_receding_horizon_and_warm_start(line, model):
    """receding_horizon 2 of 5: 10 env steps per plan, the 3 unexecuted blocks seed the next mean."""
    gen = torch.Generator().manual_seed(0)
    plans = [0.01 * torch.randn(2, 5, 10, generator=gen) for _ in range(5)]
    still = {"action_stats": ([0.0, 0.0], [1.0, 1.0]), "progress": False}  # tiny moves: no success
    solver = Scripted(lambda call, envs: plans[call])
    result = evaluate(model, line, episodes=2, receding_horizon=2, solver=solver, **still)
    assert result["plans"] == 5 and result["env_steps"] == 50
    assert solver.calls[0]["init"] is None
    for call in range(1, 5):
        assert torch.equal(solver.calls[call]["init"], plans[call - 1][:, 2:])
    assert result["protocol"]["warm_start"]
    cold = Scripted(lambda call, envs: plans[call])
    evaluate(model, line, episodes=2, receding_horizon=2, warm_start=False, solver=cold, **still)
    assert all(c["init"] is None for c in cold.calls)
    # a budget that is not a multiple of the executed steps: 25 + 5
    short = Scripted(lambda call, envs: plans[call])
    assert evaluate(model, line, episodes=2, budget=30, solver=short, **still)["env_steps"] == 30
    assert len(short.calls) == 2


def test_planner_sees_the_current_and_goal_frames(line, model):
    from lewm_fast.data import normalize_frames
    from lewm_fast.envs import render

    solver = Scripted(lambda call, envs: torch.zeros(envs, 5, 10))  # the mean action, 0.5 px down
    slow = ([0.0, 0.1], [1.0, 1.0])
    result = evaluate(model, line, episodes=2, budget=30, action_stats=slow, solver=solver, progress=False)
    assert result["plans"] == 2
    size = model.encoder.config.image_size
    ep = result["per_episode"]
    goal = normalize_frames(render(torch.tensor(ep["goal_xy"], dtype=torch.float32)), size)
    start = normalize_frames(render(torch.tensor(ep["start_xy"], dtype=torch.float32)), size)
    first = solver.calls[0]["info"]
    assert first["pixels"].shape == (2, 1, 3, size, size)
    # rendered straight to model frames (ModelFrames): equal up to float32 rounding of the resize
    torch.testing.assert_close(first["goal"][:, 0], goal, rtol=0, atol=1e-5)
    torch.testing.assert_close(first["pixels"][:, 0], start, rtol=0, atol=1e-5)
    assert torch.equal(solver.calls[1]["info"]["goal"], first["goal"])
    assert (solver.calls[1]["info"]["pixels"][:, 0] - start).abs().max() > 0.1


# ------------------------------------------------------------------ recorded episode paths


def test_recorded_paths_are_the_env_positions(line, model, tmp_path):
    """episodes.npz holds the start and the position after every env step, as an independent
    replay of the executed (de-normalised) plans through the env gives them, and the first
    plan stepped through a copy of the env."""
    mean, std = torch.tensor([0.1, 0.3]), torch.tensor([0.9, 0.7])
    gen = torch.Generator().manual_seed(11)
    plans = [torch.randn(3, 5, 10, generator=gen) for _ in range(2)]
    solver = Scripted(lambda call, envs: plans[call])
    path = tmp_path / "episodes.npz"
    result = evaluate(
        model, line, episodes=3, action_stats=(mean, std), solver=solver, progress=False, episodes_out=path
    )
    ep = read_episodes(path)
    assert result["episodes_file"] == str(path) and result["env_steps"] == 50 and result["plans"] == 2
    assert ep["xy"].shape == (3, 51, 2) and ep["xy"].dtype == np.float32
    assert ep["plan_xy"].shape == (3, 26, 2) and ep["plan_actions"].shape == (3, 25, 2)

    start = torch.tensor(result["per_episode"]["start_xy"], dtype=torch.float32)
    goal = torch.tensor(result["per_episode"]["goal_xy"], dtype=torch.float32)
    xy, done, want = start.clone(), torch.zeros(3, dtype=torch.bool), [start.clone()]
    for plan in plans:
        for k in range(25):
            moved = env_step(xy, blocks_to_actions(plan, mean, std)[:, k])
            xy = torch.where(done[:, None], xy, moved)
            done |= distance(xy, goal) < 16.0
            want.append(xy.clone())
    np.testing.assert_array_equal(ep["xy"], torch.stack(want, dim=1).numpy())
    np.testing.assert_array_equal(ep["xy"][:, -1], np.array(result["per_episode"]["final_xy"], np.float32))
    np.testing.assert_array_equal(ep["plan_actions"], blocks_to_actions(plans[0], mean, std).numpy())
    plan_xy = [start]
    for k in range(25):
        plan_xy.append(env_step(plan_xy[-1], blocks_to_actions(plans[0], mean, std)[:, k]))
    np.testing.assert_array_equal(ep["plan_xy"], torch.stack(plan_xy, dim=1).numpy())
    np.testing.assert_array_equal(ep["start_xy"], start.numpy())
    np.testing.assert_array_equal(ep["goal_xy"], goal.numpy())
    assert ep["success"].tolist() == result["per_episode"]["success"]
    assert ep["row"].tolist() == result["per_episode"]["row"]
    assert ep["episode_idx"].tolist() == result["per_episode"]["episode_idx"]
    assert np.isnan(ep["plan_cost"]).all()  # the scripted solver reports no costs
    assert ep["layout"] == DEFAULT_LAYOUT and ep["steps_per_plan"] == 25 and ep["budget"] == 50
    assert sorted(q.name for q in tmp_path.iterdir()) == ["episodes.npz"]  # no temporaries left


def test_recorded_paths_freeze_at_success_and_the_plan_does_not(line, model, tmp_path):
    """Even envs reach the goal (50 px below) after 7 steps of 5 px and stay there; the first
    plan, stepped through a copy of the env, walks on past the goal."""
    mean, std = torch.tensor([0.1, -0.2]), torch.tensor([0.5, 2.0])
    down, up = _z([0.0, 1.0], mean, std), _z([0.0, -1.0], mean, std)

    def plan(call, envs):
        return torch.stack([down if b % 2 == 0 else up for b in range(envs)])[:, None].expand(envs, 5, 10)

    path = tmp_path / "ep.npz"
    result = evaluate(
        model,
        line,
        episodes=4,
        action_stats=(mean, std),
        solver=Scripted(plan),
        progress=False,
        episodes_out=path,
    )
    ep = read_episodes(path)
    assert ep["steps_to_success"].tolist() == [7, -1, 7, -1]
    for b in (0, 2):
        start = ep["start_xy"][b]
        for t in range(8):
            np.testing.assert_array_equal(ep["xy"][b, t], start + [0.0, 5.0 * t])
        assert (ep["xy"][b, 7:] == ep["xy"][b, 7]).all()  # frozen from success on
        np.testing.assert_array_equal(ep["plan_xy"][b, 10], np.minimum(start + [0.0, 50.0], 203.0))
    for b in (1, 3):
        np.testing.assert_array_equal(ep["plan_xy"][b], ep["xy"][b, :26])
        assert ep["xy"][b, -1, 1] == 21.0
    assert result["per_episode"]["success"] == [True, False, True, False]


def test_recorded_paths_of_a_cem_evaluation(data, model, tmp_path):
    """With every planned block executed, the executed path is the first plan's path until
    success; the JSON names the episodes file; other files are refused."""
    out, path = tmp_path / "eval.json", tmp_path / "episodes.npz"
    result = evaluate(model, data, episodes=6, progress=False, out=out, episodes_out=path, **SMALL_PLAN)
    ep = read_episodes(path)
    steps = result["env_steps"]
    assert ep["xy"].shape == (6, steps + 1, 2) and ep["plan_xy"].shape == (6, 26, 2)
    np.testing.assert_array_equal(ep["xy"][:, -1], np.array(result["per_episode"]["final_xy"], np.float32))
    for b in range(6):
        until = min(25, steps) if ep["steps_to_success"][b] < 0 else min(25, int(ep["steps_to_success"][b]))
        np.testing.assert_array_equal(ep["xy"][b, : until + 1], ep["plan_xy"][b, : until + 1])
    assert np.isfinite(ep["plan_cost"]).all() and (ep["plan_cost"] >= 0).all()
    assert json.loads(out.read_text())["episodes_file"] == str(path)
    np.savez(tmp_path / "other.npz", xy=np.zeros(3))
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:300])
    for name in ("other.npz", "array.npy", "cut.npz"):
        with pytest.raises(ValueError, match="not an evaluation episodes file"):
            read_episodes(tmp_path / name)
    assert "episodes_file" not in evaluate(model, data, episodes=2, budget=1, progress=False, **SMALL_PLAN)


def test_recorded_paths_of_repeats_are_the_headline_runs(data, model, tmp_path):
    """With seeds=2 the episodes file holds the first run, the one the headline numbers are of;
    with varied start rows too, its start rows are the published draw's."""
    kwargs = {"episodes": 4, "progress": False, **SMALL_PLAN}
    single = evaluate(model, data, episodes_out=tmp_path / "one.npz", **kwargs)
    twice = evaluate(model, data, seeds=2, vary_start_seed=True, episodes_out=tmp_path / "two.npz", **kwargs)
    one, two = read_episodes(tmp_path / "one.npz"), read_episodes(tmp_path / "two.npz")
    assert two["row"].tolist() == single["per_episode"]["row"] == twice["per_episode"]["row"]
    np.testing.assert_array_equal(one["xy"], two["xy"])
    np.testing.assert_array_equal(one["plan_xy"], two["plan_xy"])
    assert twice["seed_runs"]["runs"][1]["row"] != twice["per_episode"]["row"]


def test_recorded_layout_is_the_datasets(tmp_path, model):
    layout = TwoRoomLayout(door_center=150)
    data = generate_dataset(tmp_path / "ds", episodes=8, seed=1, layout=layout, progress=False)
    evaluate(model, data, episodes=2, budget=1, progress=False, episodes_out=tmp_path / "e.npz", **SMALL_PLAN)
    assert read_episodes(tmp_path / "e.npz")["layout"] == layout


# ------------------------------------------------------------------ end to end


def test_protocol_end_to_end_with_a_random_model(data, model, tmp_path):
    out = tmp_path / "results" / "eval.json"
    result = evaluate(model, data, episodes=8, progress=True, out=out, **SMALL_PLAN)
    ep = result["per_episode"]
    assert result["episodes"] == 8 and len(ep["row"]) == 8
    assert result["success_rate"] == pytest.approx(np.mean(ep["success"]))
    assert result["successes"] == sum(ep["success"])
    assert result["success_interval"] == list(stats.wilson_interval(result["successes"], 8))
    runs = result["seed_runs"]
    assert runs["seeds"] == 1 and len(runs["runs"]) == 1 and runs["success_rate_std"] is None
    assert runs["pooled"] == {
        "successes": result["successes"],
        "episodes": 8,
        "success_rate": result["success_rate"],
        "success_interval": result["success_interval"],
    }
    assert result["final_distance_mean"] == pytest.approx(np.mean(ep["final_distance"]))
    final = np.hypot(*(np.array(ep["final_xy"]) - np.array(ep["goal_xy"])).T)
    np.testing.assert_allclose(ep["final_distance"], final, rtol=1e-5)
    for ok, steps, dist in zip(ep["success"], ep["steps_to_success"], ep["final_distance"]):
        assert ok == (steps is not None) and (dist < 16.0) == ok
        assert steps is None or 1 <= steps <= 50
    assert result["env_steps"] == 50 or all(ep["success"])
    assert result["plans"] == len(result["plan_seeds"]) == len(result["plan_latency_ms"]["per_plan"])
    assert result["plan_seeds"] == [plan_seed(42, k) for k in range(result["plans"])]
    latency = result["plan_latency_ms"]
    assert 0 < latency["median"] <= latency["p90"] <= max(latency["per_plan"])
    assert result["planner"]["type"] == "CEMSolver" and result["planner"]["fast"]
    assert result["planner"]["num_samples"] == 16 and result["planner"]["seed"] == 42
    assert result["protocol"] == {
        "episodes": 8,
        "goal_offset": 25,
        "budget": 50,
        "seed": 42,
        "horizon": 5,
        "receding_horizon": 5,
        "action_block": 5,
        "warm_start": False,
        "success_distance": 16.0,
    }
    assert result["model"]["image_size"] == 56 and result["model"]["action_width"] == 10
    # the JSON file holds exactly the result, strict JSON, written atomically
    text = out.read_text()
    assert json.loads(text) == json.loads(json.dumps(result, allow_nan=False))
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]
    keys = ("success_rate", "success_interval", "final_distance_mean", "per_episode", "plan_latency_ms")
    for key in (*keys, "plan_seeds", "seed_runs"):
        assert key in json.loads(text)


def test_same_seed_same_result(data, model):
    kwargs = {"episodes": 5, "progress": False, **SMALL_PLAN}
    a, b = evaluate(model, data, **kwargs), evaluate(model, data, **kwargs)
    # the same settings as one PlanConfig (and as the pipeline's eval section) plan the same
    config = PlanConfig(episodes=5, **SMALL_PLAN)
    d = evaluate(model, data, config, progress=False)
    e = evaluate(model, data, EvalConfig(**SMALL_PLAN, during_training=3), episodes=5, progress=False)
    for result in (a, b, d, e):
        _drop_timing(result)
    assert a == b == d == e
    c = evaluate(model, data, planner_seed=7, **kwargs)
    assert c["per_episode"]["row"] == a["per_episode"]["row"]
    assert c["per_episode"]["final_xy"] != a["per_episode"]["final_xy"]
    assert c["plan_seeds"] == [plan_seed(7, 0), plan_seed(7, 1)][: c["plans"]]


def test_no_warm_up_plan_off_cuda(data, model):
    """On the CPU the warm-up plan is skipped (nothing to capture; it costs a whole plan):
    the solver is called once per timed plan."""
    solver = CEMSolver(model, action_dim=10, seed=3, **SMALL_PLAN)
    calls = []
    solve = solver.solve
    solver.solve = lambda *args, **kwargs: calls.append(kwargs.get("seed")) or solve(*args, **kwargs)
    result = evaluate(model, data, episodes=4, solver=solver, warmup=True, progress=False)
    assert len(calls) == result["plans"] == len(result["plan_latency_ms"]["per_plan"])
    assert result["warmup_s"] == 0.0


def test_a_given_solver_and_the_reference_model(data, model):
    """A ready CEMSolver is used as given; the reference JEPA plans through the same protocol."""
    solver = CEMSolver(model, action_dim=10, seed=3, **SMALL_PLAN)
    result = evaluate(model, data, episodes=4, solver=solver, progress=False)
    assert result["planner"]["seed"] == 3 and result["plan_seeds"][0] == plan_seed(3, 0)
    reference = small_config().build(reference=True)
    reference.load_state_dict(model.state_dict())
    ref = evaluate(reference.eval(), data, episodes=4, progress=False, **SMALL_PLAN)
    assert ref["model"]["type"] == "JEPA" and ref["plans"] >= 1


def test_seeds_repeat_with_the_next_planner_seeds_on_the_published_rows(data, model):
    """seeds=3: runs with planner seeds 42, 43, 44 on the start rows of default_rng(42); the first
    is the headline, unchanged, and each run plans as a single evaluation with its seed would."""
    kwargs = {"episodes": 5, "progress": False, **SMALL_PLAN}
    result = evaluate(model, data, seeds=3, **kwargs)
    alone = [evaluate(model, data, planner_seed=42 + k, **kwargs) for k in range(3)]
    runs = result["seed_runs"]["runs"]
    assert sum(r["elapsed_s"] for r in runs) < result["elapsed_s"]  # each run's time; the call's
    assert [r["planner_seed"] for r in runs] == [42, 43, 44] and [r["seed"] for r in runs] == [42] * 3
    want_rows = select_start_rows(data, 5, 25, 42).tolist()
    assert all(r["row"] == want_rows for r in runs) and result["per_episode"]["row"] == want_rows
    for run, single in zip(runs, alone):
        assert run["plan_seeds"] == [plan_seed(run["planner_seed"], i) for i in range(len(run["plan_seeds"]))]
        assert run["plan_seeds"] == single["plan_seeds"]
        for key in ("successes", "success_rate", "success_interval", "final_distance_mean"):
            assert run[key] == single[key], key
        assert run["success"] == single["per_episode"]["success"]
        assert run["success_interval"] == list(stats.wilson_interval(run["successes"], 5))
    assert len({r["final_distance_mean"] for r in runs}) == 3  # three planner seeds, three outcomes
    # the headline is the first run: the single evaluation with the published seeds
    headline = {k: v for k, v in _drop_timing(result).items() if k != "seed_runs"}
    assert headline == {k: v for k, v in _drop_timing(alone[0]).items() if k != "seed_runs"}
    rates = [r["success_rate"] for r in runs]
    summary = result["seed_runs"]
    assert summary["seeds"] == 3 and not summary["vary_start_seed"]
    assert summary["success_rate_mean"] == pytest.approx(statistics.fmean(rates))
    assert summary["success_rate_std"] == pytest.approx(statistics.stdev(rates))
    assert (summary["success_rate_min"], summary["success_rate_max"]) == (min(rates), max(rates))
    pooled = sum(r["successes"] for r in runs)
    assert summary["pooled"] == {
        "successes": pooled,
        "episodes": 15,
        "success_rate": pooled / 15,
        "success_interval": list(stats.wilson_interval(pooled, 15)),
    }


def test_vary_start_seed_redraws_the_start_rows(data, model):
    kwargs = {"episodes": 4, "budget": 5, "progress": False, **SMALL_PLAN}
    varied = evaluate(model, data, seeds=3, vary_start_seed=True, **kwargs)["seed_runs"]
    assert varied["vary_start_seed"]
    assert [(r["planner_seed"], r["seed"]) for r in varied["runs"]] == [(42, 42), (43, 43), (44, 44)]
    for r in varied["runs"]:
        assert r["row"] == select_start_rows(data, 4, 25, r["seed"]).tolist()
    assert varied["runs"][0]["row"] != varied["runs"][1]["row"]
    # an explicit planner seed counts up on its own; the start rows stay the draw of seed
    fixed = evaluate(model, data, seeds=2, planner_seed=7, **kwargs)["seed_runs"]["runs"]
    assert [(r["planner_seed"], r["seed"]) for r in fixed] == [(7, 42), (8, 42)]
    assert fixed[0]["row"] == fixed[1]["row"] == select_start_rows(data, 4, 25, 42).tolist()


def test_loaded_checkpoint_through_the_cli(data, model, tmp_path, capsys):
    lewm_fast.save_pretrained(model, tmp_path / "ckpt")
    loaded = lewm_fast.load_pretrained(tmp_path / "ckpt").eval()
    direct = evaluate(loaded, data, episodes=3, num_samples=8, n_steps=1, topk=2, progress=False)
    out = tmp_path / "cli.json"
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--dataset", str(data.path), "--episodes", "3"]
    args += ["--num-samples", "8", "--n-steps", "1", "--topk", "2", "--device", "cpu", "--quiet"]
    assert cli.main(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "success" in printed and "plan latency median" in printed and str(out) in printed
    saved = json.loads(out.read_text())
    assert saved["per_episode"]["final_xy"] == direct["per_episode"]["final_xy"]
    lo, hi = (100 * b for b in saved["success_interval"])
    assert f"({saved['successes']}/3, 95% CI [{lo:.1f}%, {hi:.1f}%])" in printed
    assert "over" not in printed and saved["seed_runs"]["seeds"] == 1
    repeated = tmp_path / "seeds.json"
    assert cli.main(args + ["--seeds", "2", "--vary-start-seed", "--out", str(repeated)]) == 0
    printed = capsys.readouterr().out
    runs = json.loads(repeated.read_text())["seed_runs"]
    assert runs["seeds"] == 2 and runs["vary_start_seed"]
    assert [(r["planner_seed"], r["seed"]) for r in runs["runs"]] == [(42, 42), (43, 43)]
    rows = "start-row seeds 42, 43, not the published protocol"
    assert f"success over 2 planner seeds 42, 43 ({rows}): " in printed
    pooled = runs["pooled"]
    assert f"; pooled {100 * pooled['success_rate']:.1f}% ({pooled['successes']}/6, 95% CI [" in printed
    with pytest.raises(SystemExit, match="lewm-fast eval: seeds must be an integer >= 1, got 0"):
        cli.main(args + ["--seeds", "0"])
    with pytest.raises(SystemExit, match="lewm-fast eval: .*too few eligible"):
        cli.main(args[:5] + ["--episodes", "100000", "--device", "cpu", "--quiet"])
    chunked, paths = tmp_path / "chunked.json", tmp_path / "paths.npz"
    assert cli.main(args + ["--max-batch", "5", "--out", str(chunked), "--episodes-out", str(paths)]) == 0
    assert f"wrote {paths}" in capsys.readouterr().out
    recorded = read_episodes(paths)
    assert recorded["xy"].shape == (3, json.loads(chunked.read_text())["env_steps"] + 1, 2)
    assert json.loads(chunked.read_text())["planner"]["max_batch"] == 5
    with pytest.raises(SystemExit):
        cli.main(args + ["--max-batch", "0"])


# ------------------------------------------------------------------ bad arguments


class _NoColumns:
    proprio = np.zeros((10, 2), np.float32)


BAD = [  # (id, evaluate keyword arguments, error match)
    ("episodes-0", {"episodes": 0}, "episodes must be an integer >= 1"),
    ("seeds-0", {"seeds": 0}, "seeds must be an integer >= 1, got 0"),
    ("vary-start-seed-text", {"vary_start_seed": "yes"}, "vary_start_seed must be true or false"),
    ("budget-0", {"budget": 0}, "budget must be"),
    ("goal-offset-0", {"goal_offset": 0}, "goal_offset must be"),
    ("seed-negative", {"seed": -1}, "seed must be"),
    ("receding-gt-horizon", {"receding_horizon": 6}, r"receding_horizon \(6\) must not exceed horizon \(5\)"),
    ("too-few-rows", {"episodes": 100_000}, "too few eligible start rows"),
    ("too-few-rows-offset", {"goal_offset": 200}, "too few eligible start rows"),
    ("action-block", {"action_block": 4}, "action width is 10"),
    ("stats-shape", {"action_stats": ([0.0], [1.0])}, r"action_stats .* shape \(2,\)"),
    ("stats-zero-std", {"action_stats": ([0.0, 0.0], [1.0, 0.0])}, "std > 0"),
    ("stats-not-a-pair", {"action_stats": 3.0}, "action_stats must be a pair"),
    ("topk", {"topk": 40, "num_samples": 16}, "topk"),
    (
        "solver-and-settings",
        {"solver": Scripted(None), "num_samples": 16},
        r"set \['num_samples'\] on the solver",
    ),
    ("solver-without-solve", {"solver": object()}, "solver must have solve"),
    ("solver-and-seeds", {"solver": Scripted(None), "seeds": 2}, "a given solver plans with its own seed"),
    ("solver-bad-shape", {"solver": Scripted(lambda c, e: torch.zeros(e, 4, 10))}, "must return"),
    ("solver-nan", {"solver": Scripted(lambda c, e: torch.full((e, 5, 10), float("nan")))}, "non-finite"),
]


@pytest.mark.parametrize("kwargs,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_arguments(data, model, kwargs, match):
    error = RuntimeError if match == "non-finite" else ValueError
    with pytest.raises(error, match=match):
        evaluate(model, data, progress=False, **{"episodes": 2, **kwargs})


def test_bad_model_and_dataset(data, model):
    with pytest.raises(ValueError, match="eval mode"):
        evaluate(small_config().build(), data, episodes=2, progress=False)
    with pytest.raises(ValueError, match="no 'episode_idx' column"):
        evaluate(model, _NoColumns(), episodes=2, progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate(model, "/nonexistent/dataset", episodes=2, progress=False)
    other = CEMSolver(model, action_dim=10, horizon=4, **SMALL_PLAN)
    with pytest.raises(ValueError, match="horizon 4"):
        evaluate(model, data, episodes=2, solver=other, progress=False)
    twin, _ = model_pair(small_config(), seed=1)
    with pytest.raises(ValueError, match="different model"):
        evaluate(model, data, episodes=2, solver=CEMSolver(twin.eval(), action_dim=10), progress=False)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_evaluate_with_graph_capture_on_cuda(data):
    public, _ = model_pair(small_config(), seed=1)
    model = public.eval().cuda()
    graph = CEMSolver(model, action_dim=10, seed=42, cuda_graph=True, num_samples=64, n_steps=4, topk=8)
    result = evaluate(model, data, episodes=6, solver=graph, progress=False)
    assert graph.cuda_graph and graph._captured is not None
    assert result["device"].startswith("cuda") and result["planner"]["cuda_graph"]
    eager = evaluate(
        model, data, episodes=6, num_samples=64, n_steps=4, topk=8, cuda_graph=False, progress=False
    )
    assert eager["planner"]["cuda_graph"] is False
    assert result["per_episode"]["row"] == eager["per_episode"]["row"]
    assert result["plan_seeds"] == eager["plan_seeds"]
    np.testing.assert_allclose(result["per_episode"]["final_xy"], eager["per_episode"]["final_xy"], atol=1e-2)
    bf16 = evaluate(model, data, episodes=6, autocast=torch.bfloat16, progress=False, **SMALL_PLAN)
    assert bf16["planner"]["autocast"] == "bfloat16" and bf16["planner"]["cuda_graph"]


def test_finished_episodes_are_not_planned_and_results_are_unchanged(line, model):
    """A CEMSolver is told which episodes still run; planning only those ends every episode
    where planning all of them does, and the latency summary covers full plans only."""

    class Everything(CEMSolver):
        def solve(self, info_dict, init_action=None, *, seed=None, active=None):
            self.seen = [*getattr(self, "seen", []), None if active is None else active.clone()]
            return super().solve(info_dict, init_action, seed=seed)  # plans every env

    config = PlanConfig(episodes=6, budget=60, receding_horizon=2)
    planner = {"action_dim": 10, "num_samples": 32, "n_steps": 3, "topk": 4, "seed": 1, "horizon": 5}
    full = Everything(model, **planner)
    a = evaluate(model, line, config, solver=full, progress=False)
    b = evaluate(model, line, config, solver=CEMSolver(model, **planner), progress=False)
    assert a["plans"] == b["plans"] >= 2 and full.seen[0].all()
    assert a["per_episode"]["success"] == b["per_episode"]["success"]
    np.testing.assert_allclose(a["per_episode"]["final_xy"], b["per_episode"]["final_xy"], atol=1e-3)
    running = b["plan_latency_ms"]["per_plan_episodes"]
    assert running[0] == 6 and running == sorted(running, reverse=True)
    assert running == [int(m.sum()) for m in full.seen]
    full_plans = [t for t, n in zip(b["plan_latency_ms"]["per_plan"], running) if n == 6]
    assert b["plan_latency_ms"]["median"] == pytest.approx(np.median(full_plans))


def test_max_batch_chunks_the_rollouts_and_keeps_the_results(model, data):
    """evaluate(max_batch=...) scores candidates in chunks; the episodes end where they did."""
    whole = evaluate(model, data, episodes=4, max_batch=None, progress=False, **SMALL_PLAN)
    chunked = evaluate(model, data, episodes=4, max_batch=10, progress=False, **SMALL_PLAN)
    assert whole["planner"]["max_batch"] is None and chunked["planner"]["max_batch"] == 10
    assert chunked["per_episode"]["row"] == whole["per_episode"]["row"]
    final = chunked["per_episode"]["final_xy"], whole["per_episode"]["final_xy"]
    np.testing.assert_allclose(*final, atol=1e-3)
    with pytest.raises(ValueError, match="max_batch"):
        evaluate(model, data, episodes=2, max_batch=0, progress=False, **SMALL_PLAN)
