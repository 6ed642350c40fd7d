"""Regenerate the README's results section from committed benchmark results.

``lewm-fast bench --update-readme`` (or ``python -m bench --update-readme``) replaces
the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in README.md with a
table built from the newest ``bench/results/*.json`` of each device -- by default only
files git tracks, so the README quotes committed measurements. Rows with no measurement
say "not yet measured"; nothing is filled in otherwise.
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

__all__ = ["BEGIN", "END", "HEADLINES", "load_results", "results_section", "update_readme"]

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
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


def update_readme(
    readme: str | os.PathLike, results_dir: str | os.PathLike, *, tracked_only: bool = True
) -> bool:
    """Rewrite the text between the bench markers of ``readme``; True if it changed.

    Raises ValueError when the markers are missing, repeated or out of order.
    """
    from lewm_fast._io import write_text_atomic

    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{readme} must contain {BEGIN} followed by {END}, once each")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    section = results_section(load_results(results_dir, tracked_only=tracked_only), base=readme.parent)
    new = f"{head}{BEGIN}\n{section}{END}{tail}"
    if new == text:
        return False
    write_text_atomic(readme, new)
    return True
