"""Planning with LeWM: a batched CEM solver with a CUDA-graph-captured solve (spec section 6).

::

    from lewm_fast.plan import CEMSolver

    solver = CEMSolver(model.eval(), action_dim=10)  # horizon 5, 300 samples, 30 iterations, top 30
    plan = solver.solve({"pixels": frames, "goal": goals})  # frames, goals: (B, 1, 3, 224, 224)
    plan["actions"]  # (B, 5, 10): the final CEM means

:class:`PlanConfig` holds every planner setting (the published values by default);
:class:`CEMSolver` plans every env at once; :func:`planning_cost` is its fast cost (the
numbers of ``JEPA.get_cost``) and :func:`cem_refit` its batched elite refit (csrc op).
:func:`evaluate` runs the published Two-Room MPC evaluation (50 episodes, all batched)::

    result = evaluate(model.eval(), "data/two_room")  # or a TwoRoomDataset
    result["success_rate"], result["final_distance_mean"], result["plan_latency_ms"]["median"]

``evaluate(..., episodes_out="episodes.npz")`` also saves every episode's path (positions
per env step and the first plan); :func:`read_episodes` reads it back and
:func:`lewm_fast.report.write_episode_pictures` draws it.

:func:`evaluate_world` runs the same protocol through stable-worldmodel's ``World`` with any
stable-worldmodel ``Solver`` (``lewm-fast[swm]``). The plain one-env-at-a-time planner is
:mod:`lewm_fast.reference.cem`.
"""

from .config import PlanConfig
from .cost import (
    LowPrecisionWeights,
    PlanningCost,
    fast_cost_unsupported_reason,
    planning_cost,
    supports_fast_cost,
)
from .evaluation import blocks_to_actions, eligible_start_rows, evaluate, read_episodes, select_start_rows
from .refit import Refit, cem_refit, cem_refit_torch
from .solver import CEMSolver, plan_seed
from .world import evaluate_world

__all__ = [
    "PlanConfig",
    "CEMSolver",
    "evaluate",
    "read_episodes",
    "evaluate_world",
    "select_start_rows",
    "eligible_start_rows",
    "blocks_to_actions",
    "PlanningCost",
    "LowPrecisionWeights",
    "planning_cost",
    "supports_fast_cost",
    "fast_cost_unsupported_reason",
    "Refit",
    "cem_refit",
    "cem_refit_torch",
    "plan_seed",
]
