"""The full Two-Room evaluation (spec section 6): the published planning path vs ``lewm_fast.plan.evaluate``.

Both run :func:`lewm_fast.plan.evaluate` (the same episodes, MPC loop and environments on
the device) and differ only in the planner. Reference ("reference"): the published
solver's work, one env after the other, float32, ``JEPA.get_cost`` at every CEM iteration
(re-encoding start and goal frames each time), via :func:`lewm_fast.reference.cem.cem_plan`
on the reference JEPA. Fast: ``CEMSolver`` on the lewm_fast JEPA with the same weights, all
episodes in one batch (on CUDA one graph replay per plan), float32 and, on CUDA, bf16.

Rows: phase "eval" is the whole evaluation (episodes x budget env steps, every plan);
"fast ... cold" builds a new solver (graph capture included), the other fast rows reuse a
warmed one. Phase "plan" is one planner call for all episodes (median and 20/80 % quantiles
over the evaluation's calls, each timed with a device sync before and after).

Settings: on CUDA the paper-size model (random weights) and the published protocol, 50
episodes, 300 samples, 30 iterations. On CPU the small model of ``bench_plan``; ``--quick``
also shrinks the run to 10 episodes, 32 samples and 3 iterations, to finish well under a
minute. The success rate is reported as a check that both paths ran the protocol; with
random weights it measures nothing about the model.
"""

from __future__ import annotations

import tempfile
import time

import torch

from lewm_fast.data import generate_dataset
from lewm_fast.plan import CEMSolver, evaluate
from lewm_fast.reference import cem as ref_cem

from .bench_plan import _models
from .harness import Report, Timing, synchronize

BENCH = "eval"

PUBLISHED = {"episodes": 50, "num_samples": 300, "n_steps": 30, "topk": 30}
CPU = {"episodes": 50, "num_samples": 64, "n_steps": 5, "topk": 8}
QUICK_CPU = {"episodes": 10, "num_samples": 32, "n_steps": 3, "topk": 4}
DATASET_EPISODES = 200  # about 13,000 eligible start rows; the draw needs 51


class PublishedCEM:
    """The published planner as a solver for ``evaluate``: per env, float32, ``get_cost`` every iteration."""

    def __init__(self, model, *, action_dim: int, device: torch.device, seed: int, **plan):
        self.model, self.action_dim, self.device, self.plan, self.seed = model, action_dim, device, plan, seed
        self.num_samples, self.n_steps, self.topk = plan["num_samples"], plan["n_steps"], plan["topk"]
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def solve(self, info_dict: dict, init_action: torch.Tensor | None = None) -> dict:
        return ref_cem.cem_plan(
            self.model.get_cost,
            info_dict,
            init_action=init_action,
            action_dim=self.action_dim,
            generator=self.generator,
            device=self.device,
            **self.plan,
        )


def _timing(values_ms: list[float]) -> Timing:
    ordered = sorted(values_ms)

    def quantile(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])

    return Timing(quantile(0.5), quantile(0.2), quantile(0.8), len(ordered), wall_ms=quantile(0.5))


def _timed(fn, device: torch.device):
    """(result of fn(), wall milliseconds with the device synchronised before and after)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def run(report: Report, quick: bool) -> None:
    device = report.device
    cuda = device.type == "cuda"
    fast_model, ref_model, config = _models(device)
    width = fast_model.action_width
    settings = PUBLISHED if cuda else QUICK_CPU if quick else CPU
    episodes = settings["episodes"]
    plan = {k: settings[k] for k in ("num_samples", "n_steps", "topk")}
    case = f"{episodes} episodes x 50 steps, S={plan['num_samples']}, {plan['n_steps']} it"
    reps = 3 if quick else 5

    def add(impl: str, phase: str, timing: Timing, result: dict) -> None:
        seconds = timing.median_ms / 1e3
        metrics = {"success %": 100 * result["success_rate"]}
        if phase == "eval":
            metrics["episodes/s"] = episodes / seconds
        else:
            metrics["env-plans/s"] = episodes / seconds
        report.add(BENCH, case, impl, phase, timing, None, **metrics)

    with tempfile.TemporaryDirectory(prefix="lewm-fast-bench-eval-") as tmp:
        data = generate_dataset(
            f"{tmp}/two_room", episodes=DATASET_EPISODES, seed=0, device=device, progress=False
        )
        # Load the csrc refit op and initialise the device libraries outside the timed runs.
        size = config.encoder.image_size
        frames = torch.randn(1, 1, 3, size, size, device=device)
        CEMSolver(fast_model, action_dim=width, num_samples=8, n_steps=1, topk=2).solve(
            {"pixels": frames, "goal": frames}
        )

        # The published path: one timed evaluation (it takes minutes at the published settings).
        published = PublishedCEM(ref_model, action_dim=width, device=device, seed=42, horizon=5, **plan)
        ref, ms = _timed(
            lambda: evaluate(ref_model, data, episodes=episodes, solver=published, progress=False), device
        )
        add("reference", "eval", Timing(ms, ms, ms, 1, wall_ms=ms), ref)
        add("reference", "plan", _timing(ref["plan_latency_ms"]["per_plan"]), ref)

        precisions = [("fast-fp32", None)] + ([("fast-bf16", torch.bfloat16)] if cuda else [])
        for name, autocast in precisions:

            def build(autocast=autocast):
                return CEMSolver(
                    fast_model, action_dim=width, seed=42, device=device, autocast=autocast, **plan
                )

            def cold():
                solver = build()
                return solver, evaluate(fast_model, data, episodes=episodes, solver=solver, progress=False)

            (solver, result), ms = _timed(cold, device)
            impl = name + ("-graph" if solver.cuda_graph else "")
            add(f"{impl} cold", "eval", Timing(ms, ms, ms, 1, wall_ms=ms), result)

            eval_ms, plan_ms = [], []
            for _ in range(reps):
                result, ms = _timed(
                    lambda solver=solver: evaluate(
                        fast_model, data, episodes=episodes, solver=solver, warmup=False, progress=False
                    ),
                    device,
                )
                eval_ms.append(ms)
                plan_ms.extend(result["plan_latency_ms"]["per_plan"])
            add(impl, "eval", _timing(eval_ms), result)
            add(impl, "plan", _timing(plan_ms), result)
