"""The published Two-Room evaluation: MPC with the CEM planner from dataset start/goal pairs (spec section 6).

``evaluate(model.eval(), dataset)`` runs every episode at once: one planner call plans all
B = ``episodes`` environments, and the environments step together on the device.

Protocol (the published ``eval.py`` with ``swm.World.evaluate_from_dataset``):

1. Start rows. A row is eligible when its episode continues ``goal_offset`` steps past it,
   ``step_idx <= ep_len - goal_offset - 1``. With ``rng = numpy.random.default_rng(seed)``
   the published script draws ``rng.choice(len(eligible) - 1, size=episodes,
   replace=False)`` and sorts the chosen rows; this is kept as written (so the last
   eligible row is never chosen) to give the same episodes on the same dataset.
2. Episode i starts with the agent at ``proprio[row_i]``; its goal is the state
   ``goal_offset`` rows (env steps) later in the same episode, ``proprio[row_i +
   goal_offset]``. The goal frame is that state rendered.
3. MPC for ``budget`` env steps. A plan is ``horizon`` model actions of ``action_block``
   z-scored raw actions each (10 numbers = 5 x (dx, dy)); the first ``receding_horizon``
   blocks are executed, block by block and raw action by raw action, each de-normalised as
   ``raw = z * std + mean`` per raw dimension (the env clips to [-1, 1]); then the planner
   replans from the current frame. With ``receding_horizon < horizon`` and ``warm_start``
   the unexecuted blocks seed the next plan's mean; with ``receding_horizon == horizon``
   (the published setting: 2 plans of 25 steps in a 50-step budget) there is no warm start.
4. Success: distance to the goal below the layout's ``success_distance`` (16 px) after
   any env step (the start state itself is not checked, as published). A successful
   episode is frozen from that step on (its agent no longer moves), so its final distance
   is the distance at success.

Frames are rendered on the device from positions (a frame is a pure function of state),
then ImageNet-normalised and resized to the model's image size
(:class:`lewm_fast.data.ModelFrames`). Each episode's candidates come from a fixed slice
of the plan's random stream, so an episode's outcome does not depend on the others. A
captured CUDA graph plans every env at every replanning step, frozen ones included (the
batch shape stays fixed); an eager :class:`CEMSolver` scores only the episodes still
running (``solve(..., active=)``), which plans them exactly as the full batch would and
makes later plans cheaper. The loop stops early once every episode has succeeded.

Repeats (``seeds`` = N > 1, lewm_fast's): steps 3-4 run N times with planner seeds
``solver_seed + k``, k = 0..N-1, on the same start rows (also redrawn with ``seed + k``
under ``vary_start_seed``, which departs from the protocol). The first run is the headline
result; ``seed_runs`` holds every run's success with its 95% Wilson interval, the mean,
spread and a pooled interval.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__, _checks
from .._io import write_json_atomic, write_npz_atomic
from ..data.dataset import TwoRoomDataset
from ..data.windows import ModelFrames, as_dataset
from ..data.windows import action_stats as _dataset_action_stats
from ..envs.two_room import DEFAULT_LAYOUT, TwoRoomLayout, distance
from ..envs.two_room import step as env_step
from ..reference.jepa import action_width_of, device_of
from ..stats import spread, success_text, wilson_interval
from .config import PlanConfig
from .solver import CEMSolver, plan_seed

__all__ = [
    "evaluate",
    "seed_runs_text",
    "eligible_start_rows",
    "select_start_rows",
    "blocks_to_actions",
    "read_episodes",
    "EPISODES_FORMAT",
]

_COLUMNS = ("episode_idx", "step_idx", "proprio", "action", "ep_len")

# ----------------------------------------------------------------------- dataset side


def _columns(dataset) -> dict[str, np.ndarray]:
    """The columns the protocol reads, as numpy arrays; ValueError naming a missing one."""
    columns = {}
    for name in _COLUMNS:
        value = getattr(dataset, name, None)
        if value is None:
            raise ValueError(
                f"the dataset has no {name!r} column; evaluation needs {list(_COLUMNS)} "
                "(a lewm_fast.data.TwoRoomDataset)"
            )
        columns[name] = np.asarray(value)
    rows = columns["proprio"].shape[0]
    if columns["proprio"].ndim != 2 or columns["action"].ndim != 2 or columns["action"].shape[0] != rows:
        raise ValueError(
            f"dataset columns 'proprio' and 'action' must be (rows, dims) with equal rows, got "
            f"{columns['proprio'].shape} and {columns['action'].shape}"
        )
    if columns["episode_idx"].shape != (rows,) or columns["step_idx"].shape != (rows,):
        raise ValueError(f"dataset columns 'episode_idx' and 'step_idx' must have shape ({rows},)")
    return columns


def eligible_start_rows(dataset, goal_offset: int = 25) -> np.ndarray:
    """Rows (int64, ascending) whose episode continues ``goal_offset`` steps past them.

    A row is eligible when ``step_idx <= ep_len[episode_idx] - goal_offset - 1``; its goal
    row is ``row + goal_offset`` (rows are grouped by episode in step order).
    """
    goal_offset = _checks.integer(goal_offset, "goal_offset", 1, numpy=True)
    cols = _columns(dataset)
    ep_len = cols["ep_len"][cols["episode_idx"]]
    rows = np.flatnonzero(cols["step_idx"] <= ep_len - goal_offset - 1).astype(np.int64)
    goal = rows + goal_offset
    if rows.size and (
        goal[-1] >= cols["proprio"].shape[0]
        or not np.array_equal(cols["episode_idx"][goal], cols["episode_idx"][rows])
        or not np.array_equal(cols["step_idx"][goal], cols["step_idx"][rows] + goal_offset)
    ):
        raise ValueError("dataset rows must be grouped by episode in step order (row + k = step + k)")
    return rows


def select_start_rows(dataset, episodes: int = 50, goal_offset: int = 25, seed: int = 42) -> np.ndarray:
    """The published choice of evaluation start rows: (episodes,) int64, ascending.

    ``eligible = eligible_start_rows(dataset, goal_offset)``; ``rng =
    numpy.random.default_rng(seed)``; ``sort(eligible[rng.choice(len(eligible) - 1,
    size=episodes, replace=False)])``. The ``- 1`` is the published script's: its last
    eligible row is never drawn.
    """
    return _draw(eligible_start_rows(dataset, goal_offset), episodes, goal_offset, seed)


def _draw(eligible: np.ndarray, episodes: int, goal_offset: int, seed: int) -> np.ndarray:
    episodes = _checks.integer(episodes, "episodes", 1, numpy=True)
    seed = _checks.integer(seed, "seed", 0, numpy=True)
    if len(eligible) - 1 < episodes:
        raise ValueError(
            f"too few eligible start rows for {episodes} episodes: {len(eligible)} rows leave "
            f"{goal_offset} steps to the goal, and the published draw picks among the first "
            f"{max(len(eligible) - 1, 0)} of them"
        )
    picked = np.random.default_rng(seed).choice(len(eligible) - 1, size=episodes, replace=False)
    return np.sort(eligible[picked])


# ----------------------------------------------------------------------- action side


def blocks_to_actions(blocks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Model actions (B, R, k * A) -> raw env actions (B, R * k, A), de-normalised.

    Block r holds k raw actions concatenated, (a_0, ..., a_{k-1}), each z-scored per raw
    dimension; raw action r * k + j is ``blocks[:, r, j*A:(j+1)*A] * std + mean`` (float32).
    mean and std are (A,).
    """
    if not torch.is_tensor(blocks) or blocks.dim() != 3:
        raise ValueError(f"blocks must be a (B, R, k * A) tensor, got {getattr(blocks, 'shape', blocks)!r}")
    dims = mean.shape[0]
    if mean.shape != (dims,) or std.shape != (dims,) or blocks.shape[2] % dims:
        raise ValueError(
            f"blocks (B, R, k * A) {tuple(blocks.shape)} need mean and std of shape (A,) with A dividing "
            f"k * A, got {tuple(mean.shape)} and {tuple(std.shape)}"
        )
    b, r, width = blocks.shape
    raw = blocks.float().reshape(b, r * (width // dims), dims)
    return raw * std.to(raw.device, torch.float32) + mean.to(raw.device, torch.float32)


def _action_stats(given, action: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, str]:
    dims = action.shape[1]
    if given is None:
        mean, std = _dataset_action_stats(np.array(action))  # exactly TrainingWindows' statistics
        return torch.from_numpy(mean), torch.from_numpy(std), "dataset"
    try:
        mean, std = given
        mean = torch.as_tensor(np.asarray(mean, dtype=np.float32))
        std = torch.as_tensor(np.asarray(std, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"action_stats must be a pair (mean, std) of ({dims},) arrays: {exc}") from None
    if mean.shape != (dims,) or std.shape != (dims,):
        raise ValueError(
            f"action_stats (mean, std) must each have shape ({dims},), one per raw action dimension, "
            f"got {tuple(mean.shape)} and {tuple(std.shape)}"
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError(
            f"action_stats must be finite with std > 0, got mean {mean.tolist()}, std {std.tolist()}"
        )
    return mean, std, "given"


# ----------------------------------------------------------------------- model side


def _image_size(model, layout: TwoRoomLayout) -> int:
    size = getattr(getattr(getattr(model, "encoder", None), "config", None), "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) if isinstance(size, (int, np.integer)) else layout.size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _planner_record(solver) -> dict:
    record = {"type": type(solver).__name__}
    names = (
        "num_samples",
        "n_steps",
        "topk",
        "var_scale",
        "seed",
        "history_size",
        "cuda_graph",
        "fast",
        "max_batch",
    )
    for name in names:
        if hasattr(solver, name):
            record[name] = getattr(solver, name)
    if hasattr(solver, "autocast"):
        record["autocast"] = None if solver.autocast is None else str(solver.autocast).replace("torch.", "")
    return record


def _plan_costs(out, envs: int) -> torch.Tensor | None:
    """The plan's elite costs (B,) as float32 on the CPU, or None when the solver gives none."""
    costs = out.get("costs") if isinstance(out, dict) else None
    if not torch.is_tensor(costs) or costs.numel() != envs:
        return None
    return costs.detach().float().cpu().reshape(envs)


def _plan_actions(out, envs: int, horizon: int, width: int) -> torch.Tensor:
    actions = out.get("actions") if isinstance(out, dict) else None
    if not torch.is_tensor(actions) or tuple(actions.shape) != (envs, horizon, width):
        got = tuple(actions.shape) if torch.is_tensor(actions) else type(out).__name__
        raise ValueError(
            f"the solver must return {{'actions': (B, horizon, A)}} = ({envs}, {horizon}, {width}), got {got}"
        )
    actions = actions.detach().float().cpu()
    if not torch.isfinite(actions).all():
        raise RuntimeError("the planner returned non-finite actions; check the model weights and inputs")
    return actions


# ----------------------------------------------------------------------- the protocol


@dataclass
class _Episodes:
    """The drawn episodes: dataset columns, start rows, layout and action width."""

    dataset: Any
    cols: dict[str, np.ndarray]
    layout: TwoRoomLayout
    eligible: np.ndarray
    rows: np.ndarray
    width: int


@dataclass
class _Scene:
    """The episodes on the device: start and goal positions (B, 2), the goal frames, and
    ``frames(xy)``, positions (B, 2) -> normalised model frames (B, 1, 3, S, S)."""

    frames: Callable[[torch.Tensor], torch.Tensor]
    image_size: int
    start_xy: torch.Tensor
    goal_xy: torch.Tensor
    goal_frames: torch.Tensor


def _scene(drawn: _Episodes, config: PlanConfig, model, device: torch.device) -> _Scene:
    image_size = _image_size(model, drawn.layout)
    model_frames = ModelFrames(drawn.layout, image_size, device)

    def frames(xy: torch.Tensor) -> torch.Tensor:
        return model_frames(xy)[:, None]

    proprio = drawn.cols["proprio"]
    start_xy = torch.from_numpy(np.array(proprio[drawn.rows], dtype=np.float32)).to(device)
    goal_xy = torch.from_numpy(np.array(proprio[drawn.rows + config.goal_offset], dtype=np.float32)).to(
        device
    )
    return _Scene(frames, image_size, start_xy, goal_xy, frames(goal_xy))


@dataclass
class _Trace:
    """What the MPC loop leaves: final positions, success, latencies and plan seeds; the
    positions after every env step (``path``, (B, 2) each, the start first) and the first
    plan's raw actions (B, horizon * k, A) with its elite costs (B,) when the solver gives them."""

    xy: torch.Tensor
    done: torch.Tensor
    steps_to: torch.Tensor
    # plan i of this run is seeded plan_seed(planner_seed, i) (a CEMSolver evaluate built);
    # None: a given solver, planning with its own seed sequence
    planner_seed: int | None = None
    env_steps: int = 0
    latencies: list[float] = field(default_factory=list)
    plan_seeds: list[int] = field(default_factory=list)
    planned: list[int] = field(default_factory=list)  # episodes still running at each plan
    path: list[torch.Tensor] = field(default_factory=list)
    first_plan: torch.Tensor | None = None
    first_cost: torch.Tensor | None = None


def _plan_config(model, config: PlanConfig | None, settings: dict, solver) -> PlanConfig:
    """The settings of this evaluation, checked (and the model in eval mode)."""
    if getattr(model, "training", False):
        raise ValueError(
            "evaluate needs the model in eval mode (call model.eval()): dropout off, BatchNorm running stats"
        )
    if config is not None and not isinstance(config, PlanConfig):
        raise ValueError(f"config must be a lewm_fast.plan.PlanConfig, got {type(config).__name__}")
    if solver is not None:  # checked first: the solver's settings are the solver's business
        default = PlanConfig()
        given = {k: v for k, v in settings.items() if k == "autocast" or k in PlanConfig.SOLVER_FIELDS}
        changed = sorted(k for k, v in given.items() if k != "horizon" and v != getattr(default, k, None))
        changed += config.solver_settings_changed() if config is not None else []
        if changed:
            raise ValueError(f"with solver given, set {sorted(set(changed))} on the solver, not on evaluate")
    config = (config or PlanConfig()).replace(**settings)
    if solver is not None and config.seeds > 1:
        raise ValueError(
            f"seeds={config.seeds} repeats the evaluation with planner seeds solver_seed + k, which needs "
            "a planner evaluate builds; a given solver plans with its own seed: leave seeds at 1"
        )
    return config


def _draw_episodes(dataset, config: PlanConfig, model) -> _Episodes:
    """Step 1: the start rows of the published draw, and the model's action width checked."""
    cols = _columns(dataset)
    eligible = eligible_start_rows(dataset, config.goal_offset)
    rows = _draw(eligible, config.episodes, config.goal_offset, config.seed)
    dims = cols["action"].shape[1]
    width = config.action_block * dims
    model_width = action_width_of(model)
    if model_width is not None and model_width != width:
        raise ValueError(
            f"the model's action width is {model_width}, but action_block ({config.action_block}) x the "
            f"dataset's action dimension ({dims}) is {width}"
        )
    layout = getattr(dataset, "layout", DEFAULT_LAYOUT)
    return _Episodes(dataset, cols, layout, eligible, rows, width)


def _solver(solver, model, config: PlanConfig, device: torch.device, width: int):
    """Step 2: a new :class:`CEMSolver` from ``config``, or the given solver checked against it."""
    if solver is None:
        return CEMSolver(model, action_dim=width, config=config, device=device)
    if isinstance(solver, CEMSolver):
        if solver.model is not model:
            raise ValueError("the solver plans with a different model than the one given to evaluate")
        if solver.device != device:
            raise ValueError(f"the solver plans on {solver.device}, evaluate runs on {device}")
        if solver.horizon != config.horizon or solver.action_dim != width:
            raise ValueError(
                f"the solver plans horizon {solver.horizon} x width {solver.action_dim}, evaluate needs "
                f"horizon {config.horizon} x width {width}"
            )
    elif not callable(getattr(solver, "solve", None)):
        raise ValueError(f"solver must have solve(info_dict, init_action=None), got {type(solver).__name__}")
    return solver


def _timed_solve(solver, info: dict, init, device: torch.device, trace: _Trace):
    kwargs = {}
    if trace.planner_seed is not None:
        kwargs["seed"] = plan_seed(trace.planner_seed, len(trace.latencies))
    if isinstance(solver, CEMSolver):  # finished episodes need no plan (their actions are unused)
        kwargs["active"] = ~trace.done
    _sync(device)
    t0 = time.perf_counter()
    plan = solver.solve(info, init_action=init, **kwargs)
    _sync(device)
    trace.latencies.append((time.perf_counter() - t0) * 1e3)
    trace.planned.append(int((~trace.done).sum()))
    if isinstance(plan, dict) and plan.get("seed") is not None:
        trace.plan_seeds.append(int(plan["seed"]))
    return plan


def _mpc(
    solver, scene: _Scene, drawn: _Episodes, config: PlanConfig, stats, progress, planner_seed: int | None
) -> _Trace:
    """Step 3: plan, execute ``receding_horizon`` blocks raw action by raw action, replan;
    until the budget is spent or every episode has succeeded (a finished one stays frozen).
    ``progress``: the progress bar's label, or False for none."""
    xy, layout, (mean, std, _) = scene.start_xy, drawn.layout, stats
    device, episodes = xy.device, xy.shape[0]
    trace = _Trace(
        planner_seed=planner_seed,
        xy=xy.clone(),
        done=torch.zeros(episodes, dtype=torch.bool, device=device),
        steps_to=torch.full((episodes,), -1, dtype=torch.int64, device=device),
        path=[xy.clone()],
    )
    init, receding, budget = None, config.executed_per_plan, config.budget
    bar = tqdm(total=budget, unit="step", desc=progress or "evaluate", disable=not progress)
    try:
        while trace.env_steps < budget and not (trace.latencies and bool(trace.done.all())):
            info = {"pixels": scene.frames(trace.xy), "goal": scene.goal_frames}
            plan = _timed_solve(solver, info, init, device, trace)
            actions = _plan_actions(plan, episodes, config.horizon, drawn.width)
            if trace.first_plan is None:
                trace.first_plan = blocks_to_actions(actions, mean, std)
                trace.first_cost = _plan_costs(plan, episodes)
            init = actions[:, receding:] if config.warm_starts else None
            raw = blocks_to_actions(actions[:, :receding], mean, std).to(device)
            for k in range(min(raw.shape[1], budget - trace.env_steps)):
                moved = env_step(trace.xy, raw[:, k], layout, check=False)
                trace.xy = torch.where(trace.done[:, None], trace.xy, moved)
                trace.env_steps += 1
                hit = (distance(trace.xy, scene.goal_xy) < layout.success_distance) & ~trace.done
                trace.steps_to = trace.steps_to.masked_fill(hit, trace.env_steps)
                trace.done = trace.done | hit
                trace.path.append(trace.xy)
                bar.update(1)
            bar.set_postfix(success=f"{int(trace.done.sum())}/{episodes}")
    finally:
        bar.close()
    _sync(device)
    return trace


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TwoRoomDataset | str | os.PathLike,
    config: PlanConfig | None = None,
    *,
    solver=None,
    action_stats=None,
    device: torch.device | str | None = None,
    warmup: bool = True,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    episodes_out: str | os.PathLike | None = None,
    **settings,
) -> dict:
    """Run the published Two-Room MPC evaluation (see the module docstring) for all episodes at once,
    ``config.seeds`` times.

    Args:
        model: a LeWM world model in eval mode (``lewm_fast.JEPA``, the reference JEPA, or
            a published/loaded checkpoint); any model with ``get_cost`` works through it.
        dataset: a :class:`~lewm_fast.data.TwoRoomDataset` or its folder; start and goal
            states come from its ``proprio`` column, the environment layout from its meta.
        config: the protocol and planner settings (default: ``PlanConfig()``, the published ones).
            ``seeds`` = N > 1 runs the episodes N times, run k with planner seed
            ``solver_seed + k``; ``vary_start_seed`` also redraws run k's start rows with
            ``seed + k`` (not the published protocol).
        solver: plan with this object instead of a new :class:`CEMSolver`: anything with
            ``solve(info_dict, init_action=None) -> {"actions": (B, horizon, A)}`` (a
            ``CEMSolver`` built on ``model``, or an adapter around the reference planner).
            The solver settings of ``config`` must then be left at their defaults, and
            ``seeds`` at 1 (the solver plans with its own seed sequence).
        action_stats: (mean, std) of the raw actions, (A,) each; default: the dataset's,
            computed as :class:`~lewm_fast.data.TrainingWindows` does.
        device: where the environments and the planner run (default: the model's device).
        warmup: for a :class:`CEMSolver` on a CUDA device, one untimed plan first (graph
            capture, cuBLAS and Triton set-up). Skipped on other devices: there is nothing to
            capture there, and it would cost as much as a timed plan.
        progress: show a progress bar over env steps.
        out: also write the result as JSON here (atomically; non-finite numbers as null).
        episodes_out: also write every episode's path as ``.npz`` here (atomically): the
            positions after every env step and the first plan (see :func:`read_episodes`);
            with ``seeds`` > 1, those of the first run (the headline).
        **settings: :class:`PlanConfig` fields overriding ``config`` (``episodes=20``,
            ``num_samples=64``, ``autocast=torch.bfloat16``, ...).

    Returns a JSON-serialisable dict of the first run (the headline): ``success_rate``
    (fraction), ``successes``, ``episodes``, ``success_interval`` ([lo, hi], fractions: the
    95% Wilson score interval of successes / episodes, :func:`lewm_fast.stats.wilson_interval`),
    ``final_distance_mean`` (px), ``steps_to_success_mean``; ``per_episode``
    lists (``row``, ``episode_idx``, ``start_step``, ``start_xy``, ``goal_xy``,
    ``final_xy``, ``success``, ``steps_to_success`` (None if never), ``final_distance``);
    ``plans`` (planner calls), ``env_steps``, ``plan_latency_ms`` (``median``, ``p90``,
    ``mean``, ``median_per_env`` over the plans of all episodes; ``per_plan``: each call
    timed with a device sync before and after; ``per_plan_episodes``: the episodes still
    running at each call, the only ones a :class:`CEMSolver` plans eagerly),
    ``plan_seeds``, ``elapsed_s``, ``warmup_s``, ``protocol`` (the settings as run: its
    ``warm_start`` says whether plans were warm-started, False when every planned action is
    executed, as published), ``planner``, ``action_stats``, ``dataset``, ``model``, ``device``
    and ``versions``; with ``episodes_out``, ``episodes_file`` (its path as given).

    Raises ValueError for a model in training mode, a bad setting or dataset, or a solver
    that does not fit; RuntimeError when the planner returns non-finite actions.

    Repeats: ``elapsed_s`` is the whole call (every run and the warm-up), and
    ``seed_runs`` holds ``seeds`` (N), ``vary_start_seed``, ``runs`` (one per run, the
    first being the headline: ``planner_seed``, ``seed`` (of its start rows),
    ``successes``, ``episodes``, ``success_rate``, ``success_interval``,
    ``final_distance_mean``, ``plan_seeds``, ``elapsed_s`` (that run), ``row`` and
    ``success`` per episode), ``success_rate_mean``, ``success_rate_std`` (sample standard
    deviation over the runs, None for one), ``success_rate_min``, ``success_rate_max``
    (fractions) and ``pooled`` (``successes``, ``episodes``, ``success_rate`` and the
    Wilson ``success_interval`` of all runs' episodes together). With the start rows fixed,
    the runs share their episodes, so the pooled interval measures the planner's
    randomness on those episodes; it is narrower than one over fresh start rows would be.
    A solver given with ``seeds`` > 1 raises ValueError.
    """
    start_time = time.perf_counter()
    config = _plan_config(model, config, settings, solver)
    if isinstance(dataset, (str, os.PathLike)):
        dataset = as_dataset(dataset)  # any other object is read through its columns
    drawn = _draw_episodes(dataset, config, model)
    stats = _action_stats(action_stats, drawn.cols["action"])
    device = _checks.with_index(device if device is not None else device_of(model) or "cpu")
    owned = solver is None  # a solver evaluate builds plans each run from that run's seed
    solver = _solver(solver, model, config, device, drawn.width)
    scene = _scene(drawn, config, model, device)
    warmup_s = _warm_up(solver, scene.frames(scene.start_xy), scene.goal_frames, device) if warmup else 0.0
    results = []
    for k, run in enumerate(_repeats(config)):
        run_start = time.perf_counter()
        if run.seed != config.seed:  # vary_start_seed: this run's own start rows
            drawn = _draw_episodes(dataset, run, model)
            scene = _scene(drawn, run, model, device)
        label = progress and ("evaluate" if config.seeds == 1 else f"evaluate {k + 1}/{config.seeds}")
        trace = _mpc(solver, scene, drawn, run, stats, label, run.solver_seed if owned else None)
        timing = {"elapsed_s": time.perf_counter() - run_start, "warmup_s": 0.0 if k else warmup_s}
        results.append(_result(model, drawn, scene, run, solver, stats, trace, timing))
        if k == 0 and episodes_out is not None:  # the headline run's episodes
            paths = _episode_arrays(drawn, scene, run, trace)
    result = results[0]
    result["seed_runs"] = _seed_runs(config, results)  # first: it keeps each run's own elapsed_s
    result["elapsed_s"] = time.perf_counter() - start_time
    if episodes_out is not None:
        write_npz_atomic(episodes_out, paths)
        result["episodes_file"] = str(episodes_out)
    if out is not None:
        write_json_atomic(out, result)
    return result


def _repeats(config: PlanConfig) -> list[PlanConfig]:
    """The settings of each of the ``seeds`` runs: ``config`` first, then run k with planner
    seed ``solver_seed + k`` (and start-row seed ``seed + k`` under ``vary_start_seed``)."""
    step = 1 if config.vary_start_seed else 0
    return [config] + [
        config.replace(planner_seed=config.solver_seed + k, seed=config.seed + step * k)
        for k in range(1, config.seeds)
    ]


# the numbers of each run that ``seed_runs["runs"]`` keeps
_RUN_KEYS = (
    "successes",
    "episodes",
    "success_rate",
    "success_interval",
    "final_distance_mean",
    "plan_seeds",
    "elapsed_s",
)


def _seed_runs(config: PlanConfig, results: list[dict]) -> dict:
    """The ``seed_runs`` entry of :func:`evaluate`'s result from the result of every run."""
    runs = [
        {
            "planner_seed": r["planner"].get("seed"),
            "seed": r["protocol"]["seed"],
            **{key: r[key] for key in _RUN_KEYS},
            "row": r["per_episode"]["row"],
            "success": r["per_episode"]["success"],
        }
        for r in results
    ]
    successes, episodes = sum(r["successes"] for r in runs), sum(r["episodes"] for r in runs)
    rates = spread([r["success_rate"] for r in runs])
    return {
        "seeds": config.seeds,
        "vary_start_seed": config.vary_start_seed,
        "runs": runs,
        **{f"success_rate_{name}": value for name, value in rates.items()},
        "pooled": {
            "successes": successes,
            "episodes": episodes,
            "success_rate": successes / episodes,
            "success_interval": list(wilson_interval(successes, episodes)),
        },
    }


def seed_runs_text(seed_runs: dict) -> str:
    """One line on the runs of an evaluation, from its result's ``seed_runs``; e.g.

    ``over 3 planner seeds 42, 43, 44 (start rows of seed 42): 80.0%, 76.0%, 84.0%; mean
    80.0%, std 4.0 points, min 76.0%, max 84.0%; pooled 80.0% (120/150, 95% CI [72.9%, 85.6%])``

    Under ``vary_start_seed`` it names the start-row seeds and says they depart from the
    published protocol. The CLI and the run report print it when there is more than one run.
    """
    runs, std, pooled = seed_runs["runs"], seed_runs["success_rate_std"], seed_runs["pooled"]
    planner = ", ".join(str(r["planner_seed"]) for r in runs)
    if seed_runs["vary_start_seed"]:
        rows = f"start-row seeds {', '.join(str(r['seed']) for r in runs)}, not the published protocol"
    else:
        rows = f"start rows of seed {runs[0]['seed']}"
    rates = ", ".join(f"{100 * r['success_rate']:.1f}%" for r in runs)
    spread_text = (
        f"mean {100 * seed_runs['success_rate_mean']:.1f}%, "
        f"std {'-' if std is None else f'{100 * std:.1f}'} points, "
        f"min {100 * seed_runs['success_rate_min']:.1f}%, max {100 * seed_runs['success_rate_max']:.1f}%"
    )
    pooled_text = success_text(pooled["successes"], pooled["episodes"])
    return f"over {len(runs)} planner seeds {planner} ({rows}): {rates}; {spread_text}; pooled {pooled_text}"


def _warm_up(solver, pixels: torch.Tensor, goal: torch.Tensor, device: torch.device) -> float:
    """One untimed plan of a :class:`CEMSolver` on CUDA (graph capture, lazy set-up); its seconds."""
    if not isinstance(solver, CEMSolver) or device.type != "cuda":
        return 0.0
    t0 = time.perf_counter()
    # An explicit seed: the solver's own plan sequence (and so the results) is untouched.
    solver.solve({"pixels": pixels, "goal": goal}, seed=0)
    _sync(device)
    return time.perf_counter() - t0


def _latency(latencies: list[float], planned: list[int], episodes: int) -> dict:
    """Latency summary over the plans of every episode (the first plan always is one); a
    later plan of a CEMSolver scores only the episodes still running, so it is cheaper."""
    ordered = sorted(t for t, n in zip(latencies, planned) if n == episodes) or sorted(latencies)
    median = statistics.median(ordered)
    return {
        "median": median,
        "p90": float(np.percentile(ordered, 90)),
        "mean": statistics.fmean(ordered),
        "median_per_env": median / episodes,
        "per_plan": latencies,
        "per_plan_episodes": planned,
    }


def _per_episode(drawn: _Episodes, scene: _Scene, trace: _Trace, success, steps, final) -> dict:
    cols, rows = drawn.cols, drawn.rows
    return {
        "row": rows.tolist(),
        "episode_idx": cols["episode_idx"][rows].astype(np.int64).tolist(),
        "start_step": cols["step_idx"][rows].astype(np.int64).tolist(),
        "start_xy": scene.start_xy.cpu().double().tolist(),
        "goal_xy": scene.goal_xy.cpu().double().tolist(),
        "final_xy": trace.xy.cpu().double().tolist(),
        "success": success.tolist(),
        "steps_to_success": [int(s) if s >= 0 else None for s in steps],
        "final_distance": final.tolist(),
    }


def _result(model, drawn: _Episodes, scene: _Scene, config: PlanConfig, solver, stats, trace: _Trace, timing):
    """Step 4: the JSON-serialisable result of one run of :func:`evaluate`."""
    success = trace.done.cpu().numpy()
    steps = trace.steps_to.cpu().numpy()
    final = distance(trace.xy, scene.goal_xy).cpu().numpy().astype(np.float64)
    cols, (mean, std, stats_source) = drawn.cols, stats
    planner = _planner_record(solver)
    if trace.planner_seed is not None:
        planner["seed"] = trace.planner_seed
    return {
        "success_rate": float(success.mean()),
        "successes": int(success.sum()),
        "episodes": config.episodes,
        "success_interval": list(wilson_interval(int(success.sum()), config.episodes)),
        "final_distance_mean": float(final.mean()),
        "steps_to_success_mean": float(steps[success].mean()) if success.any() else None,
        "per_episode": _per_episode(drawn, scene, trace, success, steps, final),
        "plans": len(trace.latencies),
        "env_steps": trace.env_steps,
        "plan_latency_ms": _latency(trace.latencies, trace.planned, config.episodes),
        "plan_seeds": trace.plan_seeds,
        **timing,
        "protocol": {
            "episodes": config.episodes,
            "goal_offset": config.goal_offset,
            "budget": config.budget,
            "seed": config.seed,
            "horizon": config.horizon,
            "receding_horizon": config.executed_per_plan,
            "action_block": config.action_block,
            "warm_start": config.warm_starts,
            "success_distance": float(drawn.layout.success_distance),
        },
        "planner": planner,
        "action_stats": {
            "mean": mean.double().tolist(),
            "std": std.double().tolist(),
            "source": stats_source,
        },
        "dataset": {
            "path": str(drawn.dataset.path) if getattr(drawn.dataset, "path", None) is not None else None,
            "rows": int(cols["proprio"].shape[0]),
            "episodes": int(cols["ep_len"].shape[0]),
            "eligible_rows": int(len(drawn.eligible)),
        },
        "model": {
            "type": type(model).__name__,
            "image_size": scene.image_size,
            "action_width": drawn.width,
            "parameters": (
                sum(p.numel() for p in model.parameters()) if isinstance(model, nn.Module) else None
            ),
        },
        "device": str(trace.xy.device),
        "versions": {"lewm_fast": __version__, "torch": torch.__version__},
    }


# ----------------------------------------------------------------------- episode paths

EPISODES_FORMAT = "lewm_fast/eval-episodes"
_EPISODES_VERSION = 1


def _episode_arrays(drawn: _Episodes, scene: _Scene, config: PlanConfig, trace: _Trace) -> dict:
    """The arrays of ``episodes.npz`` (see :func:`read_episodes`), on the CPU."""
    start, plan_actions = scene.start_xy.cpu(), trace.first_plan.cpu()  # budget >= 1: a plan ran
    plan_xy = [start]
    for k in range(plan_actions.shape[1]):  # a copy of the env, never frozen at the goal
        plan_xy.append(env_step(plan_xy[-1], plan_actions[:, k], drawn.layout, check=False))
    cost = trace.first_cost if trace.first_cost is not None else torch.full((config.episodes,), np.nan)
    return {
        "format": np.array(EPISODES_FORMAT),
        "version": np.array(_EPISODES_VERSION),
        "layout": np.array(json.dumps(drawn.layout.to_dict())),
        "row": drawn.rows.astype(np.int64),
        "episode_idx": drawn.cols["episode_idx"][drawn.rows].astype(np.int64),
        "start_xy": start.numpy().astype(np.float32),
        "goal_xy": scene.goal_xy.cpu().numpy().astype(np.float32),
        "xy": torch.stack(trace.path, dim=1).cpu().numpy().astype(np.float32),
        "success": trace.done.cpu().numpy(),
        "steps_to_success": trace.steps_to.cpu().numpy().astype(np.int64),
        "plan_actions": plan_actions.numpy().astype(np.float32),
        "plan_xy": torch.stack(plan_xy, dim=1).numpy().astype(np.float32),
        "plan_cost": cost.numpy().astype(np.float32),
        "steps_per_plan": np.array(config.executed_per_plan * config.action_block),
        "budget": np.array(config.budget),
    }


def read_episodes(path: str | os.PathLike) -> dict[str, Any]:
    """Read the ``episodes.npz`` that ``evaluate(..., episodes_out=path)`` wrote.

    Returns {name: value} for B episodes and T env steps run (T <= budget; fewer when
    every episode succeeded early), in the order of the result's ``per_episode`` lists:

    - ``xy`` (B, T + 1, 2) float32: the agent's (x, y) px at the start and after every env
      step; a successful episode stays frozen where it succeeded.
    - ``start_xy``, ``goal_xy`` (B, 2) float32; ``success`` (B,) bool;
      ``steps_to_success`` (B,) int64, -1 where never; ``row``, ``episode_idx`` (B,) int64.
    - ``plan_actions`` (B, horizon * k, 2) float32: the first plan's actions, de-normalised
      (before the env's clip to [-1, 1]); ``plan_xy`` (B, horizon * k + 1, 2): the positions
      they reach when a copy of the env steps through all of them from the start, never
      frozen at the goal. This is what the plan does in the true env, not the model's
      prediction (LeWM plans in embedding space and has no decoder). When every planned
      block is executed (the published setting) the executed path follows it until success.
    - ``plan_cost`` (B,) float32: the first plan's mean elite cost in embedding space (NaN
      when the solver reports none).
    - ``layout``: the :class:`TwoRoomLayout`; ``steps_per_plan`` (env steps executed between
      plans) and ``budget``: ints; ``format``, ``version``.

    Frames are not stored: a frame is a pure function of the position (spec section 4), so
    ``render(xy[b], layout)`` gives them back. ValueError for a file of another format or one
    cut short; FileNotFoundError for a missing one.
    """
    with open(path, "rb") as f:
        try:
            data = np.load(f, allow_pickle=False)
            arrays = {name: data[name] for name in data.files}
        except (ValueError, EOFError, AttributeError, zipfile.BadZipFile) as exc:  # not an .npz
            raise ValueError(f"{path} is not an evaluation episodes file: {exc}") from None
    if str(arrays.get("format", "")) != EPISODES_FORMAT:
        raise ValueError(f"{path} is not an evaluation episodes file ({EPISODES_FORMAT!r})")
    if int(arrays["version"]) > _EPISODES_VERSION:
        raise ValueError(
            f"{path}: episodes file version {int(arrays['version'])} is newer than this lewm_fast "
            f"reads ({_EPISODES_VERSION})"
        )
    out: dict[str, Any] = dict(arrays)
    out["format"] = str(arrays["format"])
    out["layout"] = TwoRoomLayout.from_dict(json.loads(str(arrays["layout"])))
    for name in ("version", "steps_per_plan", "budget"):
        out[name] = int(arrays[name])
    return out
