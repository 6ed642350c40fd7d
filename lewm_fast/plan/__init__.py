"""Planning with LeWM: a batched CEM solver with a CUDA-graph-captured solve (spec section 6).

::

    from lewm_fast.plan import CEMSolver

    solver = CEMSolver(model.eval(), action_dim=10)  # horizon 5, 300 samples, 30 iterations, top 30
    plan = solver.solve({"pixels": frames, "goal": goals})  # frames, goals: (B, 1, 3, 224, 224)
    plan["actions"]  # (B, 5, 10): the final CEM means

:class:`CEMSolver` plans every env at once; :func:`planning_cost` is its fast cost (the
numbers of ``JEPA.get_cost``) and :func:`cem_refit` its batched elite refit (csrc op).
The plain one-env-at-a-time planner is :mod:`lewm_fast.reference.cem`.
"""

from .cost import PlanningCost, fast_cost_unsupported_reason, planning_cost, supports_fast_cost
from .refit import Refit, cem_refit, cem_refit_torch
from .solver import CEMSolver, plan_seed

__all__ = [
    "CEMSolver",
    "PlanningCost",
    "planning_cost",
    "supports_fast_cost",
    "fast_cost_unsupported_reason",
    "Refit",
    "cem_refit",
    "cem_refit_torch",
    "plan_seed",
]
