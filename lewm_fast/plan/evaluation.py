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
then ImageNet-normalised and resized to the model's image size with
:func:`lewm_fast.data.normalize_frames`. Every env is planned at every replanning step,
frozen ones included: the batch shape stays fixed (one captured CUDA graph) and each
episode's candidates come from a fixed slice of the plan's random stream, so an episode's
outcome does not depend on the others. The loop stops early once every episode has
succeeded.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__, _checks
from .._io import write_json_atomic
from ..data.dataset import TwoRoomDataset
from ..data.windows import action_stats as _dataset_action_stats
from ..data.windows import as_dataset, normalize_frames
from ..envs.two_room import DEFAULT_LAYOUT, TwoRoomLayout, distance, layout_image, render
from ..envs.two_room import step as env_step
from ..reference.jepa import action_width_of, device_of
from .solver import CEMSolver

__all__ = ["evaluate", "eligible_start_rows", "select_start_rows", "blocks_to_actions"]

_COLUMNS = ("episode_idx", "step_idx", "proprio", "action", "ep_len")

# The planner arguments of evaluate; a caller who passes a ready solver must leave them alone.
_PLANNER_DEFAULTS = {
    "num_samples": 300,
    "n_steps": 30,
    "topk": 30,
    "var_scale": 1.0,
    "planner_seed": None,
    "autocast": None,
    "cuda_graph": None,
    "max_batch": "auto",
}


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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TwoRoomDataset | str | os.PathLike,
    *,
    episodes: int = 50,
    goal_offset: int = 25,
    budget: int = 50,
    seed: int = 42,
    horizon: int = 5,
    receding_horizon: int = 5,
    action_block: int = 5,
    warm_start: bool = True,
    num_samples: int = 300,
    n_steps: int = 30,
    topk: int = 30,
    var_scale: float = 1.0,
    planner_seed: int | None = None,
    action_stats=None,
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    cuda_graph: bool | None = None,
    max_batch: int | str | None = "auto",
    solver=None,
    warmup: bool = True,
    progress: bool = True,
    out: str | os.PathLike | None = None,
) -> dict:
    """Run the published Two-Room MPC evaluation (see the module docstring) for all episodes at once.

    Args:
        model: a LeWM world model in eval mode (``lewm_fast.JEPA``, the reference JEPA, or
            a published/loaded checkpoint); any model with ``get_cost`` works through it.
        dataset: a :class:`~lewm_fast.data.TwoRoomDataset` or its folder; start and goal
            states come from its ``proprio`` column, the environment layout from its meta.
        episodes: B, the number of evaluation episodes (planned together).
        goal_offset: env steps from a start row to its goal row.
        budget: env steps per episode.
        seed: numpy ``default_rng`` seed of the start-row draw (and of the planner, unless
            ``planner_seed`` is given).
        horizon, receding_horizon: model actions per plan and executed per plan.
        action_block: raw env actions per model action (frameskip); the model's action
            width must be ``action_block`` x the dataset's action dimension.
        warm_start: with ``receding_horizon < horizon``, start the next plan's mean from
            the unexecuted blocks (as published).
        num_samples, n_steps, topk, var_scale: CEM settings (published: 300, 30, 30, 1.0).
        planner_seed: seed of the :class:`CEMSolver` (plan k draws from
            ``plan_seed(planner_seed, k)``); default ``seed``.
        action_stats: (mean, std) of the raw actions, (A,) each; default: the dataset's,
            computed as :class:`~lewm_fast.data.TrainingWindows` does.
        device: where the environments and the planner run (default: the model's device).
        autocast, cuda_graph, max_batch: passed to :class:`CEMSolver` (bf16 autocast; graph
            capture, default on for CUDA; the most candidate rows per predictor rollout,
            default "auto": chunks only where the device's free memory is short).
        solver: plan with this object instead of a new :class:`CEMSolver`: anything with
            ``solve(info_dict, init_action=None) -> {"actions": (B, horizon, A)}`` (a
            ``CEMSolver`` built on ``model``, or an adapter around the reference planner).
            The CEM settings above must then be left at their defaults.
        warmup: for a :class:`CEMSolver`, run one untimed plan first (graph capture,
            lazy initialisation) so plan latencies are steady-state; results do not change.
        progress: show a progress bar over env steps.
        out: also write the result as JSON to this path (atomically).

    Returns a JSON-serialisable dict: ``success_rate`` (fraction), ``successes``,
    ``episodes``, ``final_distance_mean`` (px), ``steps_to_success_mean``; ``per_episode``
    lists (``row``, ``episode_idx``, ``start_step``, ``start_xy``, ``goal_xy``,
    ``final_xy``, ``success``, ``steps_to_success`` (None if never), ``final_distance``);
    ``plans`` (planner calls), ``env_steps``, ``plan_latency_ms`` (``median``, ``p90``,
    ``mean``, ``median_per_env``, ``per_plan``: each call timed with a device sync before
    and after), ``plan_seeds``, ``elapsed_s``, ``warmup_s``, ``protocol``, ``planner``,
    ``action_stats``, ``dataset``, ``model``, ``device`` and ``versions``.
    """
    start_time = time.perf_counter()
    if getattr(model, "training", False):
        raise ValueError(
            "evaluate needs the model in eval mode (call model.eval()): dropout off, BatchNorm running stats"
        )
    episodes = _checks.integer(episodes, "episodes", 1, numpy=True)
    goal_offset = _checks.integer(goal_offset, "goal_offset", 1, numpy=True)
    budget = _checks.integer(budget, "budget", 1, numpy=True)
    seed = _checks.integer(seed, "seed", 0, numpy=True)
    horizon = _checks.integer(horizon, "horizon", 1, numpy=True)
    receding_horizon = _checks.integer(receding_horizon, "receding_horizon", 1, numpy=True)
    action_block = _checks.integer(action_block, "action_block", 1, numpy=True)
    if receding_horizon > horizon:
        raise ValueError(f"receding_horizon ({receding_horizon}) must not exceed horizon ({horizon})")
    if planner_seed is not None:
        planner_seed = _checks.integer(planner_seed, "planner_seed", 0, numpy=True)
    given = {
        "num_samples": num_samples,
        "n_steps": n_steps,
        "topk": topk,
        "var_scale": var_scale,
        "planner_seed": planner_seed,
        "autocast": autocast,
        "cuda_graph": cuda_graph,
        "max_batch": max_batch,
    }
    if solver is not None:
        changed = sorted(k for k, v in given.items() if v != _PLANNER_DEFAULTS[k])
        if changed:
            raise ValueError(f"with solver given, set {changed} on the solver, not on evaluate")

    if isinstance(dataset, (str, os.PathLike)):
        dataset = as_dataset(dataset)  # any other object is read through its columns
    cols = _columns(dataset)
    layout = getattr(dataset, "layout", DEFAULT_LAYOUT)
    eligible = eligible_start_rows(dataset, goal_offset)
    rows = _draw(eligible, episodes, goal_offset, seed)
    dims = cols["action"].shape[1]
    width = action_block * dims
    model_width = action_width_of(model)
    if model_width is not None and model_width != width:
        raise ValueError(
            f"the model's action width is {model_width}, but action_block ({action_block}) x the dataset's "
            f"action dimension ({dims}) is {width}"
        )
    mean, std, stats_source = _action_stats(action_stats, cols["action"])

    device = (device_of(model) or torch.device("cpu")) if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if solver is None:
        solver = CEMSolver(
            model,
            action_dim=width,
            horizon=horizon,
            num_samples=num_samples,
            n_steps=n_steps,
            topk=topk,
            var_scale=var_scale,
            seed=seed if planner_seed is None else planner_seed,
            device=device,
            autocast=autocast,
            cuda_graph=cuda_graph,
            max_batch=max_batch,
        )
    elif isinstance(solver, CEMSolver):
        if solver.model is not model:
            raise ValueError("the solver plans with a different model than the one given to evaluate")
        if solver.device != device:
            raise ValueError(f"the solver plans on {solver.device}, evaluate runs on {device}")
        if solver.horizon != horizon or solver.action_dim != width:
            raise ValueError(
                f"the solver plans horizon {solver.horizon} x width {solver.action_dim}, evaluate needs "
                f"horizon {horizon} x width {width}"
            )
    elif not callable(getattr(solver, "solve", None)):
        raise ValueError(f"solver must have solve(info_dict, init_action=None), got {type(solver).__name__}")

    image_size = _image_size(model, layout)
    background = layout_image(layout, device)

    def frames(xy: torch.Tensor) -> torch.Tensor:  # (B, 2) -> (B, 1, 3, S, S), normalised
        return normalize_frames(render(xy, layout, background=background, check=False), image_size)[:, None]

    proprio = cols["proprio"]
    start_xy = torch.from_numpy(np.array(proprio[rows], dtype=np.float32)).to(device)
    goal_xy = torch.from_numpy(np.array(proprio[rows + goal_offset], dtype=np.float32)).to(device)
    goal_frames = frames(goal_xy)
    xy = start_xy.clone()
    done = torch.zeros(episodes, dtype=torch.bool, device=device)
    steps_to = torch.full((episodes,), -1, dtype=torch.int64, device=device)

    warmup_s = 0.0
    if warmup and isinstance(solver, CEMSolver):
        t0 = time.perf_counter()
        # An explicit seed: the solver's own plan sequence (and so the results) is untouched.
        solver.solve({"pixels": frames(xy), "goal": goal_frames}, seed=0)
        _sync(device)
        warmup_s = time.perf_counter() - t0

    latencies: list[float] = []
    plan_seeds: list[int] = []
    init = None
    t = 0
    bar = tqdm(total=budget, unit="step", desc="evaluate", disable=not progress)
    try:
        while t < budget and not (latencies and bool(done.all())):
            info = {"pixels": frames(xy), "goal": goal_frames}
            _sync(device)
            t0 = time.perf_counter()
            plan = solver.solve(info, init_action=init)
            _sync(device)
            latencies.append((time.perf_counter() - t0) * 1e3)
            if isinstance(plan, dict) and plan.get("seed") is not None:
                plan_seeds.append(int(plan["seed"]))
            actions = _plan_actions(plan, episodes, horizon, width)
            init = actions[:, receding_horizon:] if warm_start and receding_horizon < horizon else None
            raw = blocks_to_actions(actions[:, :receding_horizon], mean, std).to(device)
            for k in range(min(raw.shape[1], budget - t)):
                moved = env_step(xy, raw[:, k], layout, check=False)
                xy = torch.where(done[:, None], xy, moved)  # a finished episode stays frozen
                t += 1
                hit = (distance(xy, goal_xy) < layout.success_distance) & ~done
                steps_to = steps_to.masked_fill(hit, t)
                done = done | hit
                bar.update(1)
            bar.set_postfix(success=f"{int(done.sum())}/{episodes}")
    finally:
        bar.close()
    _sync(device)
    elapsed = time.perf_counter() - start_time

    success = done.cpu().numpy()
    steps = steps_to.cpu().numpy()
    final = distance(xy, goal_xy).cpu().numpy().astype(np.float64)
    ordered = sorted(latencies)
    median = statistics.median(ordered)

    result = {
        "success_rate": float(success.mean()),
        "successes": int(success.sum()),
        "episodes": episodes,
        "final_distance_mean": float(final.mean()),
        "steps_to_success_mean": float(steps[success].mean()) if success.any() else None,
        "per_episode": {
            "row": rows.tolist(),
            "episode_idx": cols["episode_idx"][rows].astype(np.int64).tolist(),
            "start_step": cols["step_idx"][rows].astype(np.int64).tolist(),
            "start_xy": start_xy.cpu().double().tolist(),
            "goal_xy": goal_xy.cpu().double().tolist(),
            "final_xy": xy.cpu().double().tolist(),
            "success": success.tolist(),
            "steps_to_success": [int(s) if s >= 0 else None for s in steps],
            "final_distance": final.tolist(),
        },
        "plans": len(latencies),
        "env_steps": t,
        "plan_latency_ms": {
            "median": median,
            "p90": float(np.percentile(ordered, 90)),
            "mean": statistics.fmean(ordered),
            "median_per_env": median / episodes,
            "per_plan": latencies,
        },
        "plan_seeds": plan_seeds,
        "elapsed_s": elapsed,
        "warmup_s": warmup_s,
        "protocol": {
            "episodes": episodes,
            "goal_offset": goal_offset,
            "budget": budget,
            "seed": seed,
            "horizon": horizon,
            "receding_horizon": receding_horizon,
            "action_block": action_block,
            "warm_start": bool(warm_start and receding_horizon < horizon),
            "success_distance": float(layout.success_distance),
        },
        "planner": _planner_record(solver),
        "action_stats": {
            "mean": mean.double().tolist(),
            "std": std.double().tolist(),
            "source": stats_source,
        },
        "dataset": {
            "path": str(dataset.path) if getattr(dataset, "path", None) is not None else None,
            "rows": int(proprio.shape[0]),
            "episodes": int(cols["ep_len"].shape[0]),
            "eligible_rows": int(len(eligible)),
        },
        "model": {
            "type": type(model).__name__,
            "image_size": image_size,
            "action_width": width,
            "parameters": (
                sum(p.numel() for p in model.parameters()) if isinstance(model, nn.Module) else None
            ),
        },
        "device": str(device),
        "versions": {"lewm_fast": __version__, "torch": torch.__version__},
    }
    if out is not None:
        write_json_atomic(out, result)
    return result
