"""Batched CEM planner with a CUDA-graph-captured solve (spec section 6).

``CEMSolver(model, action_dim=10).solve(info_dict)`` plans every env of ``info_dict`` at
once. It is a stable-worldmodel ``Solver``: the published ``CEMSolver``'s constructor
arguments, ``configure(action_space=..., n_envs=..., config=...)`` (which sets the model
action width, frameskip x action dim, unless ``action_dim`` is given), the ``horizon`` /
``n_envs`` / ``action_dim`` properties and ``solve(info_dict, init_action)``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import nn

from .. import _checks
from .. import backend as _backend
from ..reference.jepa import JEPA as _ReferenceJEPA
from ..reference.jepa import action_width_of, device_of, eval_mode, frame_spec_of, window_of
from ..swm import from_published, is_published_lewm
from .config import PlanConfig
from .cost import LowPrecisionWeights, PlanningCost, fast_cost_unsupported_reason
from .refit import cem_refit

__all__ = ["CEMSolver"]

_MASK64 = (1 << 64) - 1


def plan_seed(seed: int, index: int) -> int:
    """Seed of plan number ``index`` of a solver seeded with ``seed`` (splitmix64, 63 bits)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class _CapturedSolve:
    """One captured solve: its static inputs and outputs and the shapes it was captured for."""

    key: tuple
    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor
    goal: torch.Tensor
    mean0: torch.Tensor
    outputs: tuple


def _solver_config(config: PlanConfig | None, settings: dict) -> PlanConfig:
    """``config`` (default: the published settings) with the solver settings given by name."""
    if config is not None and not isinstance(config, PlanConfig):
        raise ValueError(f"config must be a lewm_fast.plan.PlanConfig, got {type(config).__name__}")
    protocol = sorted(set(settings) - set(PlanConfig.SOLVER_FIELDS) - {"seed", "autocast"})
    if protocol:
        raise ValueError(
            f"CEMSolver takes the solver settings {list(PlanConfig.SOLVER_FIELDS)} (seed for "
            f"planner_seed, autocast for precision), got {protocol}; evaluation settings go to evaluate"
        )
    if "seed" in settings:
        settings = {**settings, "planner_seed": settings["seed"]}
        del settings["seed"]
    return (config or PlanConfig()).replace(**settings)


class CEMSolver:
    """Cross-entropy-method planner for all envs at once; a stable-worldmodel ``Solver``.

    Args (the published ``stable_worldmodel.solver.CEMSolver`` ones first, in its order, so
    a Hydra config whose ``_target_`` is ``lewm_fast.plan.CEMSolver`` works unchanged):
        model: a world model with the published ``get_cost(info, candidates (B, S, T, A)) ->
            (B, S)``. For a LeWM JEPA (``lewm_fast.JEPA``, the reference one, or
            stable-worldmodel's ``LeWM``, planned through :func:`lewm_fast.from_published`
            on its own tensors) in eval mode the fast path computes the same costs with far
            less work (see :mod:`lewm_fast.plan.cost`); any other model goes through
            ``get_cost``.
        batch_size: envs scored per predictor rollout, a memory cap: the published solver
            plans its envs in chunks of ``batch_size``; here it is ``max_batch =
            batch_size x num_samples`` candidate rows, scored in chunks with the same
            results. None (default): ``max_batch`` of the config ("auto").
        num_samples, var_scale, n_steps, topk: the CEM settings of :class:`PlanConfig`
            (None: the config's; published defaults 300, 1.0, 30, 30).
        device: where planning runs (default: the model's device).
        seed: the planner's seed (``planner_seed``); None: the config's. Plan k draws from
            ``plan_seed(seed, k)``, not from the published solver's one generator stream,
            so plans agree with the published solver's in distribution, not draw for draw.
        callbacks: None or empty. The published per-iteration callbacks need every
            iteration's candidates on the host, which a captured solve never hands out; a
            non-empty list raises ValueError (use the published solver to record them).
        action_dim: numbers per model action, frameskip x env action dim (10 for Two-Room);
            None: the model's action width, else set by :meth:`configure` from the action
            space and ``config.action_block``.
        config: the planner settings, a :class:`~lewm_fast.plan.PlanConfig` (default: the
            published ones). The solver reads its ``horizon`` (T), ``num_samples`` (S),
            ``n_steps``, ``topk``, ``var_scale``, ``history_size``, ``precision``,
            ``cuda_graph``, ``max_batch`` and seed (``planner_seed``, else ``seed``); the
            evaluation protocol's fields are left to :func:`~lewm_fast.plan.evaluate`.
        fast: use the fast path (None: when the model supports it).
        backend: backend of the elite-refit op (``"auto"``, ``"cuda"``, ``"torch"``).
        **settings: other solver fields of :class:`PlanConfig` that override ``config``:
            ``horizon``, ``history_size``, ``precision`` or ``autocast`` (None,
            ``torch.bfloat16``, ``torch.float16``), ``cuda_graph``, ``max_batch``.

    The settings mean: ``cuda_graph`` captures the whole solve into one CUDA graph (None: on
    CUDA with the fast path), re-captured when input shapes or the model's tensors change;
    after :meth:`configure` a solve for fewer than ``n_envs`` envs (stable-worldmodel's
    ``WorldModelPolicy`` replans only the envs whose action buffer ran out) is padded to
    ``n_envs`` rows on the device, so one graph serves every batch size; ``max_batch`` caps
    the candidate rows (envs x samples) of one predictor rollout, scoring larger batches in
    chunks of whole envs (or of samples, for one env) with the same results (``"auto"``: on
    CUDA, as many rows as fit in half of the free device memory by
    :meth:`PlanningCost.bytes_per_row`, a conservative estimate; fast path only).
    ValueError names a bad or unknown setting.

    ``configure(action_space=..., n_envs=..., config=...)`` (stable-worldmodel's protocol)
    sets ``action_dim``, ``n_envs`` and ``horizon``. ``solve(info_dict, init_action=None)``
    returns ``actions`` (B, horizon, action_dim), the final CEM means; ``std`` (B, horizon,
    action_dim); ``costs`` (B,), the mean elite cost of the last iteration (as published),
    all on the CPU; and ``seed``, the plan's seed.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int | None = None,
        num_samples: int | None = None,
        var_scale: float | None = None,
        n_steps: int | None = None,
        topk: int | None = None,
        device: torch.device | str | None = None,
        seed: int | None = None,
        callbacks: list | None = None,
        *,
        action_dim: int | None = None,
        config: PlanConfig | None = None,
        fast: bool | None = None,
        backend: str = "auto",
        **settings,
    ):
        if callbacks:
            raise ValueError(
                "lewm_fast's CEMSolver takes no callbacks: a captured solve never hands each "
                "iteration's candidates to the host; use stable_worldmodel.solver.CEMSolver to record them"
            )
        published = {"num_samples": num_samples, "var_scale": var_scale, "n_steps": n_steps, "topk": topk}
        settings = {**settings, **{k: v for k, v in published.items() if v is not None}}
        if seed is not None:
            settings["seed"] = seed
        self.config = _solver_config(config, settings)
        if batch_size is not None:
            if "max_batch" in settings:
                raise ValueError(
                    "give batch_size (envs per rollout) or max_batch (candidate rows per rollout), not both"
                )
            self.batch_size = _checks.integer(batch_size, "batch_size", 1, numpy=True)
            self.config = self.config.replace(max_batch=self.batch_size * self.config.num_samples)
        else:
            self.batch_size = None
        for name in ("num_samples", "n_steps", "topk", "var_scale", "history_size", "max_batch"):
            setattr(self, name, getattr(self.config, name))
        self.seed = self.config.solver_seed
        self.autocast = self.config.autocast
        _backend.requested(backend)  # raises ValueError on an unknown name
        self.backend = backend

        self.model = model
        self._net = self._planned_model(model, fast)  # what is planned: model, or a view of it
        if action_dim is not None:
            action_dim = _checks.integer(action_dim, "action_dim", 1, numpy=True)
        self._action_dim = action_width_of(self._net) if action_dim is None else action_dim
        self._n_envs: int | None = None
        self.fast = self._choose_path(self._net, fast)
        self._cost = PlanningCost(self._net, self.history_size) if self.fast else None
        # the window planned with: the given one, else the predictor's num_frames (a model planned
        # through get_cost uses its own rollout's window)
        self.history_size = self._cost.history_size if self.fast else window_of(self._net, self.history_size)
        # Under autocast the fast path runs a copy with the Linear/Conv weights already in the
        # low-precision dtype: the same numbers without a cast kernel per layer and call.
        self._low = (
            LowPrecisionWeights(self._net, self.autocast) if self.fast and self.autocast is not None else None
        )
        self.device = self._choose_device(self._net, device)
        cuda_graph = self.config.cuda_graph
        if cuda_graph and (self.device.type != "cuda" or not self.fast):
            raise ValueError("cuda_graph=True needs a CUDA device and the fast path (a LeWM JEPA model)")
        self.cuda_graph = (
            (self.device.type == "cuda" and self.fast) if cuda_graph is None else bool(cuda_graph)
        )
        self._plans = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self._captured: _CapturedSolve | None = None
        self._auto_rows: dict[int, int | None] = {}

    # ------------------------------------------------------ the Solver protocol
    @property
    def horizon(self) -> int:
        """Model actions per plan (T): the config's ``horizon``, set by :meth:`configure`."""
        return self.config.horizon

    @property
    def action_dim(self) -> int | None:
        """Numbers per model action, env action dim x ``action_block`` (None until known)."""
        return self._action_dim

    @property
    def n_envs(self) -> int | None:
        """Envs of the world planned for, set by :meth:`configure` (None before)."""
        return self._n_envs

    def configure(self, *, action_space, n_envs: int, config) -> None:
        """stable-worldmodel's ``Solver.configure``: plan for ``n_envs`` envs of ``action_space``.

        action_space: the vectorised env's (n_envs, ...) Box; config: stable-worldmodel's
        ``PlanConfig`` or lewm_fast's (``horizon``, ``action_block``). Sets ``action_dim =
        prod(action_space.shape[1:]) x action_block``, ``n_envs`` and ``horizon``. ValueError
        for a non-continuous space or an action width the model does not take.
        """
        shape = getattr(action_space, "shape", None)
        dtype = getattr(action_space, "dtype", None)
        if shape is None or len(shape) < 2 or dtype is None or not np.issubdtype(dtype, np.floating):
            raise ValueError(
                "action_space must be the vectorised env's continuous (Box) space of shape "
                f"(n_envs, ...), got {action_space!r}"
            )
        n_envs = _checks.integer(n_envs, "n_envs", 1, numpy=True)
        block = _checks.integer(getattr(config, "action_block", 1), "config.action_block", 1, numpy=True)
        horizon = _checks.integer(getattr(config, "horizon", None), "config.horizon", 1, numpy=True)
        action_dim = int(np.prod(shape[1:])) * block
        width = action_width_of(self._net)
        if width is not None and width != action_dim:
            raise ValueError(
                f"the env's action dim {int(np.prod(shape[1:]))} x action_block {block} = {action_dim} "
                f"does not match the model's action width {width} (the action encoder's input size)"
            )
        self.config = self.config.replace(horizon=horizon, action_block=block)
        self._action_dim = action_dim
        self._n_envs = n_envs
        self._captured = None
        self._auto_rows.clear()

    # ----------------------------------------------------------------- set-up
    @staticmethod
    def _planned_model(model: nn.Module, fast: bool | None) -> nn.Module:
        """The model the solver plans: ``model``, or for stable-worldmodel's LeWM (unless
        ``fast=False``) a lewm_fast JEPA on its tensors, which the fast path can plan."""
        if fast is False or not is_published_lewm(model):
            return model
        try:
            return from_published(model)
        except ValueError as exc:
            if fast:
                raise ValueError(f"fast=True needs a LeWM JEPA model: {exc}") from None
            warnings.warn(
                f"CEMSolver: no fast path for this {type(model).__name__} ({exc}); planning through get_cost",
                RuntimeWarning,
                stacklevel=3,
            )
            return model

    def _choose_path(self, model: nn.Module, fast: bool | None) -> bool:
        """Whether to plan on the fast path; ValueError for a model neither path can plan with."""
        why_not_fast = fast_cost_unsupported_reason(model)
        if fast and why_not_fast:
            raise ValueError(f"fast=True needs a LeWM JEPA model: {why_not_fast}")
        if fast is None and why_not_fast and isinstance(model, _ReferenceJEPA):
            warnings.warn(
                f"CEMSolver: no fast path for this JEPA ({why_not_fast}); planning through get_cost",
                RuntimeWarning,
                stacklevel=3,
            )
        chosen = why_not_fast is None if fast is None else bool(fast)
        if not chosen and not callable(getattr(model, "get_cost", None)):
            raise ValueError(
                "model must expose get_cost(info_dict, candidates) or be a LeWM JEPA, "
                f"got {type(model).__name__}"
            )
        width = action_width_of(model)
        if width is not None and self.action_dim is not None and width != self.action_dim:
            raise ValueError(
                f"action_dim = {self.action_dim} does not match the model's action width {width} "
                "(frameskip x env action dim, the action encoder's input size)"
            )
        return chosen

    def _choose_device(self, model: nn.Module, device) -> torch.device:
        """``device``, or the model's (CPU for a model without tensors); on the fast path the
        model must already be there."""
        model_device = device_of(model)
        chosen = _checks.with_index(device if device is not None else model_device or "cpu")
        if self.fast and model_device is not None and model_device != chosen:
            raise ValueError(
                f"the model is on {model_device} but planning runs on {chosen}; "
                "move the model there (model.to(device)) or leave device=None"
            )
        return chosen

    # ----------------------------------------------------------------- helpers
    def _generator(self) -> torch.Generator:
        if self.device not in self._generators:
            self._generators[self.device] = torch.Generator(device=self.device)
        return self._generators[self.device]

    def _autocast(self, cache_enabled: bool = True):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=cache_enabled)

    def _mean0(self, envs: int, init_action) -> torch.Tensor:
        mean = torch.zeros(envs, self.horizon, self.action_dim, device=self.device)
        if init_action is None:
            return mean
        if isinstance(init_action, np.ndarray):
            init_action = torch.from_numpy(init_action)
        if not torch.is_tensor(init_action) or init_action.dim() != 3:
            raise ValueError(
                f"init_action must be a (B, T0, action_dim) tensor, got {_checks.shape(init_action)}"
            )
        b, t0, a = init_action.shape
        if b != envs or a != self.action_dim or t0 > self.horizon:
            raise ValueError(
                f"init_action must be (B, T0, action_dim) = ({envs}, <= {self.horizon}, {self.action_dim}), "
                f"got {tuple(init_action.shape)}"
            )
        mean[:, :t0] = init_action.to(device=self.device, dtype=mean.dtype)
        return mean

    def _check_info(self, info_dict) -> int:
        if not isinstance(info_dict, dict):
            raise ValueError(
                f"info_dict must be a dict of per-env arrays (B, ...), got {type(info_dict).__name__}"
            )
        arrays = {k: v for k, v in info_dict.items() if torch.is_tensor(v) or isinstance(v, np.ndarray)}
        sizes = {k: len(v) for k, v in arrays.items() if v.ndim}
        if not sizes:
            raise ValueError("info_dict holds no tensor or array with a leading env axis B")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"info_dict values must share the leading env axis B, got {sizes}")
        return next(iter(sizes.values()))

    def _frames(self, info_dict: dict, key: str) -> torch.Tensor:
        """Layout, dtype and channels checked here; values on the device (see _fast_body)."""
        value = info_dict.get(key)
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        channels, patch = frame_spec_of(self._net)
        name = f"info_dict[{key!r}]"
        return _checks.pixels(value, name, _checks.FRAMES, channels, patch, values=False).to(
            self.device, torch.float32
        )

    # ------------------------------------------------------------------ solve
    def _run(self, score, mean: torch.Tensor, n_steps: int):
        """The CEM iterations from mean (B, T, A); ``score(candidates) -> (B, S)`` float32.

        No host synchronisation: this is the body the CUDA graph captures.
        """
        envs = mean.shape[0]
        gen = self._generator()
        std = torch.full_like(mean, self.var_scale)
        nan_count = torch.zeros(envs, dtype=torch.int32, device=mean.device)
        elite_cost = torch.full((envs,), float("nan"), device=mean.device)
        shape = (envs, self.num_samples, self.horizon, self.action_dim)
        for _ in range(n_steps):
            noise = torch.randn(shape, generator=gen, device=mean.device)
            candidates = noise * std.unsqueeze(1) + mean.unsqueeze(1)
            candidates[:, 0] = mean
            costs = score(candidates)
            mean, std, elite_cost, nans = cem_refit(
                candidates, costs, mean, std, self.topk, backend=self.backend
            )
            nan_count += nans
        return mean, std, elite_cost, nan_count

    def _sync_cost(self) -> None:
        """Point ``self._cost`` at the model to plan with: the model itself, or under autocast
        its low-precision copy (refreshed when the model's weights changed)."""
        if self._low is None:
            return
        try:
            low = self._low.sync()
        except Exception as exc:  # e.g. a model that cannot be deep-copied
            warnings.warn(
                f"CEMSolver: no low-precision weight copy ({type(exc).__name__}: {exc}); autocast "
                "casts the weights at every call instead",
                RuntimeWarning,
                stacklevel=3,
            )
            self._low = None
            return
        if self._cost.model is not low:
            self._cost = PlanningCost(low, self.history_size)

    def _batch_rows(self, envs: int) -> int | None:
        """Rows per predictor rollout for ``envs`` envs (None: all of them at once)."""
        if self.max_batch is None:
            return None
        if self.max_batch != "auto":
            return self.max_batch
        if self.device.type != "cuda":
            return None
        if envs not in self._auto_rows:  # fixed per env count: a captured graph stays valid
            free, _ = torch.cuda.mem_get_info(self.device)
            per_row = self._cost.bytes_per_row(self.horizon, self.autocast or torch.float32)
            rows = max(1, int(0.5 * free / per_row))
            self._auto_rows[envs] = None if rows >= envs * self.num_samples else rows
        return self._auto_rows[envs]

    @staticmethod
    def _chunks(envs: int, samples: int, rows: int | None) -> list[tuple[slice, slice]]:
        """(env slice, sample slice) pieces of at most ``rows`` rows, in row order."""
        everything = [(slice(0, envs), slice(0, samples))]
        if rows is None or rows >= envs * samples:
            return everything
        if rows >= samples:
            per = rows // samples
            return [(slice(b, min(b + per, envs)), slice(0, samples)) for b in range(0, envs, per)]
        starts = range(0, samples, rows)
        return [(slice(b, b + 1), slice(s, min(s + rows, samples))) for b in range(envs) for s in starts]

    def _fast_body(
        self, pixels, goal, mean0, n_steps: int, cache_enabled: bool = True, rows=None, subset=None
    ):
        """The CEM iterations on the fast path, and the frames' faults per env (no host sync).

        ``subset`` (E,) int64: score only these envs' candidates (the others cost 0 and
        their plans mean nothing); every env's noise is drawn as in a full solve, so the
        scored envs plan as they would among all of them.
        """
        faults = torch.stack([_checks.frame_faults(pixels), _checks.frame_faults(goal)])  # (2, 2, B)
        cost = self._cost
        with self._autocast(cache_enabled):
            emb, goal_emb = cost.encode(pixels, goal)
        if subset is not None:
            emb, goal_emb = emb[subset], goal_emb[subset]
        chunks = self._chunks(emb.shape[0], self.num_samples, rows)

        def scored(candidates):
            with self._autocast(cache_enabled):
                if len(chunks) == 1:
                    return cost.rollout_cost(emb, goal_emb, candidates).float()
                parts = [cost.rollout_cost(emb[e], goal_emb[e], candidates[e, s]).float() for e, s in chunks]
            # the chunks cover the (env, sample) rows in order
            return torch.cat([part.flatten() for part in parts]).view(candidates.shape[:2])

        def score(candidates):
            if subset is None:
                return scored(candidates)
            costs = candidates.new_zeros(candidates.shape[:2])
            return costs.index_copy_(0, subset, scored(candidates[subset]))

        return (*self._run(score, mean0, n_steps), faults)

    def _generic_body(self, info_dict: dict, envs: int, mean0):
        samples = self.num_samples
        expanded = {}
        for key, value in info_dict.items():
            if torch.is_tensor(value):
                value = value.unsqueeze(1).expand(envs, samples, *value.shape[1:])
            elif isinstance(value, np.ndarray):
                value = np.repeat(value[:, None], samples, axis=1)
            expanded[key] = value

        def score(candidates):
            costs = self._net.get_cost(dict(expanded), candidates)
            if not torch.is_tensor(costs) or tuple(costs.shape) != (envs, samples):
                raise ValueError(
                    f"get_cost must return a tensor of shape (B, S) = ({envs}, {samples}), "
                    f"got {_checks.shape(costs)}"
                )
            return costs.to(self.device, torch.float32)

        return self._run(score, mean0, self.n_steps)

    def _model_key(self) -> tuple:
        model = self._cost.model  # the low-precision copy under autocast: refreshed in place
        tensors = chain(model.parameters(), model.buffers())
        return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors)

    def _capture(self, key, pixels, goal, mean0, rows) -> _CapturedSolve:
        pixels, goal, mean0 = pixels.clone(), goal.clone(), mean0.clone()
        gen = self._generator()
        # Warm up on a side stream (lazy cuBLAS/cuDNN set-up, the csrc build) before capture.
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            self._fast_body(pixels, goal, mean0, n_steps=1, cache_enabled=False, rows=rows)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():  # a no-op (deprecated) where torch registers lazily
            warnings.simplefilter("ignore")
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            outputs = self._fast_body(
                pixels, goal, mean0, n_steps=self.n_steps, cache_enabled=False, rows=rows
            )
        return _CapturedSolve(key, graph, pixels, goal, mean0, outputs)

    def _graph_solve(self, pixels, goal, mean0, seed: int, rows):
        key = (tuple(pixels.shape), tuple(goal.shape), rows, self._model_key())
        if self._captured is None or self._captured.key != key:
            self._captured = None  # free the old graph's memory pool first
            try:
                self._captured = self._capture(key, pixels, goal, mean0, rows)
            except Exception as exc:  # e.g. an op that cannot be captured on this torch/driver
                warnings.warn(
                    f"CEMSolver: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                    "planning eagerly (same math, more launches)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.cuda_graph = False
                return None
        captured = self._captured
        captured.pixels.copy_(pixels)
        captured.goal.copy_(goal)
        captured.mean0.copy_(mean0)
        self._generator().manual_seed(seed)
        captured.graph.replay()
        return captured.outputs

    def _fast_solve(self, info_dict: dict, envs: int, mean0: torch.Tensor, seed: int, active=None):
        pixels = self._frames(info_dict, "pixels")
        goal = self._frames(info_dict, "goal")
        if goal.shape[0] != envs or pixels.shape[2:] != goal.shape[2:]:
            raise ValueError(
                f"info_dict['goal'] {tuple(goal.shape)} must hold (B, G, C, H, W) frames like "
                f"info_dict['pixels'] {tuple(pixels.shape)}"
            )
        if pixels.shape[1] > self.horizon:
            raise ValueError(
                f"horizon ({self.horizon}) must be at least the number of context frames ({pixels.shape[1]})"
            )
        self._sync_cost()
        if self.cuda_graph and self._n_envs is not None and envs < self._n_envs:
            # one graph for every batch size: pad to n_envs rows with copies of env 0, on the device
            pad = self._n_envs - envs
            pixels, goal, mean0 = (
                torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) for t in (pixels, goal, mean0)
            )
        rows = self._batch_rows(pixels.shape[0])
        outputs = self._graph_solve(pixels, goal, mean0, seed, rows) if self.cuda_graph else None
        if outputs is None:
            subset = None
            if active is not None and bool(active.any()) and not bool(active.all()):  # eager: skip the rest
                subset = active.to(self.device).nonzero().squeeze(1)
            self._generator().manual_seed(seed)
            outputs = self._fast_body(pixels, goal, mean0, self.n_steps, rows=rows, subset=subset)
        *per_env, faults = outputs
        return (*(t[:envs] for t in per_env), faults[..., :envs])

    @torch.no_grad()
    def solve(
        self,
        info_dict: dict,
        init_action: torch.Tensor | None = None,
        *,
        seed: int | None = None,
        active: torch.Tensor | None = None,
    ) -> dict:
        """Plan every env of ``info_dict``.

        info_dict: per-env values with a leading env axis B; the fast path reads ``pixels``
        (B, H, C, h, w), the context frames, and ``goal`` (B, G, C, h, w), whose last frame is
        the goal; the ``get_cost`` path passes every value on repeated per sample, (B, S, ...).
        init_action: (B, T0, action_dim) with T0 <= horizon, the first rows of the initial
        mean (a warm start), or None. seed: this plan's seed (default: the next one of the
        solver's sequence; a solve that raises does not use one up). active: (B,) bool, the
        envs that need a plan (default: all); on the eager fast path only their candidates
        are scored, each from the same noise as in a full solve, so their plans are the full
        solve's (up to float rounding) and the other envs' plans mean nothing (a captured
        CUDA graph plans every env anyway).
        Returns ``actions`` and ``std`` (B, horizon, action_dim), ``costs`` (B,) and ``seed``.

        The model is planned in eval mode (dropout off, BatchNorm on its running statistics)
        and left as it was found: every module's mode and every parameter, buffer and
        ``requires_grad`` flag are unchanged. ValueError for frames of another layout, dtype
        or channel count, and, once the solve is done (no extra host sync), for an env whose
        frames hold NaN/inf or values no ImageNet-normalised frame reaches (spec section 5):
        such a solve returns nothing and leaves nothing a later solve depends on.
        """
        envs = self._check_info(info_dict)
        if self.action_dim is None:
            raise ValueError(
                "CEMSolver: the action width is unknown; pass action_dim= or call "
                "configure(action_space=..., n_envs=..., config=...) first"
            )
        drawn = seed is None
        if drawn:
            seed = plan_seed(self.seed, self._plans)
        mean0 = self._mean0(envs, init_action)
        if active is not None and (
            not torch.is_tensor(active) or active.dtype != torch.bool or tuple(active.shape) != (envs,)
        ):
            raise ValueError(f"active must be a ({envs},) bool tensor, got {_checks.shape(active)}")
        with eval_mode(self._net):  # planning sees eval mode; the model's own flags come back after
            if self.fast:
                outputs = self._fast_solve(info_dict, envs, mean0, seed, active)
            else:
                self._generator().manual_seed(seed)
                outputs = self._generic_body(info_dict, envs, mean0)
        mean, std, elite_cost, nan_count, *faults = (t.cpu() for t in outputs)
        for name, found in zip(("info_dict['pixels']", "info_dict['goal']"), faults[0] if faults else ()):
            _checks.check_frame_faults(found, name)  # after the solve: the copy above is its one sync
        if drawn:  # only a solve that returns a plan uses up a seed of the sequence
            self._plans += 1
        if nan_count.any():
            warnings.warn(
                f"CEMSolver: {int(nan_count.sum())} NaN candidate costs over {self.n_steps} iterations "
                f"(per env: {nan_count.tolist()}) were masked; NaN costs are never elites",
                RuntimeWarning,
                stacklevel=2,
            )
        return {"actions": mean, "std": std, "costs": elite_cost, "seed": seed}

    __call__ = solve
