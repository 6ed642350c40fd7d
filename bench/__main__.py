"""Run the benchmarks: ``python -m bench`` (from the repository) or ``lewm-fast bench``.

Every ``bench_<name>.py`` module in this package is run in one process on one device;
results go to ``<out>/<device>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

from .harness import Report


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", choices=names, help=f"subset of {names}")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and markdown results")
    parser.add_argument("--stem", default=None, help="file name stem (default: <device>-<date>)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    report = Report(device)
    package = __package__ or "bench"
    for name in args.only or names:
        print(f"[bench] {name} on {report.env['device_name']}", flush=True)
        module = importlib.import_module(f"{package}.bench_{name}")
        module.run(report, quick=args.quick)
    json_path, md_path = report.save(args.out, args.stem)
    print(report.markdown())
    print(f"[bench] wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
