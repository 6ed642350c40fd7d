"""Run report (lewm_fast.report): report.json / report.md contents, missing metrics, plots
from a synthetic metrics.jsonl, tolerance to bad lines, missing kinds and no matplotlib."""

import json
import math
import sys

import pytest

from lewm_fast import report as rp

STAGES = {"generate-data": 12.5, "train": 3725.0, "probe": 31.0, "eval": 9.0}
DEVICE = {"device_name": "Test GPU 80GB", "driver": "555.1", "memory_total_bytes": 80 * 2**30}
METRICS = {
    "success_rate": 0.62,
    "final_distance_mean": 14.5,
    "plan_ms_median": 45.25,
    "plan_ms_per_env": 0.905,
    "probe_r2": {"x": 0.91, "y": 0.72},
    "one_step_mse": 0.071,
    "sigreg_heldout": 2.4,
    "linear_probe": {"alpha": 1e-3, "test_episodes": 2000},
}


def _write_jsonl(path, kinds=("train", "val", "eval"), steps=300, extra_lines=()):
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            if "train" in kinds:
                sig = 13.0 * math.exp(-step / 40) + 1.7
                record = {
                    "kind": "train",
                    "step": step,
                    "epoch": step // 100,
                    "pred_loss": 1.0 / math.sqrt(step),
                    "sigreg_loss": sig,
                    "loss": 1.0 / math.sqrt(step) + 0.09 * sig,
                    "grad_norm": 1.0 + (step % 7),
                    "lr": 5e-5 * min(1.0, step / 30),
                    "samples_per_s": 100.0,
                }
                f.write(json.dumps(record) + "\n")
            if step % 100 == 0:
                if "val" in kinds:
                    val = {"kind": "val", "step": step, "epoch": step // 100}
                    f.write(json.dumps({**val, "pred_loss": 0.5, "sigreg_loss": 2.0, "loss": 0.68}) + "\n")
                if "eval" in kinds:
                    f.write(json.dumps({"kind": "eval", "step": step, "success_rate": step / 500}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_full_report(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", extra_lines=["", "[1, 2]", '{"kind": "train", "step": 30'])
    out = rp.write_report(tmp_path, METRICS, stages_seconds=STAGES, device_info=DEVICE, preset="smoke")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data == out
    for key in ("success_rate", "final_distance_mean", "plan_ms_median", "one_step_mse", "sigreg_heldout"):
        assert data[key] == METRICS[key]
    assert data["probe_r2"] == {"x": 0.91, "y": 0.72} and data["missing"] == {}
    assert data["stages_seconds"] == STAGES and data["total_seconds"] == pytest.approx(sum(STAGES.values()))
    assert data["device"] == DEVICE and data["preset"] == "smoke"
    assert data["reference"]["probe_r2"]["replication"] == {"x": 0.873, "y": 0.674}
    assert data["details"]["linear_probe"]["alpha"] == 1e-3
    assert data["metrics_lines_skipped"] == 2  # the array line and the cut-off line; blanks are fine

    train = data["training"]
    assert train["train_records"] == 300 and train["last_step"] == 300 and train["last_epoch"] == 3
    assert train["sigreg_loss_first"] == pytest.approx(13.0 * math.exp(-1 / 40) + 1.7)
    assert train["grad_norm_max"] == 7.0 and train["grad_norm_median"] == 4.0
    assert train["success_rate_best"] == 0.6 and train["success_rate_best_step"] == 300
    assert train["val_loss_last"] == 0.68

    assert data["plots"] == {name: f"plots/{name}.png" for name in rp.PLOTS} and data["plots_skipped"] == {}
    for file in data["plots"].values():
        assert (tmp_path / file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = (tmp_path / "report.md").read_text()
    assert "| CEM success rate (Two-Room evaluation) | 62.0% | 87% (paper); 84% (replication) |" in md
    assert "| linear probe R^2, x | 0.91 | 0.873 (replication) |" in md
    assert "| 1-step predictor MSE on fresh rollouts | 0.071 | 0.068 (replication) |" in md
    assert "| train | 1 h 02 min |" in md and "15 h 12 min" in md and "Test GPU 80GB" in md
    assert "![pre-clip gradient norm](plots/grad_norm.png)" in md
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / "plots").glob(".*tmp*"))


def test_missing_metrics_are_null_with_a_reason(tmp_path):
    metrics = {"success_rate": float("nan"), "probe_r2": {"x": 0.8}, "one_step_mse": None, "bogus": 1}
    out = rp.write_report(
        tmp_path,
        metrics,
        stages_seconds={"generate-data": 1.0, "train": None},
        device_info="cpu",
        preset=None,
        reasons={"plan_ms_median": "eval stage failed: CUDA out of memory"},
    )
    assert out["success_rate"] is None and "not a finite number" in out["missing"]["success_rate"]
    assert out["probe_r2"] == {"x": 0.8, "y": None} and "y" in out["missing"]["probe_r2"]
    assert out["plan_ms_median"] is None
    assert out["missing"]["plan_ms_median"] == "eval stage failed: CUDA out of memory"
    assert set(out["missing"]) == {
        "success_rate",
        "final_distance_mean",
        "plan_ms_median",
        "plan_ms_per_env",
        "probe_r2",
        "one_step_mse",
        "sigreg_heldout",
    }
    assert out["training"] is None and "metrics.jsonl not found" in out["training_missing"]
    assert set(out["plots_skipped"]) == set(rp.PLOTS) and out["plots"] == {}
    assert out["stages_seconds"] == {"generate-data": 1.0, "train": None} and out["total_seconds"] == 1.0
    json.loads((tmp_path / "report.json").read_text())  # strict JSON: no NaN literal
    md = (tmp_path / "report.md").read_text()
    assert "not measured (eval stage failed: CUDA out of memory)" in md
    assert "| train | not run |" in md and "No training metrics" in md


def test_missing_kinds_skip_only_their_plots(tmp_path):
    jsonl = _write_jsonl(tmp_path / "log.jsonl", kinds=("train",), steps=50)
    out = rp.write_report(
        tmp_path / "run", {}, stages_seconds=None, device_info=None, preset="x", metrics_jsonl=jsonl
    )
    assert set(out["plots"]) == {"losses", "grad_norm", "lr"}
    assert "eval records with 'success_rate'" in out["plots_skipped"]["success"]
    assert out["training"]["success_rate_best"] is None and out["total_seconds"] is None
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "plots" / "lr.png").is_file()


def test_records_without_keys_or_steps(tmp_path):
    lines = [
        json.dumps({"kind": "train", "pred_loss": 1.0}),  # no step: plotted at its index
        json.dumps({"kind": "train", "pred_loss": 0.5, "grad_norm": "n/a"}),
        json.dumps({"step": 3, "loss": 1.0}),  # no kind
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    records, skipped = rp.read_metrics(tmp_path / "metrics.jsonl")
    assert skipped == 0 and len(records["train"]) == 2 and len(records["unknown"]) == 1
    out = rp.write_report(tmp_path, {}, stages_seconds={}, device_info="cpu", preset="p")
    assert list(out["plots"]) == ["losses"] and out["training"]["grad_norm_median"] is None


def test_report_without_matplotlib(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _write_jsonl(tmp_path / "metrics.jsonl", steps=100)
    out = rp.write_report(tmp_path, METRICS, stages_seconds=STAGES, device_info=DEVICE, preset="smoke")
    assert out["plots"] == {}
    assert all("matplotlib is not installed" in why for why in out["plots_skipped"].values())
    assert out["training"]["train_records"] == 100
    assert "skipped (matplotlib is not installed" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metrics": [1]}, "metrics must be a mapping"),
        ({"stages_seconds": {"train": -1.0}}, "stages_seconds"),
        ({"stages_seconds": {"train": "soon"}}, "stages_seconds"),
        ({"stages_seconds": [1.0]}, "stages_seconds"),
        ({"reasons": ["x"]}, "reasons"),
        (
            {"metrics": {"success_detail": {"successes": 51, "episodes": 50}}},
            r"success_detail'\]: successes \(51\) must not exceed trials \(50\)",
        ),
        ({"metrics": {"success_detail": {"successes": 3}}}, r"success_detail'\]: trials must be an integer"),
        ({"metrics": {"success_detail": 0.62}}, r"success_detail'\] must be a mapping"),
        (
            {"metrics": {"success_detail": {"successes": 3, "episodes": 5, "seed_runs": {"seeds": 2}}}},
            "must be the seed_runs of an evaluation result",
        ),
    ],
    ids=[
        "metrics",
        "negative-stage",
        "text-stage",
        "stage-list",
        "reasons",
        "more-successes",
        "no-episodes",
        "detail-number",
        "seed-runs",
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"metrics": {}, "stages_seconds": {}, "device_info": "cpu", "preset": "p", **kwargs}
    with pytest.raises(ValueError, match=match):
        rp.write_report(tmp_path, **args)
    assert not (tmp_path / "report.json").exists()


def test_duration_format():
    assert rp.duration(12.34) == "12.3 s"
    assert rp.duration(185) == "3 min 05 s"
    assert rp.duration(15 * 3600 + 12 * 60) == "15 h 12 min"
    assert rp.duration(None) == "-"


# ------------------------------------------------------------------ headline mapping
PROBES = {"probe_r2": {"x": 0.91, "y": 0.72}, "one_step_mse": 0.071, "sigreg_heldout": 2.4, "seed": 0}
EVALUATION = {
    "success_rate": 0.62,
    "final_distance_mean": 14.5,
    "plan_latency_ms": {"median": 45.25, "p90": 61.0, "median_per_env": 0.905},
    "episodes": 50,
}


def test_headline_reads_each_metric_from_its_stage_result(tmp_path):
    metrics, reasons = rp.headline(PROBES, EVALUATION)
    assert metrics == {k: METRICS[k] for k in rp.HEADLINE_METRICS} and reasons == {}
    out = rp.write_report(tmp_path, metrics, stages_seconds=None, device_info="cpu", preset="p")
    assert out["missing"] == {} and out["details"] == {} and out["plan_ms_median"] == 45.25

    metrics, reasons = rp.headline(PROBES, None, absent="was disabled")
    eval_keys = {k for k, m in rp.HEADLINE_METRICS.items() if m.source == "eval"}
    assert eval_keys == {"success_rate", "final_distance_mean", "plan_ms_median", "plan_ms_per_env"}
    assert reasons == {k: "the eval stage was disabled" for k in eval_keys}
    assert all(metrics[k] is None for k in eval_keys) and metrics["one_step_mse"] == 0.071
    out = rp.write_report(
        tmp_path, metrics, stages_seconds=None, device_info="cpu", preset="p", reasons=reasons
    )
    assert out["missing"] == reasons

    # a result lacking a key (or holding a non-mapping on the way) gives None, not an error
    metrics, reasons = rp.headline({"seed": 0}, {"plan_latency_ms": None})
    assert all(v is None for v in metrics.values()) and reasons == {}
    assert rp.headline(None, None)[1]["probe_r2"] == "the probe stage did not run"


def test_headline_metric_refuses_unknown_source_or_unit():
    with pytest.raises(ValueError, match="source must be 'probe' or 'eval'"):
        rp.HeadlineMetric("x", "train", ("x",))
    with pytest.raises(ValueError, match="unit must be"):
        rp.HeadlineMetric("x", "eval", ("x",), "seconds")


# ------------------------------------------------------------------ tables from REFERENCE
def _body(folder):
    """report.md without its header line (which names the time it was written)."""
    return [line for line in (folder / "report.md").read_text().splitlines() if "written" not in line]


def _changed(value):
    if isinstance(value, dict):
        return {k: _changed(v) for k, v in value.items()}
    return value + " (changed)" if isinstance(value, str) else 2 * value


def test_reference_cells_are_made_from_reference(tmp_path, monkeypatch):
    _write_jsonl(tmp_path / "metrics.jsonl", steps=50)
    monkeypatch.setitem(rp.REFERENCE, "one_step_mse", {"paper": 0.05, "replication": 0.07, "note": "made up"})
    monkeypatch.setitem(
        rp.REFERENCE, "grad_norm_preclip", {"replication": {"median": 2, "max": 20, "steps": 1000}}
    )
    monkeypatch.setitem(rp.REFERENCE, "pipeline_seconds", {"replication": 3600, "note": "one hour"})
    rp.write_report(tmp_path, METRICS, stages_seconds=STAGES, device_info=DEVICE, preset="smoke")
    md = (tmp_path / "report.md").read_text()
    assert "| 1-step predictor MSE on fresh rollouts | 0.071 | 0.05 (paper); 0.07 (replication) |" in md
    assert "- 1-step predictor MSE on fresh rollouts: made up" in md
    assert "| 2 / 20 over 1,000 steps |" in md
    assert "the full published pipeline took 1 h 00 min (replication) -- one hour." in md


def test_a_new_headline_metric_with_a_reference_adds_a_row(tmp_path, monkeypatch):
    metric = rp.HeadlineMetric("planning time per plan, p90", "eval", ("plan_latency_ms", "p90"), "ms")
    monkeypatch.setitem(rp.HEADLINE_METRICS, "plan_ms_p90", metric)
    monkeypatch.setitem(rp.REFERENCE, "plan_ms_p90", {"paper": 2200.0})
    metrics, _ = rp.headline(PROBES, EVALUATION)
    assert metrics["plan_ms_p90"] == 61.0
    out = rp.write_report(tmp_path, metrics, stages_seconds=None, device_info="cpu", preset="p")
    assert out["plan_ms_p90"] == 61.0 and out["reference"]["plan_ms_p90"] == {"paper": 2200.0}
    assert "| planning time per plan, p90 | 61.0 ms | 2.2 s (paper) |" in (tmp_path / "report.md").read_text()


def test_every_reference_entry_shows_in_the_markdown(tmp_path, monkeypatch):
    """No REFERENCE entry is dead: changing any one of them changes report.md."""
    _write_jsonl(tmp_path / "metrics.jsonl", steps=50)
    args = {"stages_seconds": STAGES, "device_info": DEVICE, "preset": "smoke"}
    rp.write_report(tmp_path, METRICS, **args)
    before = _body(tmp_path)
    for key, entry in list(rp.REFERENCE.items()):
        with monkeypatch.context() as m:
            m.setitem(rp.REFERENCE, key, _changed(entry))
            rp.write_report(tmp_path, METRICS, **args)
            assert _body(tmp_path) != before, key


# ------------------------------------------------------------------ success with its uncertainty
def _seed_runs(successes, episodes=50, vary=False):
    """An evaluation's ``seed_runs`` (lewm_fast.plan.evaluate) for runs with these success counts."""
    rates = [k / episodes for k in successes]
    mean = sum(rates) / len(rates)
    std = math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1)) if len(rates) > 1 else None
    total, pooled_episodes = sum(successes), episodes * len(successes)
    return {
        "seeds": len(successes),
        "vary_start_seed": vary,
        "runs": [
            {
                "planner_seed": 42 + k,
                "seed": 42 + k * vary,
                "successes": n,
                "episodes": episodes,
                "success_rate": r,
            }
            for k, (n, r) in enumerate(zip(successes, rates))
        ],
        "success_rate_mean": mean,
        "success_rate_std": std,
        "success_rate_min": min(rates),
        "success_rate_max": max(rates),
        "pooled": {"successes": total, "episodes": pooled_episodes, "success_rate": total / pooled_episodes},
    }


def test_success_rate_with_its_interval_and_the_seed_runs(tmp_path):
    """The headline success row carries the counts and the 95% Wilson interval (31/50: bounds
    0.48150, 0.74137, bisected independently); a repeated evaluation adds a line on its runs."""
    evaluation = {**EVALUATION, "successes": 31, "seed_runs": _seed_runs((31, 28, 34))}
    metrics, _ = rp.headline(PROBES, evaluation)
    assert metrics["success_detail"] == {
        "successes": 31,
        "episodes": 50,
        "seed_runs": evaluation["seed_runs"],
    }
    out = rp.write_report(tmp_path, metrics, stages_seconds=None, device_info="cpu", preset="p")
    detail = out["success_detail"]
    assert detail["success_interval"] == pytest.approx([0.4815019502239357, 0.7413740415742278], abs=1e-12)
    assert detail["seed_runs"]["pooled"]["successes"] == 93 and "success_detail" not in out["details"]
    assert json.loads((tmp_path / "report.json").read_text())["success_detail"] == detail
    md = (tmp_path / "report.md").read_text()
    row = "| CEM success rate (Two-Room evaluation) | 62.0% (31/50, 95% CI [48.2%, 74.1%]) | 87% (paper)"
    assert row in md
    assert (
        "Success rate over 3 planner seeds 42, 43, 44 (start rows of seed 42): 62.0%, 56.0%, 68.0%; "
        "mean 62.0%, std 6.0 points, min 56.0%, max 68.0%; pooled 62.0% (93/150, 95% CI [54.0%, 69.4%]); "
        "the first run is the headline above."
    ) in md
    assert "- CEM success rate (Two-Room evaluation): replication: 84.0% (42/50, 95% CI [71.5%, 91.7%])" in md

    # start rows varied with the planner seed: said so, as it departs from the published protocol
    varied = {**evaluation, "seed_runs": _seed_runs((31, 28, 34), vary=True)}
    rp.write_report(
        tmp_path, rp.headline(PROBES, varied)[0], stages_seconds=None, device_info="cpu", preset="p"
    )
    md = (tmp_path / "report.md").read_text()
    assert "(start-row seeds 42, 43, 44, not the published protocol)" in md
    # one run: the interval, no line on runs
    single = {**EVALUATION, "successes": 31, "seed_runs": _seed_runs((31,))}
    rp.write_report(
        tmp_path, rp.headline(PROBES, single)[0], stages_seconds=None, device_info="cpu", preset="p"
    )
    md = (tmp_path / "report.md").read_text()
    assert row in md and "planner seeds" not in md


# ------------------------------------------------------------------ success during training
def test_success_plot_carries_each_evaluations_wilson_interval(tmp_path):
    from lewm_fast.stats import wilson_interval

    evals = [
        {"kind": "eval", "step": 100, "success_rate": 0.25, "successes": 5, "episodes": 20},
        {"kind": "eval", "step": 200, "success_rate": 0.5, "successes": 10, "episodes": 20},
        {"kind": "eval", "step": 300, "success_rate": 0.5},  # no counts: a point without a bar
    ]
    xs, lo, hi, label = rp._success_intervals(evals)
    assert xs == [100.0, 200.0] and label == "95% Wilson interval (20 episodes each)"
    assert (lo[0], hi[0]) == wilson_interval(5, 20) and (lo[1], hi[1]) == wilson_interval(10, 20)
    assert rp._success_intervals([*evals, {"step": 400, "successes": 3, "episodes": 50}])[3].endswith(
        "(episodes vary)"
    )
    assert rp._success_intervals(evals[2:]) is None

    # the same curve without the counts: the bars are the only difference
    bare = [{k: v for k, v in r.items() if k not in ("successes", "episodes")} for r in evals]
    for folder, records in ((tmp_path / "bars", evals), (tmp_path / "bare", bare)):
        assert rp.write_plots({"eval": records}, folder)[0] == {"success": "success.png"}
    pictures = [(tmp_path / folder / "success.png").read_bytes() for folder in ("bars", "bare")]
    assert pictures[0] != pictures[1]
