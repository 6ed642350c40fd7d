"""The lewm-fast command line: LeWM data, training, probes, planning evaluation and benchmarks.

lewm-fast demo           build the paper-size model, run one training forward pass, print its size
lewm-fast info           versions, device and which backends are usable here
lewm-fast generate-data  roll out Two-Room episodes into a dataset folder
lewm-fast render-frame   write a Two-Room frame (a position, or a dataset row) as a PNG
lewm-fast import-hdf5    convert a published-layout HDF5 file into a dataset folder
lewm-fast export-hdf5    write a dataset folder as an HDF5 file in the published layout
lewm-fast eval           the published Two-Room MPC evaluation of a checkpoint on a dataset
lewm-fast probe          linear probe, 1-step MSE on fresh rollouts, SIGReg of a checkpoint
lewm-fast bench          run the benchmarks on this device (same as python -m bench)
lewm-fast train          train LeWM on a dataset folder (memory plan from a VRAM budget, resumable)
lewm-fast pipeline       data -> train -> probe -> eval -> report in one run folder
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import _checks


def _device(name: str) -> torch.device:
    try:
        return _checks.resolve_device(name)
    except ValueError as exc:
        raise SystemExit(f"lewm-fast: {exc}") from None


def demo(args: argparse.Namespace) -> int:
    """Build the paper-size LeWM (LeWMConfig.preset("paper")), print its parameter counts and
    run one loss forward pass on a random batch."""
    from . import LeWMConfig, SIGReg
    from .reference import jepa_loss

    device = _device(args.device)
    torch.manual_seed(args.seed)
    config = LeWMConfig.preset("paper")
    model = config.build().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    parts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("encoder", "predictor", "action_encoder", "projector", "pred_proj")
    }
    print(f"LeWM (paper preset) on {device}: {n_params:,} parameters")
    for name, count in parts.items():
        print(f"  {name:<15} {count:>12,}")

    size = config.encoder.image_size
    frames = config.predictor.num_frames + 1
    batch = {
        "pixels": torch.randn(args.batch, frames, 3, size, size, device=device),
        "action": torch.randn(args.batch, frames, config.action_encoder.input_dim, device=device),
    }
    sigreg = SIGReg().to(device)
    start = time.perf_counter()
    with torch.no_grad():
        losses = jepa_loss(model, sigreg, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    print(
        f"forward pass on a random batch of {args.batch} windows x {frames} frames "
        f"({size}x{size}) in {seconds * 1e3:.0f} ms:"
    )
    for key in ("pred_loss", "sigreg_loss", "loss"):
        print(f"  {key:<12} {losses[key].item():.4f}")
    return 0


def _device_line(env: dict) -> str:
    """One line of ``lewm-fast info`` for an environment record (:func:`lewm_fast.sysinfo.environment`)."""
    if env["device_type"] != "cuda":
        return f"{env['device_name']}, {env['cpu_count']} cores, {env['threads']} torch threads"
    parts = [env["device_name"], env["capability"], f"CUDA {env['cuda']}"]
    if "nvml" in env:
        parts.append(f"NVML {env['nvml']}")
    else:
        parts += [
            f"{env['memory_total_bytes'] / 2**30:.1f} GiB",
            f"driver {env['driver']}",
            f"max clocks SM {env['sm_clock_max_mhz']} / memory {env['mem_clock_max_mhz']} MHz",
        ]
    return ", ".join(parts)


def info(args: argparse.Namespace) -> int:
    """Print versions, the commit, the devices and which kernel backends are usable here."""
    from . import __version__, backend
    from .sysinfo import environment

    cuda = torch.cuda.is_available()
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else ["cpu"]
    records = {device: environment(device) for device in devices}
    env = records[devices[0]]
    versions = f"python {env['python']}, torch {env['torch']}"
    print(f"lewm_fast {__version__} (commit {env['git_commit']}), {versions}")
    print(f"triton {env['triton']}" if env["triton"] else "triton not installed")
    for device, record in records.items():
        print(f"{device}: {_device_line(record)}")
    if not cuda:
        print("no CUDA device")
    probe = torch.empty(0, device=_checks.resolve_device("auto"))
    print(f"${backend.ENV_VAR}={os.environ.get(backend.ENV_VAR, '') or '(unset)'}")
    for op in ("sigreg", "ConditionalBlock"):
        try:
            chosen = backend.resolve("auto", probe, op)
        except (ValueError, backend.BackendUnavailableError) as exc:
            chosen = f"error: {exc}"
        why = backend.triton_unavailable_reason(probe) if chosen == "torch" else None
        print(f"{op}: backend 'auto' -> {chosen}" + (f" ({why})" if why else ""))
    return 0


def generate_data(args: argparse.Namespace) -> int:
    """Roll out Two-Room episodes with a data policy into a dataset folder."""
    from .data import generate_dataset

    try:
        dataset = generate_dataset(
            args.out,
            episodes=args.episodes,
            policy=args.policy,
            seed=args.seed,
            max_steps=args.max_steps,
            frames=args.frames,
            device=_device(args.device),
            batch_episodes=args.batch_episodes,
            force=args.force,
        )
    except (FileExistsError, ValueError) as exc:
        raise SystemExit(f"lewm-fast generate-data: {exc}") from None
    lengths = dataset.ep_len
    last = dataset.ep_offset + lengths - 1
    gap = dataset.proprio[last] - dataset.goal[last]
    success = int((np.hypot(gap[:, 0], gap[:, 1]) < dataset.layout.success_distance).sum())
    print(
        f"wrote {dataset.path}: {dataset.num_episodes} episodes, {dataset.num_rows} rows "
        f"(mean {lengths.mean():.1f} per episode), {success} reached the goal; "
        + ("frames stored" if dataset.has_frames else "frames rendered from state on demand")
    )
    return 0


def render_frame(args: argparse.Namespace) -> int:
    """Render one Two-Room frame and save it as a PNG."""
    from .envs import render, save_png

    if (args.xy is None) == (args.dataset is None):
        raise SystemExit("lewm-fast render-frame: give either --xy X Y or --dataset DIR [--row R]")
    try:
        if args.dataset is not None:
            from .data import TwoRoomDataset

            dataset = TwoRoomDataset.open(args.dataset)
            if not 0 <= args.row < dataset.num_rows:
                raise ValueError(f"--row must be in [0, {dataset.num_rows}), got {args.row}")
            xy = torch.from_numpy(dataset.proprio[args.row : args.row + 1].copy())
            layout = dataset.layout
        else:
            from .envs import DEFAULT_LAYOUT

            xy, layout = torch.tensor([args.xy], dtype=torch.float32), DEFAULT_LAYOUT
        frame = render(xy, layout)[0]
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"lewm-fast render-frame: {exc}") from None
    save_png(frame, args.out)
    x, y = xy[0].tolist()
    print(f"wrote {args.out}: agent at ({x:.2f}, {y:.2f}), {frame.shape[1]}x{frame.shape[0]} RGB")
    return 0


def import_hdf5(args: argparse.Namespace) -> int:
    """Convert a published-layout HDF5 file into a dataset folder; print what its checks found."""
    from .data import import_hdf5 as run

    try:
        dataset = run(
            args.h5,
            args.out,
            pixels="keep" if args.keep_pixels else "drop",
            on_bad_dynamics="record" if args.allow_bad_dynamics else "raise",
            force=args.force,
            progress=True,
        )
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as exc:
        raise SystemExit(f"lewm-fast import-hdf5: {exc}") from None
    print(f"wrote {dataset!r}")
    dyn = dataset.source["dynamics"]
    first = "" if dyn["first_row"] is None else f", the first at row {dyn['first_row']}"
    largest = "" if dyn["max_error_px"] is None else f"; largest error {dyn['max_error_px']:.3g} px"
    print(
        f"dynamics: {dyn['mismatched']} of {dyn['transitions']} transitions ({100 * dyn['fraction']:.2f}%) "
        f"miss step() by more than {dyn['tolerance_px']:g} px{first}{largest} "
        f"(layout: {dataset.source['layout_from']})"
    )
    verify = dataset.source.get("verify")
    if verify is not None:
        print(
            f"pixels: {verify['frames']} sampled frames against the render: "
            f"{100 * verify['mismatched_pixel_fraction']:.3f}% of pixels differ, "
            f"by at most {verify['max_abs_diff']} grey level(s)"
        )
    return 0


def export_hdf5(args: argparse.Namespace) -> int:
    """Write a dataset folder as a published-layout HDF5 file."""
    from .data import TwoRoomDataset
    from .data import export_hdf5 as run

    try:
        path = run(
            TwoRoomDataset.open(args.dataset),
            args.out,
            pixels=not args.no_pixels,
            device=_device(args.device),
            force=args.force,
            progress=True,
        )
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as exc:
        raise SystemExit(f"lewm-fast export-hdf5: {exc}") from None
    print(f"wrote {path}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Run the published Two-Room MPC evaluation of a checkpoint on a dataset: start and goal
    states drawn from the dataset, CEM planning in embedding space, the environment stepped
    until success or the budget. Prints the success rate with its 95% Wilson interval and
    the plan latency (--seeds N: also every planner seed's success, their mean and spread);
    --out saves the full result as JSON. Every planner setting below defaults to the
    published value."""
    from . import load_pretrained
    from .plan import evaluate as run
    from .plan.config import from_arguments
    from .plan.evaluation import seed_runs_text
    from .stats import success_text

    device = _device(args.device)
    try:
        config = from_arguments(args)
        model = load_pretrained(args.checkpoint, device=device).eval()
        result = run(
            model,
            args.dataset,
            config,
            device=device,
            progress=not args.no_progress,
            out=args.out,
            episodes_out=args.episodes_out,
        )
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise SystemExit(f"lewm-fast eval: {exc}") from None
    latency = result["plan_latency_ms"]
    print(
        f"success {success_text(result['successes'], result['episodes'])}, "
        f"mean final distance {result['final_distance_mean']:.1f} px; "
        f"{result['plans']} plans of {result['episodes']} envs, plan latency median "
        f"{latency['median']:.1f} ms (p90 {latency['p90']:.1f} ms); {result['elapsed_s']:.1f} s on "
        f"{result['device']}"
    )
    if result["seed_runs"]["seeds"] > 1:
        print(f"success {seed_runs_text(result['seed_runs'])}")
    for path in (args.out, args.episodes_out):
        if path:
            print(f"wrote {path}")
    return 0


def probe(args: argparse.Namespace) -> int:
    """Probe a checkpoint on a dataset: linear probe R^2 of the agent position, 1-step
    predictor MSE on fresh rollouts and SIGReg of held-out embeddings; written as JSON."""
    from . import load_pretrained
    from ._io import write_json_atomic
    from .data import TwoRoomDataset
    from .probe import run_probes

    device = _device(args.device)
    try:
        model = load_pretrained(args.checkpoint, device=device)
        dataset = TwoRoomDataset.open(args.dataset)
        result = run_probes(
            model,
            dataset,
            device=device,
            seed=args.seed,
            max_frames=args.max_frames,
            fresh_episodes=args.fresh_episodes,
            rollout_seed=args.rollout_seed,
            batch_size=args.batch_size,
            autocast=torch.bfloat16 if args.bf16 else None,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"lewm-fast probe: {exc}") from None
    result["checkpoint"] = str(args.checkpoint)
    result["dataset"] = str(args.dataset)
    write_json_atomic(args.out, result)
    r2 = result["probe_r2"]
    print(
        f"linear probe R^2: x {r2['x']:.3f}, y {r2['y']:.3f} (alpha {result['linear_probe']['alpha']:g}, "
        f"{result['linear_probe']['test_episodes']} held-out episodes)"
    )
    print(
        f"1-step predictor MSE on {result['fresh_rollouts']['windows']} fresh windows: "
        f"{result['one_step_mse']:.4f}"
    )
    print(
        f"SIGReg of held-out embeddings (B={result['sigreg']['batch_size']}): {result['sigreg_heldout']:.3f}"
    )
    print(f"wrote {args.out} in {result['seconds']['total']:.1f} s on {result['device']}")
    return 0


def bench(argv: list[str]) -> int:
    """lewm-fast bench ...: the benchmark runner of python -m bench (same options)."""
    from .bench.__main__ import main as bench_main

    return bench_main(argv, prog="lewm-fast bench")


def _set_values(pairs: list[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes key=value pairs, got {pair!r}")
        values[key.strip()] = value
    return values


def train(args: argparse.Namespace) -> int:
    """Train LeWM on a dataset folder with the published recipe (TrainConfig), in a memory
    plan that fits the VRAM budget; run under torchrun for several GPUs. Ctrl-C (SIGINT or
    SIGTERM) saves a checkpoint that --resume continues."""
    from .train import NonFiniteLossError, TrainConfig, Trainer

    try:
        config = TrainConfig.preset(args.preset)
        values = _set_values(args.set or [])
        for key in ("epochs", "batch_size", "memory_plan", "chunk_size", "max_steps", "log_every"):
            if getattr(args, key) is not None:
                values[key] = getattr(args, key)
        if args.vram_budget is not None:
            values["vram_budget"] = None if args.vram_budget == "auto" else args.vram_budget
        if args.no_progress:
            values["progress"] = False
        config = config.override(values)
        trainer = Trainer(args.dataset, args.out, config, device=_device(args.device), resume=args.resume)
        result = trainer.fit()
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise SystemExit(f"lewm-fast train: {exc}") from None
    except NonFiniteLossError as exc:
        print(f"lewm-fast train: {exc}", file=sys.stderr)
        return 3
    if trainer.ctx.is_main:
        print(
            f"lewm-fast train: {result.status} at step {result.step} (epoch {result.epoch}); "
            f"checkpoint {result.checkpoint}; metrics {result.out_dir / 'metrics.jsonl'}"
        )
    return 128 + result.signal if result.status == "interrupted" else 0


def pipeline(args: argparse.Namespace) -> int:
    """Run the Two-Room pipeline (data -> train -> probe -> eval -> report) in the run folder
    --out and print the headline metrics. Finished stages are reused and an interrupted
    training resumes. Presets: paper, cpu (the default without a GPU: learns Two-Room in
    about 4-5 minutes on 2 idle CPU cores), smoke (a plumbing check, about 3 minutes there), gpu-short
    (the default with CUDA: about 12 minutes of training on an H200, about an hour on an
    8 GB card, projected)."""
    from .pipeline import PipelineError, RunConfig, default_preset, run_pipeline
    from .plan.evaluation import seed_runs_text
    from .stats import success_text

    try:
        if args.config:
            config = RunConfig.from_file(args.config)
            if args.preset:
                config = config.override({"preset": args.preset})
        else:
            config = RunConfig.preset_config(args.preset or default_preset())
        values = _set_values(args.set or [])
        if args.device:
            values["device"] = args.device
        config = config.override(values)
        report = run_pipeline(config, args.out, progress=not args.no_progress)
    except PipelineError as exc:
        raise SystemExit(
            f"lewm-fast pipeline: {exc} (outputs of earlier stages are kept in {args.out})"
        ) from None
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise SystemExit(f"lewm-fast pipeline: {exc}") from None

    def fmt(value, scale=1.0, unit=""):
        return "not measured" if value is None else f"{value * scale:.3g}{unit}"

    def ms(value):
        if value is None:
            return "not measured"
        return f"{value / 1e3:.3g} s" if value >= 1e3 else f"{value:.3g} ms"

    r2, detail = report.get("probe_r2") or {}, report.get("success_detail")
    success = (
        success_text(detail["successes"], detail["episodes"])
        if detail
        else fmt(report.get("success_rate"), 100, "%")
    )
    print(
        f"lewm-fast pipeline ({config.preset}): success {success}, "
        f"final distance {fmt(report.get('final_distance_mean'), unit=' px')}, "
        f"plan {ms(report.get('plan_ms_per_env'))} per episode ({ms(report.get('plan_ms_median'))} "
        f"per batched plan), probe R^2 x {fmt(r2.get('x'))} "
        f"y {fmt(r2.get('y'))}, 1-step MSE {fmt(report.get('one_step_mse'))}; "
        f"report {Path(args.out) / 'report.md'}"
    )
    runs = detail and detail["seed_runs"]
    if runs and runs["seeds"] > 1:
        print(f"lewm-fast pipeline: success {seed_runs_text(runs)}")
    return 0


# ------------------------------------------------------------------------------ the parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except a None or False one (whose help says what it means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if hidden or "%(default)" in text or "(default" in text:
            return action.help
        return super()._get_help_string(action)


def _shared(*flags: str) -> list[argparse.ArgumentParser]:
    """Parent parsers for the flags several subcommands share: device, force, progress, set."""
    parents = []
    for flag in flags:
        p = argparse.ArgumentParser(add_help=False)
        if flag == "device":
            p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
        elif flag == "force":
            p.add_argument("--force", action="store_true", help="replace an existing output")
        elif flag == "progress":
            p.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")
        elif flag in ("set", "set-pipeline"):
            example = (
                "train.epochs=2 --set model.predictor.depth=4 --set eval.num_samples=64"
                if flag == "set-pipeline"
                else "lr=1e-4 --set model.predictor.depth=4"
            )
            p.add_argument(
                "--set",
                action="append",
                metavar="KEY=VALUE",
                help=f"override a config field, repeatable: --set {example}",
            )
        parents.append(p)
    return parents


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=2, help="windows in the random batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch")


def _generate_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="dataset folder to create")
    p.add_argument("--episodes", type=int, default=10_000, help="episodes to roll out")
    p.add_argument("--policy", choices=("expert", "random"), default="expert", help="data policy")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--max-steps", type=int, default=100, help="actions per episode at most")
    p.add_argument(
        "--frames", action="store_true", help="also store uint8 frames (default: render on demand)"
    )
    p.add_argument("--batch-episodes", type=int, default=1024, help="episodes rolled out together")


def _render_frame_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--xy", type=float, nargs=2, metavar=("X", "Y"), help="agent position in pixels")
    p.add_argument("--dataset", help="dataset folder to take the position from (give --xy or --dataset)")
    p.add_argument("--row", type=int, default=0, help="dataset row")


def _import_hdf5_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("h5", help="HDF5 file to read")
    p.add_argument("out", help="dataset folder to create")
    p.add_argument("--keep-pixels", action="store_true", help="copy the frames (default: render from state)")
    p.add_argument(
        "--allow-bad-dynamics",
        action="store_true",
        help="import even if over 1%% of transitions disagree with the dynamics (count kept in meta.json)",
    )


def _export_hdf5_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset folder to read")
    p.add_argument("out", help="HDF5 file to write")
    p.add_argument("--no-pixels", action="store_true", help="leave out the pixels column")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    from .plan.config import add_arguments

    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + weights.pt)")
    p.add_argument("--dataset", required=True, help="dataset folder the start/goal pairs come from")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument(
        "--episodes-out",
        help="write every episode's path (positions per env step, the first plan) as .npz here; "
        "lewm_fast.report.write_episode_pictures draws it",
    )
    add_arguments(p)


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + weights.pt)")
    p.add_argument("--dataset", required=True, help="the dataset folder the model was trained on")
    p.add_argument("--out", default="probe.json", help="JSON file to write")
    p.add_argument("--seed", type=int, default=0, help="probe split / SIGReg seed")
    p.add_argument("--rollout-seed", type=int, help="seed of the fresh episodes (default: 1000000 + seed)")
    p.add_argument("--max-frames", type=int, default=20_000, help="dataset frames for the linear probe")
    p.add_argument("--fresh-episodes", type=int, default=256, help="fresh noisy-expert episodes")
    p.add_argument("--batch-size", type=int, default=256, help="frames encoded together")
    p.add_argument("--bf16", action="store_true", help="encode and predict under bf16 autocast")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset folder (lewm-fast generate-data / import-hdf5)")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, model/")
    p.add_argument("--preset", default="default", help="TrainConfig preset: default, paper, tiny")
    p.add_argument("--epochs", type=int, help="epochs (default: 10; the published config says 100)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: 128)")
    p.add_argument(
        "--vram-budget", help="VRAM budget such as 8GiB, or auto: the device's free memory (default)"
    )
    p.add_argument(
        "--memory-plan",
        choices=("auto", "whole", "checkpoint", "two_pass"),
        help="memory plan (default: auto, the first that fits the budget)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        help="windows per encoder chunk of the two_pass plan (default: the preset's)",
    )
    p.add_argument("--max-steps", type=int, help="stop (with a checkpoint) at this global step")
    p.add_argument("--log-every", type=int, help="steps between metric flushes (default: 20)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def _pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=("paper", "cpu", "smoke", "gpu-short"),
        help="run preset (default: gpu-short with a CUDA device, cpu otherwise)",
    )
    p.add_argument("--out", default="runs/lewm", help="run folder")
    p.add_argument("--config", help="a JSON (or YAML) run configuration file")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (default: the preset's)")


def _no_arguments(p: argparse.ArgumentParser) -> None:
    pass


# name, handler, one-line help, its arguments, shared flags; the description is the
# handler's docstring
_COMMANDS = (
    ("demo", demo, "build the paper-size model and run a forward pass", _demo_arguments, ("device",)),
    ("info", info, "versions, device and backend availability", _no_arguments, ()),
    (
        "generate-data",
        generate_data,
        "roll out Two-Room episodes into a dataset folder",
        _generate_data_arguments,
        ("device", "force"),
    ),
    ("render-frame", render_frame, "write a Two-Room frame as a PNG", _render_frame_arguments, ()),
    (
        "import-hdf5",
        import_hdf5,
        "convert a published-layout HDF5 file into a dataset folder",
        _import_hdf5_arguments,
        ("force",),
    ),
    (
        "export-hdf5",
        export_hdf5,
        "write a dataset folder as a published-layout HDF5 file",
        _export_hdf5_arguments,
        ("device", "force"),
    ),
    (
        "eval",
        evaluate,
        "the published Two-Room MPC evaluation of a checkpoint",
        _eval_arguments,
        ("device", "progress"),
    ),
    (
        "probe",
        probe,
        "linear probe, 1-step MSE on fresh rollouts and SIGReg of a checkpoint",
        _probe_arguments,
        ("device",),
    ),
    ("train", train, "train LeWM on a dataset folder", _train_arguments, ("device", "progress", "set")),
    (
        "pipeline",
        pipeline,
        "data -> train -> probe -> eval -> report in one run folder",
        _pipeline_arguments,
        ("progress", "set-pipeline"),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``lewm-fast`` argument parser: one subcommand per entry of ``_COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="lewm-fast", description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, handler, help, arguments, shared in _COMMANDS:
        p = sub.add_parser(
            name,
            help=help,
            description=" ".join(handler.__doc__.split()),
            parents=_shared(*shared),
            formatter_class=_HelpFormatter,
        )
        arguments(p)
        p.set_defaults(func=handler)
        if name == "probe":  # bench sits between probe and train in the listing
            sub.add_parser(
                "bench", help="run the benchmarks on this device (lewm-fast bench --help)", add_help=False
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch", 1) < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
