"""The planner's settings, written once: :class:`PlanConfig` (spec section 6).

One frozen dataclass holds the published Two-Room evaluation protocol and the CEM solver's
settings. :class:`~lewm_fast.plan.CEMSolver`, :func:`~lewm_fast.plan.evaluate`, the
pipeline's ``eval`` section (:class:`~lewm_fast.pipeline.EvalConfig`, a subclass) and the
``lewm-fast eval`` flags (generated from the fields by :func:`add_arguments`) all read it,
so a default or a check lives here and nowhere else.

Names follow the published code where they mean the same thing: stable-worldmodel's
``PlanConfig`` (``horizon``, ``receding_horizon``, ``action_block``, ``warm_start``) and its
``CEMSolver`` (``num_samples``, ``n_steps``, ``topk``, ``var_scale``). ``history_size`` is
the predictor's context window during a rollout, not stable-worldmodel's ``history_len``
(observations kept by the policy); the two are different settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from .. import _checks

__all__ = ["PlanConfig", "add_arguments", "from_arguments"]

# precision name -> the autocast dtype of the model (None: float32, no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_max_batch(value, name: str = "max_batch") -> int | str | None:
    """A valid ``max_batch``: a positive integer, ``"auto"`` or None (else ValueError)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, 'auto' or null (None), got {value!r}")
    return int(value)


# integer fields -> their least value
_INTEGERS = {
    "episodes": 1,
    "goal_offset": 1,
    "budget": 1,
    "seed": 0,
    "seeds": 1,
    "horizon": 1,
    "action_block": 1,
    "num_samples": 2,
    "n_steps": 1,
    "topk": 2,
}


def _setting(default: Any, group: str, help: str) -> Any:
    return field(default=default, metadata={"group": group, "help": help})


@dataclass(frozen=True)
class PlanConfig:
    """The Two-Room planning evaluation and its CEM planner (published values by default).

    Protocol (the published ``eval.py``, spec section 6):
        episodes: evaluation episodes B, planned together. goal_offset: env steps from a
        start row to its goal row. budget: env steps per episode. seed: numpy
        ``default_rng`` seed of the start-row draw, and of the planner unless
        ``planner_seed`` is set. seeds: how many times :func:`~lewm_fast.plan.evaluate`
        runs the episodes, repeat k (from 0) with the planner seed ``solver_seed + k``; the
        first repeat is the headline result, and the others give the spread and a pooled
        interval. vary_start_seed: repeat k also draws its start rows with ``seed + k``.
        This departs from the published protocol, whose start rows are always the draw of
        ``seed`` (42); off by default.

    MPC loop (stable-worldmodel's ``PlanConfig`` names):
        horizon: model actions per plan (T). receding_horizon: model actions executed per
        plan, at most ``horizon``; None: all of them (the published 5 of 5). action_block:
        raw env actions per model action (frameskip); the model's action width is
        ``action_block`` x the env's action dimension. warm_start: when fewer actions are
        executed than planned, the unexecuted blocks seed the next plan's mean.

    CEM solver (the published ``CEMSolver`` names):
        num_samples (S): candidates per env and iteration, >= 2. n_steps: iterations.
        topk: elites per iteration, in [2, num_samples]. var_scale: initial standard
        deviation of every action entry. planner_seed: the solver's seed (plan k draws
        from ``plan_seed(planner_seed, k)``); None: ``seed``. history_size: the
        predictor's context window during a rollout; None: the predictor's ``num_frames``
        (3 in the published model; spec section 6).

    Execution (lewm_fast's; results do not depend on them beyond floating point):
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` autocast of the model.
        cuda_graph: capture each solve into one CUDA graph (None: on CUDA with the fast
        path). max_batch: most candidate rows (envs x samples) per predictor rollout, an
        integer, ``"auto"`` (chunk only where free GPU memory is short) or None (never
        chunk).

    Every field is checked on construction: ValueError naming the field (with the
    section prefix of a subclass, e.g. ``eval.topk``) and what it must be. Integer fields
    accept numpy integers and store plain ints, so a config always serialises to JSON.
    """

    _prefix: ClassVar[str] = ""

    episodes: int = _setting(50, "protocol", "evaluation episodes, planned together")
    goal_offset: int = _setting(25, "protocol", "env steps from a start row to its goal row")
    budget: int = _setting(50, "protocol", "env steps per episode")
    seed: int = _setting(42, "protocol", "start-row draw seed (and the planner's, unless --planner-seed)")
    seeds: int = _setting(
        1,
        "protocol",
        "how many planner seeds to evaluate with: planner_seed, planner_seed + 1, ...; the first is "
        "the headline result, all of them give the mean, spread and a pooled 95%% interval",
    )
    vary_start_seed: bool = _setting(
        False,
        "protocol",
        "repeat k also draws its start rows with seed + k (departs from the published protocol, "
        "whose start rows are the draw of seed; default: every repeat plans the same episodes)",
    )
    horizon: int = _setting(5, "mpc", "model actions per plan")
    receding_horizon: int | None = _setting(
        None, "mpc", "model actions executed per plan (default: the whole horizon, as published)"
    )
    action_block: int = _setting(5, "mpc", "raw env actions per model action (frameskip)")
    warm_start: bool = _setting(True, "mpc", "seed the next plan with the unexecuted actions")
    num_samples: int = _setting(300, "solver", "CEM candidates per env and iteration")
    n_steps: int = _setting(30, "solver", "CEM iterations")
    topk: int = _setting(30, "solver", "CEM elites per iteration")
    var_scale: float = _setting(1.0, "solver", "initial standard deviation of the CEM")
    planner_seed: int | None = _setting(None, "solver", "planner seed (default: the seed)")
    history_size: int | None = _setting(
        None, "solver", "predictor context window of a rollout (default: the predictor's num_frames)"
    )
    precision: str = _setting("fp32", "execution", "model precision: fp32, or bf16/fp16 autocast")
    cuda_graph: bool | None = _setting(
        None, "execution", "capture each solve in a CUDA graph (default: on CUDA with the fast path)"
    )
    max_batch: int | str | None = _setting(
        "auto",
        "execution",
        "most candidate rows (envs x samples) per predictor rollout: an integer, 'auto' "
        "(chunk only when free GPU memory is short) or none",
    )

    # the fields a CEMSolver reads; the others are the evaluation protocol's
    SOLVER_FIELDS: ClassVar[tuple[str, ...]] = (
        "horizon",
        "num_samples",
        "n_steps",
        "topk",
        "var_scale",
        "planner_seed",
        "history_size",
        "precision",
        "cuda_graph",
        "max_batch",
    )

    def __post_init__(self) -> None:
        for name, minimum in _INTEGERS.items():
            self._integer(name, minimum)
        for name, minimum in (("receding_horizon", 1), ("planner_seed", 0), ("history_size", 1)):
            if getattr(self, name) is not None:
                self._integer(name, minimum)
        p = self._prefix
        if self.executed_per_plan > self.horizon:
            raise ValueError(
                f"{p}receding_horizon ({self.receding_horizon}) must not exceed {p}horizon ({self.horizon})"
            )
        if self.topk > self.num_samples:
            raise ValueError(f"{p}topk ({self.topk}) must not exceed {p}num_samples ({self.num_samples})")
        for name in ("warm_start", "vary_start_seed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{p}{name} must be true or false, got {getattr(self, name)!r}")
        scale = self.var_scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not (math.isfinite(scale) and scale > 0)
        ):
            raise ValueError(f"{p}var_scale must be a positive finite number, got {scale!r}")
        object.__setattr__(self, "var_scale", float(scale))
        if self.precision not in PRECISIONS:
            raise ValueError(f"{p}precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.cuda_graph not in (None, True, False):
            raise ValueError(f"{p}cuda_graph must be true, false or null, got {self.cuda_graph!r}")
        object.__setattr__(self, "max_batch", _check_max_batch(self.max_batch, f"{p}max_batch"))

    def _integer(self, name: str, minimum: int) -> None:
        value = _checks.integer(getattr(self, name), f"{self._prefix}{name}", minimum, numpy=True)
        object.__setattr__(self, name, value)

    @property
    def autocast(self) -> torch.dtype | None:
        """The model's autocast dtype for :attr:`precision` (None for fp32)."""
        return PRECISIONS[self.precision]

    @property
    def solver_seed(self) -> int:
        """The planner's seed: ``planner_seed``, or ``seed`` when that is None."""
        return self.seed if self.planner_seed is None else self.planner_seed

    @property
    def executed_per_plan(self) -> int:
        """Model actions executed per plan: ``receding_horizon``, or ``horizon`` when None."""
        return self.horizon if self.receding_horizon is None else self.receding_horizon

    @property
    def warm_starts(self) -> bool:
        """Whether plans are warm-started: ``warm_start`` and fewer actions executed than planned."""
        return self.warm_start and self.executed_per_plan < self.horizon

    def replace(self, **settings: Any) -> PlanConfig:
        """A copy with some fields changed, checked like a new config.

        ``autocast=`` (None, ``torch.bfloat16`` or ``torch.float16``) is accepted for
        ``precision``. ValueError names an unknown setting and lists the known ones.
        """
        if "autocast" in settings:
            dtype = settings.pop("autocast")
            names = {v: k for k, v in PRECISIONS.items()}
            if dtype not in names:
                raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
            settings["precision"] = names[dtype]
        known = [f.name for f in fields(self)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"unknown planner setting(s) {unknown}; expected some of {known} (or autocast)")
        return dataclasses.replace(self, **settings) if settings else self

    def solver_settings_changed(self) -> list[str]:
        """The solver-only fields (not ``horizon``) that differ from the published defaults."""
        default = PlanConfig()
        return sorted(
            name
            for name in self.SOLVER_FIELDS
            if name != "horizon" and getattr(self, name) != getattr(default, name)
        )


# ------------------------------------------------------------------------------ CLI flags


def _max_batch(text: str) -> int | str | None:
    """--max-batch: an integer, 'auto' or 'none' (the config checks the value)."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'auto' or 'none', got {text!r}") from None


_GROUP_TITLES = {
    "protocol": "evaluation protocol",
    "mpc": "MPC loop",
    "solver": "CEM solver",
    "execution": "execution",
}


def add_arguments(parser: argparse.ArgumentParser, config: PlanConfig | None = None) -> None:
    """Add one ``--<field>`` flag per :class:`PlanConfig` field, grouped, defaults from ``config``.

    Booleans get ``--x/--no-x``; ``precision`` its choices; ``max_batch`` an integer,
    ``auto`` or ``none``. :func:`from_arguments` reads them back.
    """
    config = config or PlanConfig()
    groups = {key: parser.add_argument_group(title) for key, title in _GROUP_TITLES.items()}
    for f in fields(config):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "default": getattr(config, f.name),
            "help": f.metadata["help"],
            "dest": f.name,
        }
        if f.name in ("warm_start", "vary_start_seed", "cuda_graph"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "precision":
            kwargs["choices"] = sorted(PRECISIONS)
        elif f.name == "max_batch":
            kwargs["type"] = _max_batch
        elif f.name == "var_scale":
            kwargs["type"] = float
        else:
            kwargs["type"] = int
        groups[f.metadata["group"]].add_argument(flag, **kwargs)


def from_arguments(args: argparse.Namespace) -> PlanConfig:
    """The :class:`PlanConfig` of flags added by :func:`add_arguments` (ValueError if invalid)."""
    return PlanConfig(**{f.name: getattr(args, f.name) for f in fields(PlanConfig)})
