"""LeWM's evaluation through stable-worldmodel's ``World``: the published solver vs lewm_fast's.

Both run :func:`lewm_fast.plan.evaluate_world` (``World.evaluate`` in the dataset-driven mode
of LeWM's ``eval.py``: the same start rows, ``WorldModelPolicy``, scalers, transforms and
Two-Room environments) and differ only in the solver. Reference: the published
``stable_worldmodel.solver.CEMSolver`` with its default ``batch_size=1`` (the published
``LeWM.get_cost`` takes one env per call) on the reference JEPA, whose ``get_cost`` does the
published work. Fast: ``lewm_fast.plan.CEMSolver`` on the lewm_fast JEPA with the same
weights, all envs of a replanning step in one solve (on CUDA one graph, padded to the world's
env count). The environments, rendering and image transforms are the same in both rows and
run on the CPU, so the ratio is the whole evaluation's, planning and the rest.

Settings: on CUDA the paper-size model (random weights) and the published protocol, 50
episodes, 300 samples, 30 iterations; on CPU the small model and 10 episodes with 64 samples
and 5 iterations (``--quick``: 4 episodes, 32 samples, 3 iterations). Needs ``lewm-fast[swm]``;
without stable-worldmodel the benchmark says so and adds no rows.
"""

from __future__ import annotations

import tempfile
import time

from lewm_fast.data import export_hdf5, generate_dataset
from lewm_fast.plan import CEMSolver, evaluate_world

from .bench_plan import _models
from .harness import Report, Timing

BENCH = "swm"

PUBLISHED = {"episodes": 50, "num_samples": 300, "n_steps": 30, "topk": 30}
CPU = {"episodes": 10, "num_samples": 64, "n_steps": 5, "topk": 8}
QUICK_CPU = {"episodes": 4, "num_samples": 32, "n_steps": 3, "topk": 4}
DATASET_EPISODES = 60  # about 4,000 eligible start rows; the draw needs 50


def run(report: Report, quick: bool) -> None:
    try:
        import stable_worldmodel as swm
    except Exception as exc:  # not installed, or torchvision unusable beside this torch
        print(f"[bench] swm: no stable-worldmodel ({type(exc).__name__}: {exc}); no rows", flush=True)
        return
    device = report.device
    fast_model, ref_model, config = _models(device)
    settings = PUBLISHED if device.type == "cuda" else QUICK_CPU if quick else CPU
    episodes = settings["episodes"]
    plan = {k: settings[k] for k in ("num_samples", "n_steps", "topk")}
    case = f"World.evaluate, {episodes} episodes x 50 steps, S={plan['num_samples']}, {plan['n_steps']} it"
    protocol = {"episodes": episodes, "image_size": config.encoder.image_size}

    with tempfile.TemporaryDirectory(prefix="lewm-fast-bench-swm-") as tmp:
        data = generate_dataset(
            f"{tmp}/two_room", episodes=DATASET_EPISODES, seed=0, device=device, progress=False
        )
        path = export_hdf5(data, f"{tmp}/two_room.h5", device=device, compression=None)
        solvers = {
            "reference": swm.solver.CEMSolver(ref_model, device=device, seed=42, **plan),
            "fast": CEMSolver(fast_model, device=device, seed=42, **plan),
        }
        for impl, solver in solvers.items():
            began = time.perf_counter()
            result = evaluate_world(solver, path, **protocol)
            ms = (time.perf_counter() - began) * 1e3
            if impl == "fast" and solver.cuda_graph:
                impl = "fast-graph"
            metrics = {"success %": result["success_rate"], "episodes/s": episodes / (ms / 1e3)}
            report.add(BENCH, case, impl, "eval", Timing(ms, ms, ms, 1, wall_ms=ms), None, **metrics)
