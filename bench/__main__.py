"""Run the benchmarks: ``python -m bench`` (from the repository) or ``lewm-fast bench``.

Every ``bench_<name>.py`` module in this package is run in one process on one device,
after measuring the device's peak matmul rate and copy bandwidth; results go to
``<out>/<device>-<date>.json`` and ``.md``, with a projection of the paper-recipe
pipeline's wall-clock from the rows measured (see ``projection.py``).
``--update-readme`` runs nothing and regenerates README.md's results section and its
performance-model projections from the committed results and ``bench/model/model.json``
instead (see ``readme.py``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from pathlib import Path

from lewm_fast import _checks

from .harness import Report, measure_peaks
from .projection import project


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    names = available()
    # the module docstring's first paragraph, without its reST literal markup
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"subset of {names}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="headline cases only, fewer repetitions: no sweeps (plan: 1 env and 50 envs; "
        "sigreg: the training size; train: batch 128 without the torch.compile variants); "
        "smaller settings on a CPU",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the JSON and markdown results (default: bench/results; with --model: bench/model)",
    )
    parser.add_argument("--stem", default=None, help="file name stem (default: <device>-<date>)")
    parser.add_argument(
        "--no-peaks", action="store_true", help="skip measuring the matmul and copy peaks at the start"
    )
    model = parser.add_argument_group("performance model (CPU, no GPU needed; runs no benchmark)")
    model.add_argument(
        "--model",
        action="store_true",
        help="count the CUDA fast path's kernels, FLOPs and bytes on fake tensors and project times on "
        "H200 / RTX 4090 / RTX 3060 Ti; writes OUT/model.json and OUT/model.md (bench/perf_model.py)",
    )
    readme = parser.add_argument_group("README results section (runs no benchmark)")
    readme.add_argument(
        "--update-readme",
        action="store_true",
        help="regenerate README.md's results section from the newest committed result of each device",
    )
    readme.add_argument("--readme", default="README.md", help="the README to rewrite (default: README.md)")
    readme.add_argument(
        "--results", default=None, help="folder of result JSON files (default: the --out folder)"
    )
    readme.add_argument(
        "--model-json",
        default="bench/model/model.json",
        help="the performance model's output for the projections table (default: bench/model/model.json)",
    )
    readme.add_argument(
        "--include-uncommitted", action="store_true", help="also use result files git does not track"
    )
    return parser


def _update_readme(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .readme import update_readme

    readme = Path(args.readme)
    if not readme.is_file():
        parser.error(f"--readme {readme} does not exist")
    results = Path(args.results or args.out)
    try:
        changed = update_readme(
            readme, results, tracked_only=not args.include_uncommitted, model_json=args.model_json
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(f"[bench] {readme} {'updated' if changed else 'already up to date'} from {results}")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.model:
        from .perf_model import run_model, write

        json_path, md_path = write(run_model("paper"), args.out or "bench/model")
        print(md_path.read_text())
        print(f"[bench] wrote {json_path} and {md_path} (projections, not measurements)")
        return 0
    args.out = args.out or "bench/results"
    if args.update_readme:
        return _update_readme(parser, args)

    name = args.device or "auto"
    try:
        device = _checks.resolve_device(name)
    except RuntimeError as exc:
        parser.error(f"--device {name!r} is not a device: {exc}")
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    report = Report(device)
    if not args.no_peaks:
        print(f"[bench] measuring peak matmul and copy rates on {report.env['device_name']}", flush=True)
        report.env["peak"] = measure_peaks(device, quick=args.quick)
    package = __package__ or "bench"
    failed: dict[str, str] = {}
    for bench in args.only or available():
        print(f"[bench] {bench} on {report.env['device_name']}", flush=True)
        try:
            module = importlib.import_module(f"{package}.bench_{bench}")
            module.run(report, quick=args.quick)
        except Exception as exc:  # keep the other benchmarks' rows; report this one as failed
            traceback.print_exc()
            failed[bench] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            report.env["failed"] = dict(failed)
            print(f"[bench] {bench} FAILED: {failed[bench]}", flush=True)
        # Saved after every benchmark, so a run stopped by a time limit keeps what it measured.
        report.projection = project(report.rows)
        json_path, md_path = report.save(args.out, args.stem)
    print(report.markdown())
    print(f"[bench] wrote {json_path} and {md_path}")
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
