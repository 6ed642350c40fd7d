"""The ``lewm-fast`` command line.

lewm-fast demo   build the paper-size model, run one training forward pass, print its size
lewm-fast info   versions, device and which backends are usable here
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"lewm-fast: device {name!r} requested but CUDA is not available")
    return device


def demo(args: argparse.Namespace) -> int:
    """Build ``LeWMConfig.preset("paper")`` and run one loss forward on random frames."""
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


def info(args: argparse.Namespace) -> int:
    """Print versions, the device and backend availability."""
    from . import __version__

    print(f"lewm_fast {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        triton_status = f"triton {triton.__version__}"
    except ImportError as exc:
        triton_status = f"triton unavailable ({exc})"
    print(triton_status)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(
                f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}"
            )
    else:
        print("no CUDA device")
    from . import backend

    probe = torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")
    print(f"${backend.ENV_VAR}={os.environ.get(backend.ENV_VAR, '') or '(unset)'}")
    for op in ("sigreg", "ConditionalBlock"):
        try:
            chosen = backend.resolve("auto", probe, op)
        except (ValueError, backend.BackendUnavailableError) as exc:
            chosen = f"error: {exc}"
        why = backend.triton_unavailable_reason(probe) if chosen == "torch" else None
        print(f"{op}: backend 'auto' -> {chosen}" + (f" ({why})" if why else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lewm-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="build the paper-size model and run a forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--batch", type=int, default=2, help="windows in the random batch (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    p = sub.add_parser("info", help="versions, device and backend availability")
    p.set_defaults(func=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch", 1) < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
