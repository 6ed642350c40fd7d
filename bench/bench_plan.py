"""Plan latency: the published CEM path vs ``lewm_fast.plan.CEMSolver`` (spec section 6).

Reference ("reference"): the published solver's work, one env after the other, float32,
``JEPA.get_cost`` at every iteration (re-encoding start and goal frames each time), via
:func:`lewm_fast.reference.cem.cem_plan` on the reference JEPA. Fast: ``CEMSolver`` on the
lewm_fast JEPA with the same weights (all envs in one batch; on CUDA one graph replay per
plan), float32 and, on CUDA, bf16 autocast, and bf16 with the predictor blocks' fused
step kernel off (``fast-bf16-unfused``: AdaLN-Zero kernels, cuBLAS GEMMs and SDPA per
block step, what the one-kernel block step replaced). Cases: 1 env and 50 envs at the published
settings (horizon 5, 300 samples, 30 iterations, top 30), then (not with ``--quick``) a
sweep over num_samples and num_envs (fast path only) to show how the cost grows.

On CUDA the paper-size model runs; on CPU a small one (56 px frames, 2-layer ViT, 2
predictor blocks), and ``--quick`` on CPU also plans with 64 samples and 5 iterations, to
finish well under a minute (the case names say which setting ran). Rows carry plans/s and candidate
rollouts/s (candidates x iterations per second).
"""

from __future__ import annotations

import torch

from lewm_fast import LeWMConfig
from lewm_fast.plan import CEMSolver
from lewm_fast.reference import cem as ref_cem

from .harness import Report, peak_extra_memory, time_fn

BENCH = "plan"


# The published setting (spec section 6); the CPU --quick run shrinks it to stay fast.
PUBLISHED = {"horizon": 5, "num_samples": 300, "n_steps": 30, "topk": 30}
QUICK_CPU = {"horizon": 5, "num_samples": 64, "n_steps": 5, "topk": 8}
ENV_CASES = (1, 50)
# on CUDA -> (num_samples values, num_envs values) of the fast-path sweep (not run with --quick)
SWEEPS = {True: ((100, 300, 1000), (1, 10, 50)), False: ((100, 300), (1, 10))}


@torch.no_grad()
def _models(device: torch.device):
    config = LeWMConfig.preset("paper" if device.type == "cuda" else "tiny")
    torch.manual_seed(0)
    fast = config.build()
    # AdaLN-Zero starts every block at the identity; give the modulation real weights so
    # the timed work is the work of a trained model.
    for name, p in fast.named_parameters():
        if "adaLN_modulation" in name:
            p.normal_(0.0, 0.02)
    reference = config.build(reference=True)
    reference.load_state_dict(fast.state_dict())
    return fast.to(device).eval(), reference.to(device).eval(), config


def _info(envs: int, size: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(envs)
    return {
        "pixels": torch.randn(envs, 1, 3, size, size, generator=gen).to(device),
        "goal": torch.randn(envs, 1, 3, size, size, generator=gen).to(device),
    }


def _metrics(envs: int, samples: int, steps: int, ms: float) -> dict[str, float]:
    seconds = ms / 1e3
    return {"plans/s": envs / seconds, "Mrollouts/s": envs * samples * steps / seconds / 1e6}


def run(report: Report, quick: bool) -> None:
    device = report.device
    fast_model, ref_model, config = _models(device)
    size = config.encoder.image_size
    width = fast_model.action_width
    cuda = device.type == "cuda"
    plan = PUBLISHED if cuda or not quick else QUICK_CPU
    precisions = [("fast-fp32", None)] + ([("fast-bf16", torch.bfloat16)] if cuda else [])
    unfused = _unfused(fast_model) if cuda else None
    reps = {"warmup": 1, "reps": 3} if quick else {"warmup": 3, "reps": 20}
    ref_reps = {"warmup": 1, "reps": 2} if quick else {"warmup": 1, "reps": 5}

    for envs in ENV_CASES:
        case = f"{envs} env{'s' if envs > 1 else ''}, S={plan['num_samples']}, {plan['n_steps']} it"
        info = _info(envs, size, device)

        # The published path: per env, float32, get_cost (re-encoding) at every iteration.
        if envs == 1 or not quick:
            gen = torch.Generator(device=device).manual_seed(0)

            def reference(info=info, gen=gen):
                return ref_cem.cem_plan(
                    ref_model.get_cost, info, action_dim=width, generator=gen, device=device, **plan
                )

            # 50 published plans take minutes on any device: one timed run after the 1-env warm-up.
            timing = time_fn(reference, device, **(ref_reps if envs == 1 else {"warmup": 0, "reps": 1}))
            report.add(
                BENCH,
                case,
                "reference",
                "plan",
                timing,
                peak_extra_memory(reference, device) if envs == 1 else None,
                **_metrics(envs, plan["num_samples"], plan["n_steps"], timing.median_ms),
            )

        variants = [(name, autocast, fast_model) for name, autocast in precisions]
        if unfused is not None:  # the block steps as separate kernels: what the fused one replaced
            variants.append(("fast-bf16-unfused", torch.bfloat16, unfused))
        for name, autocast, model in variants:
            solver = CEMSolver(model, action_dim=width, autocast=autocast, device=device, **plan)

            def fast(info=info, solver=solver):
                return solver.solve(info)

            timing = time_fn(fast, device, **reps)
            report.add(
                BENCH,
                case,
                name + ("-graph" if solver.cuda_graph else ""),
                "plan",
                timing,
                peak_extra_memory(fast, device),
                **_metrics(envs, plan["num_samples"], plan["n_steps"], timing.median_ms),
            )

    if not quick:
        _sweep(report, fast_model, width, size, plan, precisions[-1], reps)


def _unfused(model):
    """A copy of ``model`` whose predictor blocks step without the fused block kernel
    (``ConditionalBlock.step_kernel = False``)."""
    import copy

    twin = copy.deepcopy(model)
    for block in twin.predictor.transformer.layers:
        block.step_kernel = False
    return twin


def _sweep(report: Report, fast_model, width: int, size: int, plan: dict, precision, reps: dict) -> None:
    """How the fast plan's cost grows with candidates and envs."""
    device = report.device
    samples_sweep, envs_sweep = SWEEPS[device.type == "cuda"]
    name, autocast = precision
    for samples in samples_sweep:
        for envs in envs_sweep:
            settings = {**plan, "num_samples": samples, "topk": min(plan["topk"], samples)}
            solver = CEMSolver(fast_model, action_dim=width, autocast=autocast, device=device, **settings)
            info = _info(envs, size, device)

            def fast(info=info, solver=solver):
                return solver.solve(info)

            timing = time_fn(fast, device, **reps)
            report.add(
                BENCH,
                f"sweep: {envs} envs x S={samples}",
                name + ("-graph" if solver.cuda_graph else ""),
                "plan",
                timing,
                None,
                **_metrics(envs, samples, plan["n_steps"], timing.median_ms),
            )
