"""Regenerate the README's results section from committed benchmark results.

``lewm-fast bench --update-readme`` (or ``python -m bench --update-readme``) replaces
the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in README.md with a
table built from the newest ``bench/results/*.json`` of each device -- by default only
files git tracks, so the README quotes committed measurements. Rows with no measurement
say "not yet measured"; nothing is filled in otherwise.

Given the performance model's ``model.json`` (``lewm-fast bench --model``, committed as
``bench/model/model.json``), it also replaces the text between ``<!-- model:begin -->`` and
``<!-- model:end -->`` with the projections table, each projected time next to the measured
one of the same workload on the same device (joined by the NVML device name) or "not yet
measured". The measured table stays measured-only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .projection import BATCH, _hours, project, row_batch

__all__ = [
    "BEGIN",
    "END",
    "MODEL_BEGIN",
    "MODEL_END",
    "HEADLINES",
    "load_results",
    "results_section",
    "model_section",
    "update_readme",
]

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
MODEL_BEGIN = "<!-- model:begin -->"
MODEL_END = "<!-- model:end -->"
NOT_MEASURED = "not yet measured"


@dataclass(frozen=True)
class Headline:
    """A README row: the benchmark rows with this bench, phase and case (or batch) name."""

    label: str
    bench: str
    phase: str
    case: str | None = None
    batch: int | None = None

    def matches(self, row: dict[str, Any]) -> bool:
        if row.get("bench") != self.bench or row.get("phase") != self.phase:
            return False
        if self.case is not None and row.get("case") != self.case:
            return False
        return self.batch is None or row_batch(row) == self.batch


HEADLINES = (
    Headline(
        "SIGReg fwd+bwd (T=4, B=128, D=192, P=1024, K=17)", "sigreg", "fwd+bwd", "T4-B128-D192-P1024-K17"
    ),
    Headline(
        "AdaLN-Zero modulation fwd+bwd, planning size (15,000 x 3 x 192)",
        "adaln_modulate_norm",
        "fwd+bwd",
        "planning-15000x3x192-fp32",
    ),
    Headline(
        "AdaLN-Zero modulation fwd+bwd, training size (128 x 3 x 192)",
        "adaln_modulate_norm",
        "fwd+bwd",
        "training-128x3x192-fp32",
    ),
    Headline("plan latency, 1 env (300 x 30 CEM)", "plan", "plan", "1 env, S=300, 30 it"),
    Headline("plan latency, 50 envs together (300 x 30 CEM)", "plan", "plan", "50 envs, S=300, 30 it"),
    Headline(
        "full 50-episode Two-Room evaluation (300 x 30 CEM)",
        "eval",
        "eval",
        "50 episodes x 50 steps, S=300, 30 it",
    ),
    Headline(f"training step, batch {BATCH}", "train", "step", batch=BATCH),
)


def _tracked(folder: Path) -> set[Path] | None:
    """Files under ``folder`` that git tracks, or None when git cannot tell (no repository)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", "."], capture_output=True, text=True, timeout=10, cwd=folder
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {(folder / name).resolve() for name in out.stdout.split("\0") if name}


def load_results(
    folder: str | os.PathLike, *, tracked_only: bool = True
) -> list[tuple[Path, dict[str, Any]]]:
    """The newest result file of each device in ``folder``: [(path, {"env", "rows", ...})].

    "Newest" is by ``env.date`` (then file name). With ``tracked_only`` only files git
    tracks count (all files when ``folder`` is not in a git repository). Files that are
    not valid result JSON are skipped with a message on stderr. Sorted by device name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.json"))
    if tracked_only:
        tracked = _tracked(folder)
        if tracked is not None:
            files = [f for f in files if f.resolve() in tracked]
    newest: dict[str, tuple[tuple[str, str], Path, dict[str, Any]]] = {}
    for path in files:
        try:
            data = json.loads(path.read_text())
            env, rows = data["env"], data["rows"]
            if not isinstance(env, dict) or not isinstance(rows, list):
                raise TypeError("env must be an object and rows a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"[bench readme] skipping {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        device = str(env.get("device_name", "unknown device"))
        key = (str(env.get("date", "")), path.name)
        if device not in newest or key > newest[device][0]:
            newest[device] = (key, path, data)
    return [(path, data) for _, path, data in (newest[d] for d in sorted(newest))]


def _fastest(rows) -> dict[str, Any] | None:
    return min(rows, key=lambda r: r["median_ms"], default=None)


def _ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def _cell(row: dict[str, Any] | None, name_impl: bool) -> str:
    if row is None:
        return NOT_MEASURED
    text = _ms(row["median_ms"])
    notes = [row["impl"]] if name_impl else []
    if row.get("peak_extra_bytes") is not None:
        notes.append(f"{row['peak_extra_bytes'] / 2**20:.3g} MiB extra")
    if row.get("kernels") is not None:
        notes.append(f"{row['kernels']:,.0f} kernels")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def results_section(results: list[tuple[Path, dict[str, Any]]], base: Path | None = None) -> str:
    """The markdown between the markers for ``results`` (from :func:`load_results`)."""

    def name(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(base.resolve())) if base is not None else str(path)
        except ValueError:
            return str(path)

    lines = [
        "<!-- generated by `lewm-fast bench --update-readme` from the newest committed "
        "bench/results/*.json per device; edit bench/readme.py, not this text -->",
        "",
        "| benchmark | device | reference | lewm_fast | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    if not results:
        lines += [f"| {h.label} | — | {NOT_MEASURED} | {NOT_MEASURED} | — |" for h in HEADLINES]
        lines += ["", f"Projected paper-recipe pipeline wall-clock: {NOT_MEASURED}."]
        return "\n".join(lines) + "\n"

    for headline in HEADLINES:
        for _, data in results:
            device = data["env"].get("device_name", "unknown device")
            rows = [r for r in data["rows"] if headline.matches(r) and r.get("median_ms", 0) > 0]
            ref = _fastest(r for r in rows if r["impl"] == "reference")
            fast = _fastest(r for r in rows if r["impl"] != "reference")
            speed = "—" if ref is None or fast is None else f"{ref['median_ms'] / fast['median_ms']:.2f}x"
            cells = [headline.label, device, _cell(ref, False), _cell(fast, True), speed]
            lines.append("| " + " | ".join(cells) + " |")

    lines += [
        "",
        "Projected paper-recipe pipeline wall-clock (measured step time at batch 128 x 5,138 steps "
        "per epoch + the 50-episode evaluation; see `bench/projection.py`):",
        "",
        "| device | path | 10 epochs | 100 epochs |",
        "| --- | --- | --- | --- |",
    ]
    for _, data in results:
        projection = data.get("projection") or project(data["rows"])
        device = data["env"].get("device_name", "unknown device")
        for side in ("reference", "fast"):
            total = projection[side]["total_seconds"] or {}
            ten, hundred = (_hours(total.get(e), NOT_MEASURED) for e in ("10", "100"))
            lines.append(f"| {device} | {side} | {ten} | {hundred} |")

    lines += ["", "Measured on:", ""]
    for path, data in results:
        env = data["env"]
        peak = env.get("peak") or {}
        rates = ", ".join(f"{v:.3g} TFLOP/s {k}" for k, v in (peak.get("matmul_tflops") or {}).items())
        copy = peak.get("copy_gbps")
        facts = [
            f"driver {env['driver']}" if env.get("driver") else None,
            f"torch {env.get('torch')}",
            f"commit {env.get('git_commit')}",
            f"measured matmul {rates}" if rates else None,
            f"copy {copy:.4g} GB/s" if copy is not None else None,
        ]
        facts_text = ", ".join(f for f in facts if f)
        lines.append(
            f"- **{env.get('device_name')}**, {str(env.get('date', ''))[:10]}: `{name(path)}` ({facts_text})"
        )
    return "\n".join(lines) + "\n"


def _measured_row(workload: dict[str, Any], model: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured bench row of a projected workload (bench_plan / bench_train / bench_sigreg
    naming), or None."""
    s = workload["settings"]
    if workload["kind"] == "op":  # bench_sigreg times float32 z only
        if s["precision"] != "fp32":
            return None
        case = f"T{s['T']}-B{s['B']}-D{s['D']}-P{s['P']}-K{s['knots']}"
        key = ("sigreg", "fwd+bwd", case, "triton")
        match = (r for r in rows if (r.get("bench"), r.get("phase"), r.get("case"), r.get("impl")) == key)
        return _fastest(r for r in match if r.get("median_ms", 0) > 0)
    if workload["kind"] == "plan":
        case = f"{s['envs']} env{'s' if s['envs'] > 1 else ''}, S={s['num_samples']}, {s['n_steps']} it"
        impls = (f"fast-{s['precision']}-graph", f"fast-{s['precision']}")
        match = [r for r in rows if (r.get("bench"), r.get("phase"), r.get("case")) == ("plan", "plan", case)]
    else:
        case = f"{model}-B{s['batch']}-{s['precision']}"
        impls = (f"fast-{s['memory_plan']}" + ("-compile" if s.get("compile") else ""),)
        match = [
            r for r in rows if (r.get("bench"), r.get("phase"), r.get("case")) == ("train", "step", case)
        ]
    for impl in impls:  # the graph-replayed plan first: the projection's "graph" time
        found = _fastest(r for r in match if r.get("impl") == impl and r.get("median_ms", 0) > 0)
        if found is not None:
            return found
    return None


def model_section(
    model: dict[str, Any] | None, results: list[tuple[Path, dict[str, Any]]], base: Path | None = None
) -> str:
    """The markdown between the model markers: ``model`` (a ``model.json``, or None when there
    is none) joined to ``results`` (from :func:`load_results`) by the devices' NVML names."""
    from .perf_model import BLOCK_STEP_CAVEAT, format_count, format_ms, workloads

    lines = [
        "<!-- generated by `lewm-fast bench --update-readme` from bench/model/model.json "
        "(`lewm-fast bench --model`) and the newest committed bench/results/*.json per device; "
        "edit bench/readme.py, not this text -->",
        "",
    ]
    if model is None:
        return "\n".join([*lines, "Not yet generated: run `lewm-fast bench --model`."]) + "\n"
    items = workloads(model)
    lines += [
        f"Counted by the performance model (model `{model.get('model')}`, torch {model.get('torch')}) "
        "on fake CUDA tensors: kernels, FLOP and bytes of the CUDA fast path.",
        "",
        "| workload | precision | kernels (launches per plan or step) | FLOP | bytes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for w in items:
        kernels = f"{w['launches']:,}" + (
            f" ({w['per_iter_launches']} per iteration)" if w["kind"] == "plan" else ""
        )
        lines.append(
            f"| {w['label']} | {w['settings']['precision']} | {kernels} "
            f"| {format_count(w['flops'])} | {format_count(w['bytes'])}B |"
        )
    by_name = {data["env"].get("device_name"): (path, data) for path, data in results}
    lines += [
        "",
        "Projected time (plans and the SIGReg op: CUDA-graph replay / eager launch; training steps: "
        "eager launch, the compiled whole-batch step: CUDA-graph replay) of the code as it is now, next "
        "to the measured median of the same workload on the same device (its bench row, the date and "
        "commit it was measured at: older code where the commit is older than the model's):",
        "",
        "| workload | precision | device | projected (model) | measured |",
        "| --- | --- | --- | --- | --- |",
    ]
    for w in items:
        for device, spec in model["devices"].items():
            proj = w["projection"][device]
            projected = " / ".join(format_ms(proj[f"{t}_ms"]) for t in w.get("times", ("eager",)))
            measured = NOT_MEASURED
            if spec.get("nvml_name") in by_name:
                path, data = by_name[spec["nvml_name"]]
                row = _measured_row(w, model.get("model", "paper"), data["rows"])
                if row is not None:
                    date = str(data["env"].get("date", ""))[:10]
                    commit = str(data["env"].get("git_commit") or "")[:7]
                    at = f", commit {commit}" if commit else ""
                    measured = f"{_ms(row['median_ms'])} ({row['impl']}, {date}{at})"
            lines.append(
                f"| {w['label']} | {w['settings']['precision']} | {device} | {projected} | {measured} |"
            )
    peaks = "; ".join(
        f"{d} {v['bf16_tflops']:g} TFLOP/s bf16, {v['fp32_tflops']:g} fp32, {v['bandwidth_gbps']:g} GB/s"
        for d, v in model["devices"].items()
    )
    launch = model.get("launch_us", {})
    lines += [
        "",
        "Time per kernel = max(FLOP / peak, bytes / bandwidth), summed, plus kernels x "
        f"{launch.get('graph', '?')} us (graph replay) or {launch.get('eager', '?')} us (eager launch), "
        f"per-launch costs assumed. Peaks: {peaks} (sources in model.json: the H200's bf16 and "
        "bandwidth are rates measured on an H200 as reported in issue 11, not by lewm_fast; the rest "
        "datasheet or derived). The model's training step "
        "is forward and backward only; the measured one also runs AdamW and gradient clipping. "
        "A compiled row is itself a projection: TrainConfig.compile's step counted by the fusion "
        "rule of bench/perf_model.py, not by running inductor. " + BLOCK_STEP_CAVEAT,
    ]
    return "\n".join(lines) + "\n"


def _replace(text: str, begin: str, end: str, section: str, readme: Path) -> str:
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{readme} must contain {begin} followed by {end}, once each")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{section}{end}{tail}"


def load_model(path: str | os.PathLike, *, tracked_only: bool = True) -> dict[str, Any] | None:
    """The ``model.json`` at ``path``, or None when it is absent (or untracked with ``tracked_only``)."""
    path = Path(path)
    if not path.is_file():
        return None
    if tracked_only:
        tracked = _tracked(path.parent)
        if tracked is not None and path.resolve() not in tracked:
            return None
    return json.loads(path.read_text())


def update_readme(
    readme: str | os.PathLike,
    results_dir: str | os.PathLike,
    *,
    tracked_only: bool = True,
    model_json: str | os.PathLike | None = None,
) -> bool:
    """Rewrite the text between the bench markers of ``readme`` (and, given ``model_json``,
    between the model markers); True if it changed.

    Raises ValueError when the markers are missing, repeated or out of order.
    """
    from lewm_fast._io import write_text_atomic

    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    results = load_results(results_dir, tracked_only=tracked_only)
    new = _replace(text, BEGIN, END, results_section(results, base=readme.parent), readme)
    if model_json is not None:
        model = load_model(model_json, tracked_only=tracked_only)
        new = _replace(new, MODEL_BEGIN, MODEL_END, model_section(model, results, readme.parent), readme)
    if new == text:
        return False
    write_text_atomic(readme, new)
    return True
