"""Projected wall-clock of the paper-recipe pipeline on the benchmarked device, from measured rows.

    train  = step time at batch 128 x 5,138 steps per epoch (spec section 8) x epochs (10, 100)
    eval   = the 50-episode Two-Room evaluation (spec section 6)
    total  = train + eval   (data generation and probes are left out: seconds, not hours)

Inputs are benchmark rows (``Row`` objects or their JSON dicts), nothing else:

- training: rows with ``bench == "train"`` and ``phase == "step"`` whose batch is 128 --
  the batch is read from the ``samples/s`` (or ``windows/s``) metric x step time or,
  failing that, from ``B=128`` / ``batch 128`` in the case name; rows at other batch
  sizes are not rescaled;
- evaluation: rows with ``bench == "eval"`` and ``phase == "eval"`` (``median_ms`` = one
  whole 50-episode evaluation) when present; otherwise plan latencies at the published
  CEM setting (``bench == "plan"``, case ``"... S=300, 30 it"``): an episode has a
  50-step budget and replans every 25 steps, so at most 2 plans per episode --
  reference: 100 one-env plans one after the other; fast: 2 plans of all 50 envs
  together (or 100 one-env plans when only the one-env case was measured). Plan time
  only (environment steps and rendering are left out); episodes that reach the goal
  early need fewer plans.

"reference" uses the rows with ``impl == "reference"``, "fast" the fastest other
implementation. A quantity with no row is "not measured" -- never estimated otherwise.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "STEPS_PER_EPOCH",
    "EPOCHS",
    "EVAL_EPISODES",
    "PLANS_PER_EPISODE",
    "row_batch",
    "project",
    "projection_markdown",
]

STEPS_PER_EPOCH = 5138  # 730,809 windows x 90% / batch 128 (spec section 8)
BATCH = 128
EPOCHS = (10, 100)  # the authors stop at 10; the published config says 100
EVAL_EPISODES = 50
PLANS_PER_EPISODE = 2  # 50-step budget / (5 blocks x 5 env steps) per plan
PUBLISHED_PLAN = "S=300, 30 it"
REPLICATION_SECONDS = 15 * 3600 + 12 * 60  # RTX 3060 Ti, train 100 epochs + probe + eval

_BATCH_IN_CASE = re.compile(r"(?:\bB\s*=\s*|\bbatch[\s_=-]*)(\d+)", re.IGNORECASE)


def _as_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, Mapping):
        return dict(row)
    if dataclasses.is_dataclass(row):
        return dataclasses.asdict(row)
    raise ValueError(f"a benchmark row must be a Row or a dict, got {type(row).__name__}")


def row_batch(row: Mapping[str, Any]) -> int | None:
    """Batch size of a training-step row: samples/s (or windows/s) x median step time, else
    ``B=<n>`` / ``batch <n>`` in the case name; None when neither says."""
    metrics = row.get("metrics") or {}
    rate = metrics.get("samples/s", metrics.get("windows/s"))
    ms = row.get("median_ms")
    if isinstance(rate, (int, float)) and isinstance(ms, (int, float)) and rate > 0 and ms > 0:
        return int(round(rate * ms / 1e3))
    match = _BATCH_IN_CASE.search(str(row.get("case", "")))
    return int(match.group(1)) if match else None


def _best(rows: list[dict[str, Any]], reference: bool) -> dict[str, Any] | None:
    chosen = [r for r in rows if (r["impl"] == "reference") == reference and r.get("median_ms", 0) > 0]
    return min(chosen, key=lambda r: r["median_ms"]) if chosen else None


def _eval_estimate(rows: list[dict[str, Any]], reference: bool) -> dict[str, Any] | None:
    """Seconds of one 50-episode evaluation and how they were obtained, or None."""
    whole = _best([r for r in rows if r["bench"] == "eval" and r.get("phase") == "eval"], reference)
    if whole is not None:
        return {
            "seconds": whole["median_ms"] / 1e3,
            "impl": whole["impl"],
            "source": f"eval row '{whole['case']}'",
        }
    plans = [r for r in rows if r["bench"] == "plan" and r.get("phase") == "plan"]
    plans = [r for r in plans if PUBLISHED_PLAN in str(r["case"]) and not str(r["case"]).startswith("sweep")]
    together = _best([r for r in plans if str(r["case"]).startswith(f"{EVAL_EPISODES} envs")], reference)
    if together is not None and not reference:
        return {
            "seconds": PLANS_PER_EPISODE * together["median_ms"] / 1e3,
            "impl": together["impl"],
            "source": f"{PLANS_PER_EPISODE} x plan '{together['case']}' (all episodes planned together)",
        }
    single = _best([r for r in plans if str(r["case"]).startswith("1 env,")], reference)
    if single is not None:
        count = EVAL_EPISODES * PLANS_PER_EPISODE
        return {
            "seconds": count * single["median_ms"] / 1e3,
            "impl": single["impl"],
            "source": f"{count} x plan '{single['case']}' (one env after the other)",
        }
    return None


def project(
    rows: Iterable[Any], *, steps_per_epoch: int = STEPS_PER_EPOCH, epochs: Iterable[int] = EPOCHS
) -> dict[str, Any]:
    """Projection of the pipeline's wall-clock from benchmark ``rows`` (see the module docstring).

    Returns a JSON-serialisable dict: ``assumptions``; ``reference`` and ``fast``, each
    with ``train`` {impl, case, step_ms, batch, seconds {epochs: s}} or None,
    ``eval`` {seconds, impl, source} or None, ``total_seconds`` {epochs: s} or None (only
    when both parts were measured), and ``missing`` (what was not measured and why).
    """
    rows = [_as_dict(r) for r in rows]
    epochs = tuple(int(e) for e in epochs)
    if steps_per_epoch < 1 or not epochs or min(epochs) < 1:
        raise ValueError(f"steps_per_epoch and epochs must be positive, got {steps_per_epoch}, {epochs}")
    steps = [r for r in rows if r["bench"] == "train" and r.get("phase") == "step"]
    at_batch = [r for r in steps if row_batch(r) == BATCH]
    out: dict[str, Any] = {
        "assumptions": {
            "steps_per_epoch": steps_per_epoch,
            "batch": BATCH,
            "epochs": list(epochs),
            "eval_episodes": EVAL_EPISODES,
            "plans_per_episode": PLANS_PER_EPISODE,
            "left_out": "data generation and probes",
        }
    }
    for side, reference in (("reference", True), ("fast", False)):
        best = _best(at_batch, reference)
        missing = []
        train = None
        if best is None:
            other = sorted({row_batch(r) for r in steps if (r["impl"] == "reference") == reference}, key=str)
            missing.append(
                "training: no bench=train/phase=step row at batch 128"
                + (f" (rows at batch {other} are not rescaled)" if other else "")
            )
        else:
            train = {
                "impl": best["impl"],
                "case": best["case"],
                "step_ms": best["median_ms"],
                "batch": BATCH,
                "seconds": {str(e): best["median_ms"] / 1e3 * steps_per_epoch * e for e in epochs},
            }
        evaluation = _eval_estimate(rows, reference)
        if evaluation is None:
            missing.append("evaluation: no eval row and no plan row at the published setting (S=300, 30 it)")
        total = None
        if train is not None and evaluation is not None:
            total = {str(e): train["seconds"][str(e)] + evaluation["seconds"] for e in epochs}
        out[side] = {"train": train, "eval": evaluation, "total_seconds": total, "missing": missing}
    return out


def _hours(seconds: float | None, missing: str = "not measured") -> str:
    if seconds is None:
        return missing
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def projection_markdown(projection: Mapping[str, Any], env: Mapping[str, Any] | None = None) -> str:
    """Markdown section for a :func:`project` result (``env``: the run's environment, for caveats)."""
    a = projection["assumptions"]
    epochs = [str(e) for e in a["epochs"]]
    lines = [
        "### Projected paper-recipe pipeline wall-clock",
        "",
        f"Measured step time at batch {a['batch']} x {a['steps_per_epoch']:,} steps per epoch x epochs, "
        f"plus the {a['eval_episodes']}-episode evaluation ({a['left_out']} left out).",
        "",
    ]
    header = ["path", "train step"] + [f"train {e} epochs" for e in epochs]
    header += ["evaluation"] + [f"total ({e} epochs)" for e in epochs]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for side in ("reference", "fast"):
        p = projection[side]
        train, evaluation, total = p["train"], p["eval"], p["total_seconds"]
        step = "not measured" if train is None else f"{train['step_ms']:.1f} ms ({train['impl']})"
        train_cells = [_hours(None if train is None else train["seconds"][e]) for e in epochs]
        eval_cell = "not measured"
        if evaluation is not None:
            eval_cell = f"{_hours(evaluation['seconds'])} ({evaluation['impl']})"
        total_cells = [_hours(None if total is None else total[e]) for e in epochs]
        lines.append("| " + " | ".join([side, step, *train_cells, eval_cell, *total_cells]) + " |")
    lines.append("")
    for side in ("reference", "fast"):
        p = projection[side]
        if p["eval"] is not None:
            lines.append(f"- {side} evaluation: {p['eval']['source']}.")
        for why in p["missing"]:
            lines.append(f"- {side}: not measured -- {why}.")
    if env is not None and env.get("device_type") != "cuda":
        lines.append(
            "- On a CPU the benchmarks run reduced models and settings; this is not the paper model's time."
        )
    lines.append("- Reference point: 15 h 12 min for the whole pipeline (100 epochs) on one RTX 3060 Ti.")
    return "\n".join(lines) + "\n"
