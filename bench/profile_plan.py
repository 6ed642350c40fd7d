"""Where a plan's time goes: kernel counts and the top kernels of one ``CEMSolver.solve``.

``python -m lewm_fast.bench.profile_plan [--device cuda] [--envs 1 50] [--precision fp32 bf16]
[--out FILE.md]``

For each case: the wall time of one eager solve and of one CUDA-graph replay (the
benchmark's setting), the number of device kernels one eager solve launches and their
summed device time, then the kernels (or, on CPU, operators) that take the most time.
When the graph replay takes about as long as the summed kernel time the plan is
compute/memory bound; when the eager wall time is far above both, launches dominate and
the graph is what saves it. Paper-size model with random weights on CUDA, the small CPU
model of ``bench_plan`` otherwise; published CEM settings unless ``--steps`` says less.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lewm_fast import _checks
from lewm_fast.plan import CEMSolver

from .bench_plan import PUBLISHED, _info, _models
from .harness import device_time_us, synchronize

__all__ = ["profile_solve", "main"]


def _wall_ms(fn, device: torch.device, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def profile_solve(
    device: torch.device, envs: int, autocast: torch.dtype | None, n_steps: int, top: int = 15
) -> str:
    """Markdown for one case: wall times, kernel count and the top kernels/operators."""
    fast_model, _, config = _models(device)
    width = fast_model.action_width
    plan = {**PUBLISHED, "n_steps": n_steps}
    info = _info(envs, config.encoder.image_size, device)
    cuda = device.type == "cuda"
    eager = CEMSolver(fast_model, action_dim=width, autocast=autocast, cuda_graph=False, **plan)
    eager.solve(info)  # warm-up: csrc build, cuBLAS handles, Triton compiles
    eager_ms = _wall_ms(lambda: eager.solve(info), device)
    graph_ms = None
    if cuda:
        graph = CEMSolver(fast_model, action_dim=width, autocast=autocast, **plan)
        graph.solve(info)  # capture
        graph_ms = _wall_ms(lambda: graph.solve(info), device, reps=5)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        eager.solve(info)
        synchronize(device)
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        count = len(kernels)
        busy_ms = sum(device_time_us(e) for e in kernels) / 1e3
        rows = sorted(
            (
                (device_time_us(e), e)
                for e in prof.key_averages()
                if e.device_type == torch.autograd.DeviceType.CUDA
            ),
            key=lambda pair: pair[0],
            reverse=True,
        )[:top]
        unit = "kernel"
    else:
        ops = [e for e in prof.key_averages()]
        count = sum(e.count for e in ops)
        busy_ms = sum(e.self_cpu_time_total for e in ops) / 1e3
        rows = sorted(((e.self_cpu_time_total, e) for e in ops), key=lambda pair: pair[0], reverse=True)[:top]
        unit = "operator"

    precision = "fp32" if autocast is None else str(autocast).removeprefix("torch.")
    lines = [
        f"### {envs} env{'s' if envs > 1 else ''}, {precision}, S={plan['num_samples']}, "
        f"{n_steps} iterations ({torch.cuda.get_device_name(device) if cuda else 'CPU'})",
        "",
        f"- eager solve: {eager_ms:.2f} ms wall; "
        + (f"CUDA-graph replay: {graph_ms:.2f} ms wall" if graph_ms is not None else "no CUDA graph on CPU"),
        f"- one eager solve: {count} {unit} calls ({count / n_steps:.0f} per iteration), "
        f"{busy_ms:.2f} ms of {'device' if cuda else 'self CPU'} time",
        "",
        f"| {unit} | calls | total ms | mean us | share |",
        "| --- | --- | --- | --- | --- |",
    ]
    for total_us, e in rows:
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        share = total_us / 1e3 / busy_ms if busy_ms else 0.0
        mean_us = total_us / max(e.count, 1)
        lines.append(f"| `{name}` | {e.count} | {total_us / 1e3:.3f} | {mean_us:.1f} | {share:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lewm_fast.bench.profile_plan", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 50], help="env counts (default: 1 50)")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16"),
        default=None,
        help="default: fp32 bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument(
        "--steps", type=int, default=PUBLISHED["n_steps"], help="CEM iterations (default: 30)"
    )
    parser.add_argument("--top", type=int, default=15, help="rows per case (default: 15)")
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    args = parser.parse_args(argv)
    try:
        device = _checks.resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--device: {exc}")
    if args.steps < 1 or args.top < 1 or min(args.envs) < 1:
        parser.error("--steps, --top and --envs must be positive")
    precisions = args.precision or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    parts = ["## Plan profile\n"]
    for envs in args.envs:
        for precision in precisions:
            text = profile_solve(device, envs, dtypes[precision], args.steps, args.top)
            print(text, flush=True)
            parts.append(text)
    if args.out:
        from lewm_fast._io import write_text_atomic

        write_text_atomic(args.out, "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
