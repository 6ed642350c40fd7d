"""The one-command pipeline: the smoke preset end to end (shrunk to CI size), stage reuse,
stage failures that keep earlier outputs, and configuration errors that name the key."""

import json
import re

import pytest
import torch

from lewm_fast import cli
from lewm_fast.pipeline import STAGES, PipelineError, RunConfig, default_preset, run_pipeline
from lewm_fast.plan import PlanConfig, read_episodes

# The smoke preset with fewer episodes and steps: the same code path, CI-sized; the eval stage
# repeats its evaluation over two planner seeds.
CI_SIZE = {
    "data.episodes": 60,
    "train.epochs": 2,
    "train.epoch_steps": 6,
    "train.batch_size": 8,
    "train.log_every": 3,
    "train.val_max_batches": 2,
    "probe.max_frames": 400,
    "probe.fresh_episodes": 16,
    "eval.episodes": 4,
    "eval.during_training": 2,
    "eval.num_samples": 16,
    "eval.n_steps": 2,
    "eval.topk": 4,
    "eval.seeds": 2,
}
METRICS = (
    "success_rate",
    "final_distance_mean",
    "plan_ms_median",
    "plan_ms_per_env",
    "probe_r2",
    "one_step_mse",
    "sigreg_heldout",
)


def _config(**extra):
    return RunConfig.preset_config("smoke").override({**CI_SIZE, **extra})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    logs = []
    report = run_pipeline(_config(), out, progress=False, log=logs.append)
    return out, report, logs


def test_smoke_pipeline_produces_every_metric(finished_run):
    out, report, _ = finished_run
    for key in METRICS:
        assert report[key] is not None, f"{key} missing: {report['missing'].get(key)}"
    assert set(report["probe_r2"]) == {"x", "y"}
    assert 0.0 <= report["success_rate"] <= 1.0
    evaluation = json.loads((out / "eval.json").read_text())
    detail = report["success_detail"]
    assert (detail["successes"], detail["episodes"]) == (evaluation["successes"], 4)
    assert detail["success_interval"] == evaluation["success_interval"]
    runs = evaluation["seed_runs"]["runs"]
    assert detail["seed_runs"]["seeds"] == 2 and [r["planner_seed"] for r in runs] == [42, 43]
    assert runs[0]["row"] == runs[1]["row"] == evaluation["per_episode"]["row"]
    md = (out / "report.md").read_text()
    assert f"| CEM success rate (Two-Room evaluation) | {100 * report['success_rate']:.1f}% (" in md
    assert "Success rate over 2 planner seeds 42, 43 (start rows of seed 42): " in md
    assert report["preset"] == "smoke" and report["device"]
    assert set(report["stages_seconds"]) == set(STAGES[:-1])
    for name in ("config.json", "report.json", "report.md", "probe.json", "eval.json", "train/metrics.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "train" / "model" / "weights.pt").is_file()
    for plot in ("losses", "grad_norm", "lr", "success"):
        assert (out / "plots" / f"{plot}.png").is_file(), plot
    saved = json.loads((out / "config.json").read_text())
    assert RunConfig.from_dict(saved) == _config()
    kinds = {json.loads(line)["kind"] for line in (out / "train" / "metrics.jsonl").read_text().splitlines()}
    assert {"train", "val", "eval"} <= kinds


def test_the_report_draws_the_evaluated_episodes(finished_run):
    out, report, _ = finished_run
    evaluation = json.loads((out / "eval.json").read_text())
    episodes = read_episodes(out / "episodes.npz")
    assert evaluation["episodes_file"] == str(out / "episodes.npz")
    assert episodes["xy"].shape == (4, evaluation["env_steps"] + 1, 2)
    assert episodes["success"].tolist() == evaluation["per_episode"]["success"]
    assert report["episodes"]["pictures"] == {"grid": "plots/episodes.png", "animation": "plots/episodes.gif"}
    assert (out / "plots" / "episodes.png").is_file() and (out / "plots" / "episodes.gif").is_file()
    md = (out / "report.md").read_text()
    assert "![evaluated episodes](plots/episodes.png)" in md and "plots/episodes.gif" in md
    assert "![planning success rate during training](plots/success.png)" in md


def test_finished_stages_are_reused(finished_run):
    out, report, _ = finished_run
    before = {s: (out / "stages" / f"{s}.json").read_text() for s in STAGES}
    logs = []
    again = run_pipeline(_config(), out, progress=False, log=logs.append)
    assert all(any(f"{s}: reusing" in line for line in logs) for s in STAGES)
    assert {s: (out / "stages" / f"{s}.json").read_text() for s in STAGES} == before
    assert again["success_rate"] == report["success_rate"]


def test_changed_later_stage_reruns_only_that_stage(finished_run, tmp_path):
    out, _, _ = finished_run
    logs = []
    run_pipeline(_config(**{"eval.num_samples": 8}), out, progress=False, log=logs.append)
    assert any("train: reusing" in line for line in logs)
    assert any(line.startswith("[pipeline] eval ...") for line in logs)


def test_changed_training_config_is_refused(finished_run):
    out, _, _ = finished_run
    with pytest.raises(ValueError, match="finished 'train' stage made with a different configuration"):
        run_pipeline(_config(**{"train.lr": 5e-4}), out, progress=False, log=lambda _: None)


def test_failing_stage_is_named_and_earlier_outputs_survive(tmp_path, monkeypatch):
    import lewm_fast.probe

    def broken(*args, **kwargs):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(lewm_fast.probe, "run_probes", broken)
    config = _config(**{"train.epochs": 1, "eval.during_training": 0})
    with pytest.raises(PipelineError, match="stage 'probe' failed: RuntimeError: probe exploded") as info:
        run_pipeline(config, tmp_path, progress=False, log=lambda _: None)
    assert info.value.stage == "probe"
    assert (tmp_path / "stages" / "data.json").is_file() and (tmp_path / "stages" / "train.json").is_file()
    assert not (tmp_path / "stages" / "probe.json").exists()
    assert (tmp_path / "train" / "model" / "weights.pt").is_file()

    monkeypatch.undo()
    logs = []
    run_pipeline(config, tmp_path, progress=False, log=logs.append)
    assert any("data: reusing" in line for line in logs) and any("train: reusing" in line for line in logs)
    assert (tmp_path / "report.json").is_file()


@pytest.mark.parametrize(
    "values,match",
    [
        ({"train.bogus": 1}, "unknown TrainConfig key 'bogus'"),
        ({"eval.nope": 1}, r"unknown pipeline config key\(s\) \['eval.nope'\]"),
        ({"decoder.depth": 2}, "unknown pipeline config key 'decoder.depth'"),
        ({"model.predictor.depth": 0}, "predictor.depth must be a positive integer"),
        ({"data.policy": "greedy"}, "data.policy must be 'expert' or 'random'"),
        ({"eval.topk": 1}, "eval.topk must be an integer >= 2"),
        ({"device": "tpu"}, "device must be 'auto', 'cpu' or 'cuda"),
        ({"eval.max_batch": 0}, "eval.max_batch must be a positive integer, 'auto' or null"),
        ({"eval.seeds": 0}, "eval.seeds must be an integer >= 1, got 0"),
        ({"eval.vary_start_seed": "maybe"}, "eval.vary_start_seed must be true or false"),
        ({"train.bn_recalibrate": "-1"}, "TrainConfig.bn_recalibrate must be an integer >= 0"),
    ],
    ids=[
        "train-key",
        "eval-key",
        "section",
        "model-value",
        "data-value",
        "eval-value",
        "device",
        "rows",
        "seeds",
        "vary-start-seed",
        "bn",
    ],
)
def test_bad_config_keys_and_values_are_named(values, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.preset_config("smoke").override(values)


def test_unknown_preset_and_config_file(tmp_path):
    with pytest.raises(ValueError, match="unknown pipeline preset 'huge'"):
        RunConfig.preset_config("huge")
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps({"preset": "smoke", "train": {"epochs": 1, "model": {"predictor": {"depth": 1}}}})
    )
    config = RunConfig.from_file(path)
    assert config.train.epochs == 1 and config.train.model.predictor.depth == 1
    path.write_text(json.dumps({"preset": "smoke", "eval": {"bogus": 1}}))
    with pytest.raises(ValueError, match=r"run.json: unknown pipeline config key\(s\) \['eval.bogus'\]"):
        RunConfig.from_file(path)
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        RunConfig.from_file(path)


def test_presets():
    assert default_preset() == ("gpu-short" if torch.cuda.is_available() else "cpu")
    paper = RunConfig.preset_config("paper")
    assert paper.train.epochs == 100 and paper.data.episodes == 10_000 and paper.eval.num_samples == 300
    smoke = RunConfig.preset_config("smoke")
    assert smoke.device == "cpu" and smoke.train.model.encoder.image_size == 56
    assert RunConfig.preset_config("gpu-short").device == "cuda"
    assert smoke.train.bn_recalibrate == 4
    assert smoke.override({"train.bn_recalibrate": "8"}).train.bn_recalibrate == 8  # as from --set
    cpu = RunConfig.preset_config("cpu")
    assert cpu.device == "cpu" and cpu.train.model.encoder.image_size == 56 and cpu.eval.seeds == 3
    published = PlanConfig()
    for name in ("episodes", "num_samples", "n_steps", "topk", "horizon", "budget", "goal_offset", "seed"):
        assert getattr(cpu.eval, name) == getattr(published, name), name  # the published evaluation
    for name in ("paper", "cpu", "smoke", "gpu-short"):
        config = RunConfig.preset_config(name)
        assert RunConfig.from_dict(config.to_dict()) == config


def test_cli_runs_the_pipeline_and_reports_errors(tmp_path, capsys):
    args = ["pipeline", "--preset", "smoke", "--out", str(tmp_path), "--no-progress"]
    sets = [f"{k}={v}" for k, v in {**CI_SIZE, "train.epochs": 1, "eval.during_training": 0}.items()]
    for item in sets:
        args += ["--set", item]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "lewm-fast pipeline (smoke): success" in out and "report.md" in out
    assert re.search(r"plan [0-9.]+ (ms|s) per episode \([0-9.]+ (ms|s) per batched plan\)", out), out
    report = json.loads((tmp_path / "report.json").read_text())
    assert f"/4, 95% CI [{100 * report['success_detail']['success_interval'][0]:.1f}%, " in out
    assert "lewm-fast pipeline: success over 2 planner seeds 42, 43 (start rows of seed 42): " in out
    with pytest.raises(SystemExit, match="unknown TrainConfig key 'bogus'"):
        cli.main(["pipeline", "--preset", "smoke", "--out", str(tmp_path / "x"), "--set", "train.bogus=1"])
    with pytest.raises(SystemExit, match="--set takes key=value pairs"):
        cli.main(["pipeline", "--preset", "smoke", "--out", str(tmp_path / "y"), "--set", "nonsense"])
