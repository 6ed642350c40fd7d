"""The run report (issue 7): ``report.json`` + ``report.md`` + PNG training curves + episode pictures.

:func:`headline` reads a run's headline metrics (:data:`HEADLINE_METRICS`) out of its
probe and evaluation results; :func:`write_report` puts them next to the reference numbers
of spec section 8 (:data:`REFERENCE`, from which every reference cell of ``report.md`` is
made), the wall-clock of every pipeline stage and the device, and plots the training
curves from the trainer's ``metrics.jsonl``. A metric that is not given (or not a finite
number) is written as ``null`` with the reason in ``missing`` -- the report never makes
a number up. Files are written atomically (temporary sibling + ``os.replace``).

``metrics.jsonl``: one JSON object per line, told apart by ``"kind"``:

- ``{"kind": "train", "step", "epoch", "pred_loss", "sigreg_loss", "loss", "grad_norm", "lr", ...}``
  (``grad_norm`` is the pre-clip norm);
- ``{"kind": "val", "step", "epoch", "pred_loss", "sigreg_loss", "loss"}``;
- ``{"kind": "eval", "step", "epoch", "success_rate", ...}``.

Lines that are blank, not JSON (e.g. cut short by a killed run) or not objects are
skipped and counted; records lacking a key are left out of that key's curve.

Plots need matplotlib (``pip install lewm-fast[plots]``); without it, or without the
records a plot needs, the report is still written and ``plots_skipped`` says why.

Episode pictures (issue 15), from the ``episodes.npz`` that ``lewm_fast.plan.evaluate(...,
episodes_out=...)`` writes (:func:`write_episode_pictures`): ``plots/episodes.png``, a grid
of evaluated episodes (start, goal, the executed path, the first plan replayed in the env,
success or failure), with matplotlib; ``plots/episodes.gif``, a few of them frame by frame
from the environment's own rendering, with Pillow. A missing library or file skips only
those pictures, with the reason in ``episodes``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import json_number, write_bytes_atomic, write_json_atomic, write_text_atomic
from .plan.evaluation import read_episodes, seed_runs_text
from .stats import success_text, wilson_interval

__all__ = [
    "HEADLINE_METRICS",
    "HeadlineMetric",
    "SUCCESS_DETAIL",
    "REFERENCE",
    "PLOTS",
    "read_metrics",
    "training_summary",
    "headline",
    "write_plots",
    "write_episode_pictures",
    "pick_episodes",
    "write_report",
]

FORMAT = "lewm_fast/run-report"
VERSION = 1


@dataclass(frozen=True)
class HeadlineMetric:
    """A headline number of a run: where :func:`headline` reads it and how report.md shows it.

    ``label``: its row in the report's metrics table (a metric with ``coords`` gets one row
    per coordinate, "label, x"). ``source``: the stage result it is read from, "probe"
    (:func:`lewm_fast.probe.run_probes`) or "eval" (:func:`lewm_fast.plan.evaluate`), and
    ``path`` the keys leading to it in that result. ``unit``: "fraction" (a number in
    [0, 1], shown as a percentage), "ms", "px" or "" (plain). ``coords``: the entries of a
    mapping-valued metric, e.g. ("x", "y").
    """

    label: str
    source: str
    path: tuple[str, ...]
    unit: str = ""
    coords: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.source not in ("probe", "eval"):
            raise ValueError(f"HeadlineMetric source must be 'probe' or 'eval', got {self.source!r}")
        if self.unit not in ("fraction", "ms", "px", ""):
            raise ValueError(f"HeadlineMetric unit must be 'fraction', 'ms', 'px' or '', got {self.unit!r}")


# Headline metrics: report.json key -> where it comes from and how it is shown.
HEADLINE_METRICS: dict[str, HeadlineMetric] = {
    "success_rate": HeadlineMetric(
        "CEM success rate (Two-Room evaluation)", "eval", ("success_rate",), "fraction"
    ),
    "final_distance_mean": HeadlineMetric(
        "mean final distance to the goal (px)", "eval", ("final_distance_mean",), "px"
    ),
    "plan_ms_median": HeadlineMetric(
        "planning time per plan of all running episodes at once, median",
        "eval",
        ("plan_latency_ms", "median"),
        "ms",
    ),
    "plan_ms_per_env": HeadlineMetric(
        "planning time per episode (that median / episodes)",
        "eval",
        ("plan_latency_ms", "median_per_env"),
        "ms",
    ),
    "probe_r2": HeadlineMetric("linear probe R^2", "probe", ("probe_r2",), coords=("x", "y")),
    "one_step_mse": HeadlineMetric("1-step predictor MSE on fresh rollouts", "probe", ("one_step_mse",)),
    "sigreg_heldout": HeadlineMetric("SIGReg statistic of held-out embeddings", "probe", ("sigreg_heldout",)),
}

# Spec section 8: the published and replicated numbers the report quotes, as
# {key: {source: value, ..., "note": context}}; a source ("paper", "replication") holds a
# number in the unit of its metric, or a mapping of them. report.md's reference cells are
# made from these entries (headline keys: HEADLINE_METRICS; the others: _TRAINING_ROWS and
# the wall-clock section), and report.json carries the dict as it is.
REFERENCE: dict[str, dict[str, Any]] = {
    "success_rate": {
        "paper": 0.87,
        "replication": 0.84,
        "note": f"replication: {success_text(42, 50)}, RTX 3060 Ti 8 GB",
    },
    "final_distance_mean": {"note": "no published reference"},
    "plan_ms_median": {
        "note": "one batched plan for every running episode; the published ~1 s is one episode's plan "
        "(next row)",
    },
    "plan_ms_per_env": {
        "paper": 1000.0,
        "note": "about 1 s per plan of one episode (paper); 0.56 s (H20) to 2.2 s (RTX 4090/5090) measured "
        "publicly",
    },
    "probe_r2": {"replication": {"x": 0.873, "y": 0.674}},
    "one_step_mse": {"replication": 0.068},
    "sigreg_heldout": {
        "note": "no held-out reference; the training SIGReg of the replication goes ~13 -> ~1.7 in "
        "5 epochs, then stays flat"
    },
    "sigreg_training": {"replication": {"start": 13.0, "after_5_epochs": 1.7}},
    "grad_norm_preclip": {"replication": {"median": 1.77, "max": 18.1, "steps": 100_500}},
    "pipeline_seconds": {
        "replication": 15 * 3600 + 12 * 60,
        "note": "train 100 epochs + probe + 50-episode eval on one RTX 3060 Ti",
    },
}

# Plot name -> (title, [(record kind, key, label)], log-scale y).
PLOTS: dict[str, tuple[str, list[tuple[str, str, str]], bool]] = {
    "losses": (
        "training and validation losses",
        [
            ("train", "pred_loss", "pred"),
            ("train", "sigreg_loss", "SIGReg"),
            ("train", "loss", "total"),
            ("val", "pred_loss", "val pred"),
            ("val", "sigreg_loss", "val SIGReg"),
            ("val", "loss", "val total"),
        ],
        True,
    ),
    "grad_norm": ("pre-clip gradient norm", [("train", "grad_norm", "grad norm")], True),
    "lr": ("learning rate", [("train", "lr", "lr")], False),
    "success": ("planning success rate during training", [("eval", "success_rate", "success")], False),
}
PLOTS_DIR = "plots"


# ------------------------------------------------------------------ metrics.jsonl
def read_metrics(path: str | os.PathLike) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Read a ``metrics.jsonl`` file: ({kind: [records in file order]}, number of skipped lines).

    Blank lines are ignored; lines that are not JSON objects are skipped and counted;
    records without a string ``"kind"`` are filed under ``"unknown"``. A missing file
    raises ``FileNotFoundError``.
    """
    path = Path(path)
    records: dict[str, list[dict[str, Any]]] = {}
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(record, dict):
                skipped += 1
                continue
            kind = record.get("kind")
            records.setdefault(kind if isinstance(kind, str) else "unknown", []).append(record)
    return records, skipped


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records with a finite ``key``; x is ``step`` when present, else the index."""
    xs, ys = [], []
    for i, record in enumerate(records):
        y = json_number(record.get(key))
        if y is None:
            continue
        x = json_number(record.get("step"))
        xs.append(float(i if x is None else x))
        ys.append(float(y))
    return xs, ys


def training_summary(records: Mapping[str, list[dict[str, Any]]], tail: int = 100) -> dict[str, Any]:
    """Numbers the report quotes from the metrics records (None where the records lack them).

    ``train_records``, ``last_step``, ``last_epoch``; ``sigreg_loss_first`` (first logged
    value) and ``sigreg_loss_final``, ``pred_loss_final``, ``loss_final`` (mean of the last
    ``tail`` train records with the key); ``grad_norm_median`` / ``grad_norm_max`` over
    all train records; ``val_*_last`` from the last validation record; ``eval_records``,
    ``success_rate_best`` with ``success_rate_best_step``, and ``success_rate_last``.
    """
    train = list(records.get("train", []))
    val = list(records.get("val", []))
    evals = list(records.get("eval", []))
    out: dict[str, Any] = {"train_records": len(train), "val_records": len(val), "eval_records": len(evals)}
    steps = [s for s in (json_number(r.get("step")) for r in train) if s is not None]
    epochs = [e for e in (json_number(r.get("epoch")) for r in train + val + evals) if e is not None]
    out["last_step"] = max(steps) if steps else None
    out["last_epoch"] = max(epochs) if epochs else None
    for key in ("pred_loss", "sigreg_loss", "loss"):
        _, ys = _series(train, key)
        out[f"{key}_final"] = statistics.fmean(ys[-tail:]) if ys else None
    _, sig = _series(train, "sigreg_loss")
    out["sigreg_loss_first"] = sig[0] if sig else None
    _, grad = _series(train, "grad_norm")
    out["grad_norm_median"] = statistics.median(grad) if grad else None
    out["grad_norm_max"] = max(grad) if grad else None
    for key in ("pred_loss", "sigreg_loss", "loss"):
        _, ys = _series(val, key)
        out[f"val_{key}_last"] = ys[-1] if ys else None
    xs, ys = _series(evals, "success_rate")
    if ys:
        best = max(range(len(ys)), key=lambda i: (ys[i], -i))
        out.update(success_rate_best=ys[best], success_rate_best_step=xs[best], success_rate_last=ys[-1])
    else:
        out.update(success_rate_best=None, success_rate_best_step=None, success_rate_last=None)
    return out


# ------------------------------------------------------------------ plots
def _running_mean(ys: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def _matplotlib():
    """(Figure, FigureCanvasAgg) or an ImportError message; no pyplot, no global backend switch."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        return None, f"matplotlib is not installed (pip install lewm-fast[plots]): {exc}"
    return (Figure, FigureCanvasAgg), None


def _success_intervals(
    evals: list[dict[str, Any]],
) -> tuple[list[float], list[float], list[float], str] | None:
    """(steps, lo, hi, legend label) of the 95% Wilson interval of every eval record holding
    ``successes`` and ``episodes`` (an evaluation during training); None when none does."""
    xs, lo, hi, counts = [], [], [], set()
    for i, record in enumerate(evals):
        k, n = record.get("successes"), record.get("episodes")
        try:
            interval = wilson_interval(k, n)
        except ValueError:
            continue
        x = json_number(record.get("step"))
        xs.append(float(i if x is None else x))
        lo.append(interval[0])
        hi.append(interval[1])
        counts.add(int(n))
    if not xs:
        return None
    each = f"{counts.pop()} episodes each" if len(counts) == 1 else "episodes vary"
    return xs, lo, hi, f"95% Wilson interval ({each})"


def _draw(
    mpl: tuple[type, type],
    name: str,
    data: list[tuple],
    keys: list[str],
    title: str,
    log_y: bool,
    intervals: tuple | None = None,
) -> bytes:
    """PNG bytes of plot ``name``: its series ``data`` [(kind, key, label, xs, ys)] against step.

    One colour per quantity (index in ``keys``): train solid, val dashed with markers; a
    long train series is drawn faint with a running mean over 1% of it on top. The success
    plot gets the published success rates of :data:`REFERENCE` as horizontal lines and
    ``intervals`` (:func:`_success_intervals`) as bars.
    """
    figure_cls, canvas_cls = mpl
    fig = figure_cls(figsize=(7.0, 4.0), dpi=100)
    canvas_cls(fig)
    ax = fig.add_subplot(1, 1, 1)
    for kind, key, label, xs, ys in data:
        color = f"C{keys.index(key)}"
        val = kind == "val"
        if val or len(xs) < 20:
            ax.plot(xs, ys, "--" if val else "-", color=color, label=label, marker="o", markersize=3)
        elif len(xs) > 200:
            ax.plot(xs, ys, color=color, linewidth=0.5, alpha=0.3)
            ax.plot(xs, _running_mean(ys, max(2, len(ys) // 100)), color=color, linewidth=1.2, label=label)
        else:
            ax.plot(xs, ys, color=color, linewidth=1.0, label=label)
    if log_y and all(y > 0 for *_, ys in data for y in ys):
        ax.set_yscale("log")
    if name == "success":
        ax.set_ylim(-0.02, 1.02)
        if intervals is not None:
            xs, lo, hi, label = intervals
            ax.vlines(xs, lo, hi, color="C0", alpha=0.35, linewidth=4, label=label)
        for (who, rate), style in zip(_sourced(REFERENCE["success_rate"]), (":", "-.", "--")):
            ax.axhline(rate, color="gray", linestyle=style, linewidth=0.8, label=f"{who} {rate:.0%}")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(data) > 1 or name == "success":
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_plots(
    records: Mapping[str, list[dict[str, Any]]], folder: str | os.PathLike
) -> tuple[dict[str, str], dict[str, str]]:
    """Write the PNG curves of :data:`PLOTS` into ``folder``: ({name: file}, {name: why skipped}).

    ``records``: {kind: [record]} as :func:`read_metrics` returns them. A plot is skipped
    (with the reason) when none of its series has a finite value, or for all plots when
    matplotlib is missing. A series is drawn against ``step``.
    """
    folder = Path(folder)
    written: dict[str, str] = {}
    skipped: dict[str, str] = {}
    mpl, why = _matplotlib()
    for name, (title, series, log_y) in PLOTS.items():
        data = [(kind, key, label, *_series(list(records.get(kind, [])), key)) for kind, key, label in series]
        data = [entry for entry in data if entry[-1]]
        if not data:
            wanted = ", ".join(sorted({f"{kind} records with {key!r}" for kind, key, _ in series}))
            skipped[name] = f"no {wanted} in the metrics"
            continue
        if mpl is None:
            skipped[name] = why
            continue
        keys = list(dict.fromkeys(key for _, key, _ in series))
        intervals = _success_intervals(list(records.get("eval", []))) if name == "success" else None
        png = _draw(mpl, name, data, keys, title, log_y, intervals)
        written[name] = write_bytes_atomic(folder / f"{name}.png", png).name
    return written, skipped


# ------------------------------------------------------------------ episode pictures
EPISODES_FILE = "episodes.npz"
EPISODE_PICTURES = {"grid": "episodes.png", "animation": "episodes.gif"}
_GREEN, _RED, _GREY = (44, 160, 44), (214, 39, 40), (150, 150, 150)
_PATH_BLUE = (31, 119, 180)
_GIF_BORDER, _GIF_LABEL, _GIF_GAP = 4, 14, 6  # px: success frame, caption strip, space between panels
_GIF_MS, _GIF_HOLD_MS = 120, 2000  # per env step; the last frame


def pick_episodes(success, count: int) -> list[int]:
    """Up to ``count`` episode indices to show, ascending, the first ones of each outcome in
    evaluation order: failures (what a reader most needs to see) get at least half of the
    places when there are that many, successes the rest, and either outcome fills the places
    the other cannot. The caption says which were picked."""
    failed = [i for i, ok in enumerate(success) if not ok]
    passed = [i for i, ok in enumerate(success) if ok]
    fails = min(len(failed), max(count - len(passed), math.ceil(count / 2)))
    wins = min(len(passed), count - fails)
    return sorted(failed[:fails] + passed[:wins])


def _picked_words(success, picked: list[int]) -> str:
    """ "all 3 failed episodes and the first 22 of 47 successful episodes", for a caption."""
    fails = sum(1 for i in picked if not success[i])
    wins = len(picked) - fails
    total_fails = sum(1 for ok in success if not ok)
    total_wins = len(success) - total_fails
    parts = [
        (f"the first {n} of {total}" if n < total else f"all {n}" if n > 1 else "the 1")
        + f" {what} episode{'s' if n > 1 else ''}"
        for n, total, what in ((fails, total_fails, "failed"), (wins, total_wins, "successful"))
        if n
    ]
    return " and ".join(parts)


def _episode_title(ep: Mapping[str, Any], b: int) -> str:
    steps = int(ep["steps_to_success"][b])
    if steps >= 0:
        return f"#{b}: goal reached at step {steps}"
    gap = float(((ep["xy"][b, -1] - ep["goal_xy"][b]) ** 2).sum() ** 0.5)
    return f"#{b}: missed by {gap:.0f} px"


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(c / 255 for c in color)


def _grid_panel(ax, ep: Mapping[str, Any], b: int, left: float, top: float, size: int, lo: int) -> None:
    """Episode ``b`` in the grid cell whose room image starts at (``left``, ``top``): env
    point (x, y) is drawn at (x - lo + left, y - lo + top)."""
    from matplotlib.patches import Circle, Rectangle

    blue, green, red = _rgb(_PATH_BLUE), _rgb(_GREEN), _rgb(_RED)
    shift = np.array([left - lo, top - lo], np.float32)
    goal, path, plan = ep["goal_xy"][b] + shift, ep["xy"][b] + shift, ep["plan_xy"][b] + shift
    every, ok = max(int(ep["steps_per_plan"]), 1), bool(ep["success"][b])
    radius = ep["layout"].success_distance
    ax.add_patch(Circle(goal, radius, facecolor=(*green, 0.18), edgecolor=green, lw=0.8))
    ax.plot(plan[:, 0], plan[:, 1], "-", color="darkorange", lw=5, alpha=0.45, solid_capstyle="round")
    ax.plot(path[:, 0], path[:, 1], "-", color=blue, lw=1.4)
    replans = path[every:-1:every]
    ax.plot(replans[:, 0], replans[:, 1], "s", color=blue, ms=3.5)
    ax.plot(*path[-1], "X", color=blue, mec="white", mew=0.5, ms=7)
    ax.plot(*path[0], "o", color=blue, mec="white", ms=7)
    ax.plot(*goal, "*", color=green, mec="black", mew=0.5, ms=11)
    ax.add_patch(
        Rectangle((left - 0.5, top - 0.5), size, size, fill=False, edgecolor=green if ok else red, lw=3)
    )
    title = _episode_title(ep, b)
    ax.text(
        left + size / 2, top - 6, title, ha="center", va="bottom", fontsize=8, color="black" if ok else red
    )


def _grid_legend(fig) -> None:
    from matplotlib.lines import Line2D

    blue, green = _rgb(_PATH_BLUE), _rgb(_GREEN)
    handles = [
        Line2D([], [], marker="o", color=blue, mec="white", ls="", ms=7, label="start"),
        Line2D([], [], marker="X", color=blue, mec="white", ls="", ms=7, label="end"),
        Line2D([], [], marker="*", color=green, mec="k", ls="", ms=11, label="goal (ring: success radius)"),
        Line2D([], [], color=blue, lw=1.4, marker="s", ms=3.5, label="executed path (squares: replans)"),
        Line2D([], [], color="darkorange", lw=5, alpha=0.45, label="first plan, replayed in the true env"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)


def _draw_episode_grid(mpl: tuple[type, type], ep: Mapping[str, Any], picked: list[int], words: str) -> bytes:
    """PNG bytes: one panel per picked episode over the empty room (walls, door, borders):
    start, goal with its success radius, the executed path with a mark at every replan and
    its end, under it the first plan replayed in the env (a wide orange band); a green frame
    for success, red for failure. ``words`` says which episodes are shown.

    The panels are cells of one tiled room image in one axes (25 axes would cost seconds).
    """
    from .envs.two_room import layout_image

    figure_cls, canvas_cls = mpl
    layout = ep["layout"]
    lo = layout.border - layout.border_thickness - 2  # crop: the room and its border lines
    room = layout_image(layout).numpy()[lo : layout.size - lo, lo : layout.size - lo]
    size, title, gap = room.shape[0], 24, 10  # env px: a panel, its title band, between panels
    cols = min(5, max(1, math.ceil(math.sqrt(len(picked)))))
    rows = math.ceil(len(picked) / cols)
    cell_w, cell_h = size + gap, size + title + gap
    tiles = np.full((rows * cell_h - gap, cols * cell_w - gap, 3), 255, np.uint8)
    scale, legend, heading = 1.1 / 100, 0.55, 0.35  # inches per env px; inches below and above
    width, height = tiles.shape[1] * scale + 0.2, tiles.shape[0] * scale + legend + heading
    fig = figure_cls(figsize=(width, height), dpi=100)
    canvas_cls(fig)
    ax = fig.add_axes((0.1 / width, legend / height, 1 - 0.2 / width, 1 - (legend + heading) / height))
    ax.set_axis_off()
    for k, b in enumerate(picked):
        top, left = (k // cols) * cell_h + title, (k % cols) * cell_w
        tiles[top : top + size, left : left + size] = room
        _grid_panel(ax, ep, b, left, top, size, lo)
    h, w = tiles.shape[:2]
    ax.imshow(tiles, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest", zorder=0)
    ax.set_xlim(-2.5, w + 1.5)
    ax.set_ylim(h + 1.5, -0.5)
    _grid_legend(fig)
    wins = int(sum(bool(v) for v in ep["success"]))
    heading_text = f"{wins} of {len(ep['success'])} episodes reached the goal; shown: {words}"
    fig.suptitle(heading_text, fontsize=9, y=1 - 0.08 / height, va="top")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _gif_frames(ep: Mapping[str, Any], picked: list[int]) -> list:
    """Pillow frames, one per env step: the env's rendered frame of each picked episode (the
    red agent dot) with the goal ring, the path so far and a frame that turns green at success
    (red at the end for a failure), tiled side by side (2 x 2 for 4)."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from .envs.two_room import render

    layout = ep["layout"]
    s, steps = layout.size, ep["xy"].shape[1] - 1
    xy = torch.from_numpy(ep["xy"][picked]).reshape(-1, 2)
    shots = render(xy, layout).reshape(len(picked), steps + 1, s, s, 3).numpy()
    cols = min(len(picked), 2 if len(picked) == 4 else 3)
    rows = math.ceil(len(picked) / cols)
    pw, ph = s + 2 * _GIF_BORDER, s + 2 * _GIF_BORDER + _GIF_LABEL
    width, height = cols * pw + (cols - 1) * _GIF_GAP, rows * ph + (rows - 1) * _GIF_GAP
    font, r = ImageFont.load_default(), layout.success_distance
    frames = []
    for t in range(steps + 1):
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for k, b in enumerate(picked):
            x0, y0 = (k % cols) * (pw + _GIF_GAP), (k // cols) * (ph + _GIF_GAP)
            reached = 0 <= int(ep["steps_to_success"][b]) <= t
            frame = _GREEN if reached else (_RED if t == steps else _GREY)
            draw.rectangle((x0, y0 + _GIF_LABEL, x0 + pw - 1, y0 + ph - 1), fill=frame)
            canvas.paste(Image.fromarray(shots[k, t]), (x0 + _GIF_BORDER, y0 + _GIF_LABEL + _GIF_BORDER))
            ox, oy = x0 + _GIF_BORDER, y0 + _GIF_LABEL + _GIF_BORDER
            gx, gy = (float(v) for v in ep["goal_xy"][b])
            draw.ellipse((ox + gx - r, oy + gy - r, ox + gx + r, oy + gy + r), outline=_GREEN, width=2)
            draw.line((ox + gx - 3, oy + gy, ox + gx + 3, oy + gy), fill=_GREEN, width=1)
            draw.line((ox + gx, oy + gy - 3, ox + gx, oy + gy + 3), fill=_GREEN, width=1)
            trail = [(ox + float(px), oy + float(py)) for px, py in ep["xy"][b, : t + 1]]
            if len(trail) > 1:
                draw.line(trail, fill=_PATH_BLUE, width=1)
            status = (
                f"reached at step {ep['steps_to_success'][b]}" if reached else "missed" if t == steps else ""
            )
            draw.text((x0 + 2, y0 + 1), f"#{b}  step {t}/{steps}  {status}", fill=(0, 0, 0), font=font)
        frames.append(canvas)
    return frames


def _gif_bytes(frames: list) -> bytes:
    """An endless GIF of RGB Pillow ``frames``, the last one held. One palette serves every
    frame, made from the first, middle and last (which hold every colour drawn): several
    times faster and smaller than a palette per frame."""
    from PIL import Image

    keys = (frames[0], frames[len(frames) // 2], frames[-1])
    w, h = frames[0].size
    montage = Image.new("RGB", (w * len(keys), h))
    for i, key in enumerate(keys):
        montage.paste(key, (i * w, 0))
    palette = montage.quantize(colors=128, method=Image.Quantize.FASTOCTREE)
    indexed = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    buffer = io.BytesIO()
    durations = [_GIF_MS] * (len(frames) - 1) + [_GIF_HOLD_MS]
    indexed[0].save(
        buffer, format="GIF", save_all=True, append_images=indexed[1:], duration=durations, loop=0
    )
    return buffer.getvalue()


def write_episode_pictures(
    episodes: str | os.PathLike, folder: str | os.PathLike, *, grid: int = 25, animated: int = 4
) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """Draw the evaluated episodes of ``episodes`` (the ``episodes.npz`` of
    ``lewm_fast.plan.evaluate(..., episodes_out=...)``) into ``folder``.

    ``episodes.png`` (matplotlib): a grid of up to ``grid`` episodes; ``episodes.gif``
    (Pillow): up to ``animated`` episodes frame by frame, one frame per env step, from the
    env's own rendering. Episodes are chosen by :func:`pick_episodes` (at least half failures
    when there are that many).
    Returns ({"grid" / "animation": file name}, {name: why skipped}, facts for the caption:
    ``episodes``, ``successes``, ``grid_episodes`` / ``animated_episodes`` (indices shown)
    and their words, ``env_steps``, ``steps_per_plan``, ``success_distance`` and
    ``start_within_success``, the episodes that start within it). A missing library skips
    only its picture.
    """
    ep = read_episodes(episodes)
    success = [bool(v) for v in ep["success"]]
    shown, moving = pick_episodes(success, grid), pick_episodes(success, animated)
    facts = {
        "episodes": len(success),
        "successes": sum(success),
        "grid_episodes": shown,
        "grid_words": _picked_words(success, shown),
        "animated_episodes": moving,
        "animated_words": _picked_words(success, moving),
        "env_steps": int(ep["xy"].shape[1] - 1),
        "steps_per_plan": ep["steps_per_plan"],
        # episodes whose start already lies within the success radius of their goal: success
        # at the first step unless that step leaves it (the start itself is not checked)
        "start_within_success": int(
            (np.hypot(*(ep["start_xy"] - ep["goal_xy"]).T) < ep["layout"].success_distance).sum()
        ),
        "success_distance": float(ep["layout"].success_distance),
    }
    folder = Path(folder)
    written: dict[str, str] = {}
    skipped: dict[str, str] = {}
    mpl, why = _matplotlib()
    if mpl is None:
        skipped["grid"] = why
    else:
        png = _draw_episode_grid(mpl, ep, shown, facts["grid_words"])
        written["grid"] = write_bytes_atomic(folder / EPISODE_PICTURES["grid"], png).name
    try:
        gif = _gif_bytes(_gif_frames(ep, moving))
    except ImportError as exc:
        skipped["animation"] = f"Pillow is not installed (pip install lewm-fast[plots]): {exc}"
    else:
        written["animation"] = write_bytes_atomic(folder / EPISODE_PICTURES["animation"], gif).name
    return written, skipped, facts


def _episodes_part(episodes: Path, out_dir: Path) -> dict[str, Any]:
    """The report's ``episodes`` key: the pictures of ``episodes`` (in ``out_dir/plots``) and
    the facts their caption needs, or why there are none."""
    part: dict[str, Any] = {"file": str(episodes), "pictures": {}, "skipped": {}}
    if not episodes.is_file():
        part["missing"] = f"{episodes} not found (the eval stage did not record episode paths)"
        return part
    try:
        written, skipped, facts = write_episode_pictures(episodes, out_dir / PLOTS_DIR)
    except (OSError, ValueError, KeyError) as exc:
        part["missing"] = f"{episodes} could not be read: {type(exc).__name__}: {exc}"
        return part
    part["pictures"] = {name: f"{PLOTS_DIR}/{file}" for name, file in written.items()}
    part["skipped"] = skipped
    part.update(facts)
    return part


# ------------------------------------------------------------------ headline metrics
def _lookup(result: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """``result[path[0]][path[1]]...``, or None where a key on the way is missing."""
    value: Any = result
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


# The metrics key (and report.json key) of the counts behind ``success_rate``: its 95% Wilson
# interval and, when the evaluation was repeated over planner seeds, every run's success.
SUCCESS_DETAIL = "success_detail"
_SEED_RUNS_KEYS = ("seeds", "vary_start_seed", "runs", "success_rate_mean", "success_rate_std", "pooled")


def _success_detail(detail: Any) -> dict[str, Any] | None:
    """report.json's :data:`SUCCESS_DETAIL` from the one in the metrics (None when not given):
    ``successes``, ``episodes``, their ``success_interval`` (95% Wilson, fractions) and
    ``seed_runs`` (an evaluation result's, or None). ValueError naming what is wrong."""
    if detail is None:
        return None
    if not isinstance(detail, Mapping):
        raise ValueError(
            f"metrics[{SUCCESS_DETAIL!r}] must be a mapping with successes, episodes and seed_runs, "
            f"got {type(detail).__name__}"
        )
    try:
        interval = wilson_interval(detail.get("successes"), detail.get("episodes"))
    except ValueError as exc:
        raise ValueError(f"metrics[{SUCCESS_DETAIL!r}]: {exc}") from None
    runs = detail.get("seed_runs")
    if runs is not None and not (isinstance(runs, Mapping) and set(_SEED_RUNS_KEYS) <= set(runs)):
        raise ValueError(
            f"metrics[{SUCCESS_DETAIL!r}]['seed_runs'] must be the seed_runs of an evaluation result "
            f"(keys {list(_SEED_RUNS_KEYS)}) or None, got {runs!r}"
        )
    return {
        "successes": int(detail["successes"]),
        "episodes": int(detail["episodes"]),
        "success_interval": list(interval),
        "seed_runs": runs,
    }


def headline(
    probes: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    *,
    absent: str = "did not run",
) -> tuple[dict[str, Any], dict[str, str]]:
    """The headline metrics of a run from its stage results: (metrics, reasons) for :func:`write_report`.

    ``probes``: what :func:`lewm_fast.probe.run_probes` returns (the pipeline's
    ``probe.json``); ``evaluation``: what :func:`lewm_fast.plan.evaluate` returns
    (``eval.json``); None for a stage whose result does not exist. Each metric of
    :data:`HEADLINE_METRICS` is read at its ``path`` in its ``source`` result: e.g.
    ``plan_ms_median`` = ``evaluation["plan_latency_ms"]["median"]`` (ms; ``plan_ms_per_env``
    its ``median_per_env``), ``probe_r2`` =
    ``probes["probe_r2"]`` ({x, y}). Returns metrics {key: value or None} for every
    headline key and reasons {key: "the <source> stage <absent>"} for the metrics of a
    None result. Values are passed on unchecked: :func:`write_report` writes a missing or
    non-finite one as null with the reason. When the evaluation holds its counts, metrics
    also get :data:`SUCCESS_DETAIL`: ``{"successes", "episodes", "seed_runs"}`` (the last
    None for an evaluation without repeats).
    """
    results = {"probe": probes, "eval": evaluation}
    metrics: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for key, metric in HEADLINE_METRICS.items():
        result = results[metric.source]
        if result is None:
            reasons[key] = f"the {metric.source} stage {absent}"
        metrics[key] = None if result is None else _lookup(result, metric.path)
    if isinstance(evaluation, Mapping) and "successes" in evaluation and "episodes" in evaluation:
        metrics[SUCCESS_DETAIL] = {
            "successes": evaluation["successes"],
            "episodes": evaluation["episodes"],
            "seed_runs": evaluation.get("seed_runs"),
        }
    return metrics, reasons


def _headline_values(
    metrics: Mapping[str, Any], reasons: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """({headline key: finite number, {coord: number or None} or None}, {key: why missing})."""
    values: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for key, metric in HEADLINE_METRICS.items():
        if key not in metrics or metrics[key] is None:
            values[key] = None
            missing[key] = reasons.get(key, "not in the metrics given to the report; did its stage run?")
            continue
        raw = metrics[key]
        if metric.coords:
            if not isinstance(raw, Mapping):
                values[key] = None
                missing[key] = f"expected a mapping {{{', '.join(metric.coords)}}}, got {type(raw).__name__}"
                continue
            coords = {c: json_number(raw.get(c)) for c in metric.coords}
            values[key] = coords
            bad = [c for c, v in coords.items() if v is None]
            if bad:
                missing[key] = reasons.get(key, f"coordinate(s) {bad} missing or not finite: {dict(raw)!r}")
            continue
        number = json_number(raw)
        values[key] = number
        if number is None:
            missing[key] = reasons.get(key, f"not a finite number: {raw!r}")
    return values, missing


# ------------------------------------------------------------------ report
def _plain(value: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, tuples -> lists, other objects -> str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return json_number(value)
    try:  # numpy / torch scalars
        return json_number(float(value))
    except (TypeError, ValueError):
        return str(value)


def _stages(stages_seconds: Mapping[str, Any] | None) -> dict[str, float | None]:
    if stages_seconds is None:
        return {}
    if not isinstance(stages_seconds, Mapping):
        raise ValueError(
            f"stages_seconds must map stage names to seconds, got {type(stages_seconds).__name__}"
        )
    out: dict[str, float | None] = {}
    for name, seconds in stages_seconds.items():
        value = json_number(seconds)
        if seconds is not None and (value is None or value < 0):
            raise ValueError(
                f"stages_seconds[{name!r}] must be a finite number >= 0 or None, got {seconds!r}"
            )
        out[str(name)] = None if value is None else float(value)
    return out


def _training_part(jsonl: Path, out_dir: Path) -> dict[str, Any]:
    """The report's training keys, from ``training`` to ``plots_skipped``.

    The summary of the trainer's log ``jsonl`` and its plots (written to ``out_dir/plots``),
    or None and the reason when the file does not exist.
    """
    if not jsonl.is_file():
        why = f"{jsonl} not found"
        plots: dict[str, str] = {}
        plots_skipped = {name: f"no metrics ({why})" for name in PLOTS}
        summary, skipped_lines = None, 0
    else:
        why = None
        records, skipped_lines = read_metrics(jsonl)
        plots, plots_skipped = write_plots(records, out_dir / PLOTS_DIR)
        plots = {name: f"{PLOTS_DIR}/{file}" for name, file in plots.items()}
        summary = training_summary(records)
    return {
        "training": summary,
        "training_missing": why,
        "metrics_jsonl": str(jsonl),
        "metrics_lines_skipped": skipped_lines,
        "plots": plots,
        "plots_skipped": plots_skipped,
    }


def _bookkeeping(run_dir: Path, preset: str | None) -> dict[str, Any]:
    """The report's first keys: format, version, created (UTC), lewm_fast, run_dir and preset."""
    from . import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lewm_fast": __version__,
        "run_dir": str(run_dir),
        "preset": preset,
    }


def write_report(
    run_dir: str | os.PathLike,
    metrics: Mapping[str, Any],
    *,
    stages_seconds: Mapping[str, float | None] | None,
    device_info: Mapping[str, Any] | str | None,
    preset: str | None,
    metrics_jsonl: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    reasons: Mapping[str, str] | None = None,
    episodes: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` for the run in ``run_dir``.

    Args:
        run_dir: the run folder (named in the report; default home of the outputs).
        metrics: the run's numbers. Headline keys (:data:`HEADLINE_METRICS`):
            ``success_rate`` (fraction in [0, 1]), ``final_distance_mean`` (px),
            ``plan_ms_median`` and ``plan_ms_per_env`` (ms), ``probe_r2`` ({"x", "y"}), ``one_step_mse``,
            ``sigreg_heldout`` -- e.g. the first result of :func:`headline`; and
            :data:`SUCCESS_DETAIL` ``{"successes", "episodes", "seed_runs"}``, the counts
            behind the success rate (optional). Other keys are kept under ``details``.
        stages_seconds: wall-clock per stage, e.g. {"generate-data": 12.0, "train": 3600.0,
            "probe": 30.0, "eval": 8.0}; None for a stage that did not run.
        device_info: a description of the device (e.g. ``lewm_fast.sysinfo.environment(device)``)
            or a name.
        preset: the run preset's name.
        metrics_jsonl: the trainer's log (default ``run_dir/metrics.jsonl``; a missing file
            means no training section and no plots, with the reason).
        out: folder for the outputs (default ``run_dir``).
        reasons: why a headline metric is missing, e.g. {"success_rate": "eval stage failed: ..."};
            used instead of the generic reason.
        episodes: the evaluation's episode paths (default ``run_dir/episodes.npz``, from
            ``evaluate(..., episodes_out=...)``), drawn by :func:`write_episode_pictures`.

    Returns the report dict as written to ``report.json``: the headline keys (None when
    missing), ``missing`` {key: reason}, ``stages_seconds``, ``total_seconds``, ``device``,
    ``preset``, ``reference`` (:data:`REFERENCE`), ``training`` (:func:`training_summary`
    or None), ``plots`` {name: file relative to ``out``}, ``plots_skipped`` {name: reason},
    ``episodes`` (``pictures`` {"grid", "animation": file relative to ``out``}, ``skipped``,
    the caption's facts, or ``missing``), ``details`` and bookkeeping (``format``, ``version``,
    ``created``, ``lewm_fast``, ``run_dir``).
    Raises ValueError (before writing anything) for ``metrics`` or ``reasons`` that are not
    mappings and for a stage time that is not a finite number >= 0 or None.

    The report also holds :data:`SUCCESS_DETAIL`: ``successes``, ``episodes``, their 95%
    Wilson ``success_interval`` (fractions) and ``seed_runs``, or None when the metrics
    have none; ValueError (before writing) unless 0 <= successes <= episodes, episodes >= 1.
    """
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping of metric names to values, got {type(metrics).__name__}")
    if reasons is not None and not isinstance(reasons, Mapping):
        raise ValueError(f"reasons must map metric names to strings, got {type(reasons).__name__}")
    run_dir = Path(run_dir)
    out_dir = Path(out) if out is not None else run_dir
    stages = _stages(stages_seconds)
    values, missing = _headline_values(metrics, {str(k): str(v) for k, v in (reasons or {}).items()})
    success_detail = _success_detail(metrics.get(SUCCESS_DETAIL))
    metrics = {k: v for k, v in metrics.items() if k != SUCCESS_DETAIL}  # not a detail: its own key
    jsonl = Path(metrics_jsonl) if metrics_jsonl is not None else run_dir / "metrics.jsonl"
    paths = Path(episodes) if episodes is not None else run_dir / EPISODES_FILE
    report: dict[str, Any] = {
        **_bookkeeping(run_dir, preset),
        **values,
        "missing": missing,
        SUCCESS_DETAIL: success_detail,
        "stages_seconds": stages,
        "total_seconds": sum(s for s in stages.values() if s is not None) if stages else None,
        "device": _plain(device_info) if device_info is not None else None,
        "reference": REFERENCE,
        **_training_part(jsonl, out_dir),
        "episodes": _episodes_part(paths, out_dir),
        "details": _plain({k: v for k, v in metrics.items() if k not in HEADLINE_METRICS}),
    }
    report = _plain(report)
    write_json_atomic(out_dir / "report.json", report)
    write_text_atomic(out_dir / "report.md", _markdown(report))
    return report


# ------------------------------------------------------------------ report.md
def duration(seconds: float | None) -> str:
    """Human wall-clock: '15 h 12 min', '3 min 05 s', '12.3 s', '-' for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt(value: Any, unit: str = "", *, published: bool = False) -> str:
    """A number in report.md ("-" for None): a "fraction" as a percentage, "ms" in ms or s.

    A measured value gets fixed decimals; a ``published`` one (from :data:`REFERENCE`)
    up to 4 significant digits and no trailing zeros (87%, 1 s, 0.068).
    """
    if value is None:
        return "-"
    if published:
        if unit == "fraction":
            return f"{100 * value:.4g}%"
        if unit == "ms":
            return f"{value:.4g} ms" if value < 1000 else f"{value / 1000:.4g} s"
        return f"{value:.4g}"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    if unit == "ms":
        return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"
    return f"{value:.4g}"


def _sourced(entry: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The (source, value) pairs of a :data:`REFERENCE` entry, in order (its note left out)."""
    return [(source, value) for source, value in entry.items() if source != "note"]


def _reference_cell(entry: Mapping[str, Any], unit: str, coord: str | None) -> str:
    """A metrics-table reference cell: "87% (paper); 84% (replication)", else the note or "-"."""
    values = [(s, v if coord is None else v.get(coord)) for s, v in _sourced(entry)]
    shown = [f"{_fmt(v, unit, published=True)} ({s})" for s, v in values if v is not None]
    return "; ".join(shown) or entry.get("note", "-")


def _device_name(device_info: Any) -> str:
    if isinstance(device_info, Mapping):
        for key in ("device_name", "name", "device"):
            if device_info.get(key):
                return str(device_info[key])
        return "unknown device"
    return str(device_info) if device_info else "unknown device"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A markdown table's lines."""
    return [
        f"| {' | '.join(header)} |",
        f"| {' | '.join('---' for _ in header)} |",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]


def _md_metrics(report: Mapping[str, Any]) -> list[str]:
    """The metrics section: a row per :data:`HEADLINE_METRICS` entry (per coordinate).

    Each row holds this run's value and the reference cell made from its :data:`REFERENCE`
    entry; the notes of entries whose values are shown follow the table.
    """
    rows, notes = [], []
    for key, metric in HEADLINE_METRICS.items():
        entry = REFERENCE.get(key, {})
        for coord in metric.coords or (None,):
            value = report[key] if coord is None or report[key] is None else report[key].get(coord)
            if value is None:
                ours = f"not measured ({report['missing'].get(key, 'missing')})"
            elif key == "success_rate" and report[SUCCESS_DETAIL] is not None:
                ours = success_text(report[SUCCESS_DETAIL]["successes"], report[SUCCESS_DETAIL]["episodes"])
            else:
                ours = _fmt(value, metric.unit)
            label = metric.label if coord is None else f"{metric.label}, {coord}"
            rows.append((label, ours, _reference_cell(entry, metric.unit, coord)))
        if _sourced(entry) and entry.get("note"):
            notes.append(f"- {metric.label}: {entry['note']}")
    lines = ["## Metrics", "", *_table(("metric", "this run", "reference (spec section 8)"), rows), ""]
    lines += _md_seed_runs(report)
    return lines + (["Reference notes:", "", *notes, ""] if notes else [])


def _md_seed_runs(report: Mapping[str, Any]) -> list[str]:
    """The line on an evaluation repeated over planner seeds (none for a single run)."""
    detail = report[SUCCESS_DETAIL]
    runs = detail and detail["seed_runs"]
    if not runs or runs["seeds"] < 2:
        return []
    return [f"Success rate {seed_runs_text(runs)}; the first run is the headline above.", ""]


# report.md's training table: (quantity, this run's cell from the formatted training_summary
# fields, REFERENCE key or None, that entry's "replication" values in words).
_TRAINING_ROWS: tuple[tuple[str, str, str | None, str], ...] = (
    ("train records logged (last step, last epoch)", "{train_records} ({last_step}, {last_epoch})", None, ""),
    (
        "SIGReg, first logged -> final (mean of last 100)",
        "{sigreg_loss_first} -> {sigreg_loss_final}",
        "sigreg_training",
        "~{start:g} -> ~{after_5_epochs:g} in 5 epochs, then flat",
    ),
    ("pred loss, final (mean of last 100)", "{pred_loss_final}", None, ""),
    (
        "pre-clip grad norm, median / max",
        "{grad_norm_median} / {grad_norm_max}",
        "grad_norm_preclip",
        "{median:g} / {max:g} over {steps:,} steps",
    ),
    (
        "validation pred / SIGReg / total, last",
        "{val_pred_loss_last} / {val_sigreg_loss_last} / {val_loss_last}",
        None,
        "",
    ),
    (
        "success during training, best (step) / last",
        "{success_rate_best} ({success_rate_best_step}) / {success_rate_last}",
        None,
        "",
    ),
)


def _md_training(report: Mapping[str, Any]) -> list[str]:
    """The training table from ``report["training"]`` (:data:`_TRAINING_ROWS`), or why it is missing."""
    train = report["training"]
    if train is None:
        return ["## Training", "", f"No training metrics: {report['training_missing']}.", ""]
    shown = {k: _fmt(v) for k, v in train.items()}
    shown["train_records"] = str(train["train_records"])
    for k in ("success_rate_best", "success_rate_last"):
        shown[k] = _fmt(train[k], "fraction")
    rows = [
        (label, ours.format(**shown), words.format(**REFERENCE[key]["replication"]) if key else "-")
        for label, ours, key, words in _TRAINING_ROWS
    ]
    skipped = report["metrics_lines_skipped"]
    source = f"From `{report['metrics_jsonl']}`" + (
        f" ({skipped} unreadable line(s) skipped)." if skipped else "."
    )
    table = _table(("quantity", "this run", "reference (replication)"), rows)
    return ["## Training", "", source, "", *table, ""]


def _md_stages(report: Mapping[str, Any]) -> list[str]:
    """The wall-clock table and the full-pipeline reference (``REFERENCE["pipeline_seconds"]``)."""
    rows = [
        (name, duration(s) if s is not None else "not run") for name, s in report["stages_seconds"].items()
    ]
    rows.append(("**total**", f"**{duration(report['total_seconds'])}**"))
    entry = REFERENCE["pipeline_seconds"]
    took = "; ".join(f"{duration(seconds)} ({source})" for source, seconds in _sourced(entry))
    reference = f"Reference: the full published pipeline took {took} -- {entry['note']}."
    return ["## Wall-clock per stage", "", *_table(("stage", "wall-clock"), rows), "", reference, ""]


def _markdown(report: dict[str, Any]) -> str:
    """report.md from the report dict: header, metrics, training, wall-clock, device, plots."""
    device = report["device"]
    lines = [
        "# LeWM Two-Room run report",
        "",
        f"Run `{report['run_dir']}`, preset **{report['preset']}**, on **{_device_name(device)}**; "
        f"written {report['created']} by lewm_fast {report['lewm_fast']}.",
        "",
        *_md_metrics(report),
        *_md_training(report),
        *_md_stages(report),
        "## Device",
        "",
        *([f"- {k}: {v}" for k, v in device.items()] if isinstance(device, Mapping) else [f"- {device}"]),
        "",
        "## Plots",
        "",
    ]
    for name, file in report["plots"].items():
        lines += [f"![{PLOTS[name][0]}]({file})", ""]
    lines += [f"- {name}: skipped ({why})" for name, why in report["plots_skipped"].items()]
    lines += [""] if lines[-1] else []
    lines += _md_episodes(report["episodes"])
    return "\n".join(lines).rstrip() + "\n"


def _md_episodes(part: Mapping[str, Any]) -> list[str]:
    """The episodes section: the grid and the animation with captions that say what is drawn."""
    lines = ["## Episodes", ""]
    if part.get("missing"):
        return lines + [f"No episode pictures: {part['missing']}.", ""]
    pictures, every = part["pictures"], part["steps_per_plan"]
    lines += [
        f"{part['successes']} of {part['episodes']} evaluated episodes reached the goal "
        f"({part['env_steps']} env steps run, a new plan every {every}). "
        f"{part['start_within_success']} of the {part['episodes']} start within the "
        f"{part['success_distance']:g} px success radius of their goal (success at step 1 unless "
        "that step leaves it).",
        "",
        f"The grid shows {part['grid_words']}, numbered in evaluation order, over the room "
        "(walls, door, borders): blue dot = start, blue X = end, green star = goal with its success "
        f"ring; blue line = the executed path, a square at every replan (every {every} env steps); "
        "wide orange band = the first plan's actions replayed in the true environment from the start, "
        "not stopped at the goal. The band is what the plan does, not what the model predicted (LeWM "
        "plans in embedding space and has no decoder); when every planned block is executed, as "
        "published, the executed path runs inside it until success or the next plan. Green frame = "
        "success, red = failure.",
        "",
    ]
    if "grid" in pictures:
        lines += [f"![evaluated episodes]({pictures['grid']})", ""]
    if "animation" in pictures:
        lines += [
            f"Step by step, {part['animated_words']}: the environment's own frames (red dot = the agent), "
            "the goal's success ring in green, the path so far in blue; the frame turns green at "
            "success, red at the end of a failure.",
            "",
            f"![evaluated episodes, step by step]({pictures['animation']})",
            "",
        ]
    lines += [f"- episodes {name}: skipped ({why})" for name, why in part["skipped"].items()]
    return lines
