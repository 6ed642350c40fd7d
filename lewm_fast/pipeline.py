"""The one-command Two-Room pipeline: data -> train -> probe -> eval -> report.

``lewm-fast pipeline [--preset NAME] [--out DIR] [--set key=value ...] [--config FILE]``
(or :func:`run_pipeline`) runs every stage in one run folder::

    DIR/config.json          the effective RunConfig
    DIR/data/                the generated dataset (states; frames are rendered on the device)
    DIR/train/               metrics.jsonl, checkpoints/, model/ (and best_model/)
    DIR/probe.json           linear probe R^2, 1-step MSE on fresh rollouts, held-out SIGReg
    DIR/eval.json            the published 50-episode planning evaluation
    DIR/episodes.npz         its episodes' paths: positions per env step, the first plan
    DIR/report.json, report.md, plots/ (training curves, episodes.png, episodes.gif)
    DIR/stages/<stage>.json  what each finished stage produced, its time and fingerprint

A stage whose record exists with the same fingerprint (its configuration and those of the
stages it reads) is reused, not recomputed; an interrupted training run is resumed from its
newest checkpoint. A failing stage raises :class:`PipelineError` naming it and leaves every
earlier stage's output in place. Presets: ``paper`` (published settings), ``cpu`` (the
default without a GPU: a small model that learns Two-Room on 2 CPU cores, evaluated with
the published protocol and planner), ``smoke`` (a smaller, weaker run that checks the
plumbing; CI's), ``gpu-short`` (the paper model for a few minutes on one data-centre GPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import _checks
from ._io import write_json_atomic
from .config import LeWMConfig, parse_value
from .plan.config import PlanConfig
from .report import EPISODES_FILE
from .sysinfo import environment
from .train.config import TrainConfig

__all__ = [
    "DataConfig",
    "ProbeConfig",
    "EvalConfig",
    "RunConfig",
    "RUN_PRESETS",
    "PipelineError",
    "STAGES",
    "run_pipeline",
    "default_preset",
]

STAGES = ("data", "train", "probe", "eval", "report")


@dataclass(frozen=True)
class DataConfig:
    """The Two-Room dataset the run generates (see ``lewm_fast.data.generate_dataset``)."""

    episodes: int = 10_000
    policy: str = "expert"
    seed: int = 0
    max_steps: int = 100
    frames: bool = False

    def __post_init__(self) -> None:
        _checks.integer(self.episodes, "data.episodes", 1)
        _checks.integer(self.seed, "data.seed", 0)
        _checks.integer(self.max_steps, "data.max_steps", 1)
        if self.policy not in ("expert", "random"):
            raise ValueError(f"data.policy must be 'expert' or 'random', got {self.policy!r}")
        if not isinstance(self.frames, bool):
            raise ValueError(f"data.frames must be true or false, got {self.frames!r}")


@dataclass(frozen=True)
class ProbeConfig:
    """The probes (see ``lewm_fast.probe.run_probes``)."""

    enabled: bool = True
    seed: int = 0
    max_frames: int = 20_000
    fresh_episodes: int = 256
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"probe.enabled must be true or false, got {self.enabled!r}")
        _checks.integer(self.seed, "probe.seed", 0)
        for name in ("max_frames", "fresh_episodes", "batch_size"):
            _checks.integer(getattr(self, name), f"probe.{name}", 1)


@dataclass(frozen=True)
class EvalConfig(PlanConfig):
    """The planning evaluation: a :class:`~lewm_fast.plan.PlanConfig` (every planner and
    protocol setting, published values by default) with two pipeline switches.

    ``enabled`` runs the eval stage. ``during_training`` > 0 also evaluates on that many
    episodes after every ``train.eval_every_epochs`` epochs, which feeds the success curve
    and early stopping; those evaluations plan with the first planner seed only, whatever
    ``seeds`` says (``--set eval.seeds=3`` repeats the eval stage's evaluation).
    """

    _prefix: ClassVar[str] = "eval."

    enabled: bool = True
    during_training: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.enabled, bool):
            raise ValueError(f"eval.enabled must be true or false, got {self.enabled!r}")
        _checks.integer(self.during_training, "eval.during_training", 0)


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "probe": ProbeConfig, "eval": EvalConfig}


@dataclass(frozen=True)
class RunConfig:
    """Everything a pipeline run does. ``train.model`` is the LeWMConfig (``model.*`` keys
    in :meth:`override` are shorthand for ``train.model.*``)."""

    preset: str = "paper"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")
        ):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    @classmethod
    def preset_config(cls, name: str) -> RunConfig:
        """A named run: "paper", "cpu", "smoke" or "gpu-short"."""
        if name not in RUN_PRESETS:
            raise ValueError(f"unknown pipeline preset {name!r}; expected one of {sorted(RUN_PRESETS)}")
        return RUN_PRESETS[name]()

    def override(self, values: dict[str, Any]) -> RunConfig:
        """A copy with dotted-key overrides: ``{"train.epochs": 2, "model.predictor.depth": 4,
        "eval.num_samples": 64, "device": "cpu"}``. String values (as from ``--set``) are read
        as literals where they parse. Unknown keys raise ValueError naming the key."""
        grouped: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in values.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"config keys must be non-empty strings, got {key!r}")
            if key.startswith("model."):
                key = "train." + key
            section, _, rest = key.partition(".")
            if section in ("preset", "device") and not rest:
                top[section] = parse_value(value)
            elif section in _SECTIONS and rest:
                grouped.setdefault(section, {})[rest] = value
            else:
                raise ValueError(
                    f"unknown pipeline config key {key!r}; expected preset, device, or one of "
                    f"{sorted(_SECTIONS)} followed by .<field> (model.* for the model)"
                )
        updates: dict[str, Any] = dict(top)
        for section, items in grouped.items():
            current = getattr(self, section)
            if section == "train":
                updates[section] = current.override(items)
                continue
            names = {f.name for f in fields(current)}
            unknown = sorted(k for k in items if k not in names)
            if unknown:
                raise ValueError(
                    f"unknown pipeline config key(s) {[f'{section}.{k}' for k in unknown]}; "
                    f"{section} has {sorted(names)}"
                )
            updates[section] = dataclasses.replace(current, **{k: parse_value(v) for k, v in items.items()})
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "device": self.device,
            "data": dataclasses.asdict(self.data),
            "train": self.train.to_dict(),
            "probe": dataclasses.asdict(self.probe),
            "eval": dataclasses.asdict(self.eval),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The inverse of :meth:`to_dict`; a partial dict starts from its ``preset`` (default paper)."""
        if not isinstance(data, dict):
            raise ValueError(f"a pipeline config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"preset", "device", *_SECTIONS})
        if unknown:
            raise ValueError(f"unknown pipeline config key(s) {unknown}")
        base = cls.preset_config(data.get("preset", "paper"))
        flat: dict[str, Any] = {}
        if "device" in data:
            flat["device"] = data["device"]
        for section in _SECTIONS:
            items = data.get(section) or {}
            if not isinstance(items, dict):
                raise ValueError(f"pipeline config section {section!r} must be a mapping")
            for key, value in _flatten(items):
                flat[f"{section}.{key}"] = value
        return base.override(flat)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> RunConfig:
        """Read a JSON (or, with PyYAML installed, YAML) run configuration."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read pipeline config {path}: {exc}") from exc
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(
                    f"{path}: YAML configs need PyYAML (pip install pyyaml); or write the config as JSON"
                ) from None
            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"pipeline config {path} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"pipeline config {path}: {exc}") from exc


def _flatten(items: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in items.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key == "model" and not prefix:
            for part, sub in value.items():
                if not isinstance(sub, dict):
                    raise ValueError(f"model.{part} must be a mapping of fields")
                out.extend((f"model.{part}.{k}", v) for k, v in sub.items() if not k.startswith("_"))
        else:
            out.append((name, value))
    return out


def _paper() -> RunConfig:
    return RunConfig(preset="paper", train=TrainConfig.preset("paper"))


def _cpu_run(preset: str, model: str, eval: EvalConfig, **train: Any) -> RunConfig:
    """A CPU run of the ``model`` preset on 600 episodes: batch 32, fp32, 256 SIGReg
    directions, smaller probes; ``train`` sets the rest (epochs, steps, lr, ...)."""
    common = {"batch_size": 32, "precision": "fp32", "sigreg_num_proj": 256, "log_every": 25}
    base = dataclasses.replace(TrainConfig.preset("default"), model=LeWMConfig.preset(model))
    return RunConfig(
        preset=preset,
        device="cpu",
        data=DataConfig(episodes=600),
        train=base.override({**common, **train}),
        probe=ProbeConfig(max_frames=4000, fresh_episodes=64, batch_size=128),
        eval=eval,
    )


def _smoke() -> RunConfig:
    """CI's plumbing check: the small 56 px model, a weak planner, evaluated every epoch."""
    weak = EvalConfig(episodes=20, num_samples=64, n_steps=5, topk=8, during_training=20)
    return _cpu_run("smoke", "small", weak, epochs=4, epoch_steps=400, lr=1e-3, val_max_batches=8)


def _cpu() -> RunConfig:
    """The default without a GPU: learns Two-Room on 2 CPU cores (docs/cpu-preset.md); the
    published evaluation over 3 planner seeds."""
    return _cpu_run("cpu", "cpu", EvalConfig(seeds=3), epochs=2, epoch_steps=450, lr=2e-3, val_max_batches=4)


def _gpu_short() -> RunConfig:
    train = TrainConfig.preset("default").override({"epochs": 2, "log_every": 50})
    return RunConfig(
        preset="gpu-short", device="cuda", train=train, eval=EvalConfig(precision="bf16", during_training=20)
    )


RUN_PRESETS: dict[str, Callable[[], RunConfig]] = {
    "paper": _paper,
    "cpu": _cpu,
    "smoke": _smoke,
    "gpu-short": _gpu_short,
}


def default_preset() -> str:
    """``gpu-short`` when a CUDA device is present, ``cpu`` otherwise."""
    return "gpu-short" if torch.cuda.is_available() else "cpu"


class PipelineError(RuntimeError):
    """A pipeline stage failed; ``stage`` names it. Earlier stages' outputs are intact."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"pipeline stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage = stage


# ------------------------------------------------------------------------------- stages


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Run:
    """One pipeline run in ``out``: stage records, reuse and fingerprints."""

    def __init__(self, config: RunConfig, out: Path, log: Callable[[str], None], progress: bool):
        self.config, self.out, self.log, self.progress = config, out, log, progress
        try:
            self.device = _checks.resolve_device(config.device)
        except ValueError as exc:
            raise ValueError(f"{exc}; use --preset cpu or --set device=cpu") from None
        train = dataclasses.replace(config.train, progress=progress)
        self.train_config = train
        data_fp = _fingerprint("data", dataclasses.asdict(config.data))
        train_fp = _fingerprint(
            "train",
            data_fp,
            {k: v for k, v in train.to_dict().items() if k not in ("progress", "log_every")},
            config.eval.during_training,
        )
        self.fingerprints = {
            "data": data_fp,
            "train": train_fp,
            "probe": _fingerprint("probe", train_fp, dataclasses.asdict(config.probe)),
            "eval": _fingerprint("eval", train_fp, dataclasses.asdict(config.eval)),
        }
        self.fingerprints["report"] = _fingerprint("report", self.fingerprints, config.preset)
        self.records: dict[str, dict[str, Any]] = {}

    def record_path(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def finished(self, stage: str) -> dict[str, Any] | None:
        path = self.record_path(stage)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("fingerprint") != self.fingerprints[stage]:
            if stage in ("data", "train"):
                raise ValueError(
                    f"{self.out} holds a finished '{stage}' stage made with a different configuration; "
                    f"choose another --out, or delete {self.out / stage} and {path} to redo it"
                )
            return None
        missing = [p for p in record.get("outputs", {}).get("files", []) if not (self.out / p).exists()]
        return None if missing else record

    def run(self, stage: str, fn: Callable[[_Run], dict[str, Any]]) -> dict[str, Any]:
        record = self.finished(stage)
        if record is not None:
            self.log(f"[pipeline] {stage}: reusing the finished stage ({record['seconds']:.1f} s)")
            self.records[stage] = record
            return record
        self.log(f"[pipeline] {stage} ...")
        start = time.perf_counter()
        try:
            outputs = fn(self)
        except (KeyboardInterrupt, PipelineError):
            raise
        except Exception as exc:
            raise PipelineError(stage, exc) from exc
        record = {
            "stage": stage,
            "seconds": time.perf_counter() - start,
            "fingerprint": self.fingerprints[stage],
            "outputs": outputs,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(self.record_path(stage), record)
        self.records[stage] = record
        self.log(f"[pipeline] {stage}: done in {record['seconds']:.1f} s")
        return record


def _load_model(run: _Run):
    from .checkpoint import load_pretrained

    outputs = run.records["train"]["outputs"]
    return load_pretrained(run.out / outputs["model"], device=run.device).eval()


def _dataset(run: _Run):
    from .data import TwoRoomDataset

    return TwoRoomDataset.open(run.out / "data")


def _data_stage(run: _Run) -> dict[str, Any]:
    from .data import generate_dataset

    data = run.config.data
    generate_dataset(
        run.out / "data",
        episodes=data.episodes,
        policy=data.policy,
        seed=data.seed,
        max_steps=data.max_steps,
        frames=data.frames,
        force=True,
        progress=run.progress,
    )
    return {"files": ["data/meta.json"]}


def _train_stage(run: _Run) -> dict[str, Any]:
    from .plan import evaluate
    from .train import Trainer, latest_checkpoint

    train_dir, plan = run.out / "train", run.config.eval
    evaluator = None
    if plan.during_training > 0:
        episodes, ds = plan.during_training, _dataset(run)

        def evaluator(model):
            return evaluate(model, ds, plan, episodes=episodes, seeds=1, device=run.device, progress=False)

    resume = latest_checkpoint(train_dir) is not None
    if resume:
        run.log(f"[pipeline] train: resuming from {latest_checkpoint(train_dir)}")
    trainer = Trainer(
        _dataset(run), train_dir, run.train_config, device=run.device, evaluator=evaluator, resume=resume
    )
    result = trainer.fit()
    if result.status == "interrupted":
        raise KeyboardInterrupt(f"training interrupted at step {result.step}; rerun to resume")
    best = train_dir / "best_model"
    model = str((best if best.is_dir() else train_dir / "model").relative_to(run.out))
    return {
        "model": model,
        "files": [f"{model}/weights.pt", "train/metrics.jsonl"],
        "status": result.status,
        "steps": result.step,
        "epochs": result.epoch,
    }


def _probe_stage(run: _Run) -> dict[str, Any]:
    from .probe import run_probes

    probe = run.config.probe
    if not probe.enabled:
        return {"skipped": "probe.enabled is false"}
    result = run_probes(
        _load_model(run),
        _dataset(run),
        device=run.device,
        seed=probe.seed,
        max_frames=probe.max_frames,
        fresh_episodes=probe.fresh_episodes,
        batch_size=probe.batch_size,
    )
    write_json_atomic(run.out / "probe.json", result)
    return {"files": ["probe.json"]}


def _eval_stage(run: _Run) -> dict[str, Any]:
    from .plan import evaluate

    if not run.config.eval.enabled:
        return {"skipped": "eval.enabled is false"}
    model, out, paths = _load_model(run), run.out / "eval.json", run.out / EPISODES_FILE
    evaluate(
        model,
        _dataset(run),
        run.config.eval,
        device=run.device,
        progress=run.progress,
        out=out,
        episodes_out=paths,
    )
    return {"files": ["eval.json", EPISODES_FILE]}


def _report_stage(run: _Run) -> dict[str, Any]:
    from .report import headline, write_report

    out = run.out
    probe_file, eval_file = out / "probe.json", out / "eval.json"
    probes = json.loads(probe_file.read_text()) if probe_file.is_file() else None
    evaluation = json.loads(eval_file.read_text()) if eval_file.is_file() else None
    metrics, reasons = headline(probes, evaluation, absent="was disabled")
    seconds = {stage: run.records[stage]["seconds"] for stage in STAGES[:-1] if stage in run.records}
    write_report(
        out,
        metrics,
        stages_seconds=seconds,
        device_info=environment(run.device),
        preset=run.config.preset,
        metrics_jsonl=out / "train" / "metrics.jsonl",
        reasons=reasons,
        episodes=out / EPISODES_FILE,
    )
    return {"files": ["report.json", "report.md"]}


_STAGE_FUNCTIONS = dict(zip(STAGES, (_data_stage, _train_stage, _probe_stage, _eval_stage, _report_stage)))


def run_pipeline(
    config: RunConfig | None = None,
    out: str | os.PathLike = "runs/lewm",
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or finish) the pipeline in ``out`` and return the report (``report.json``'s content).

    ``config`` defaults to :func:`default_preset`'s RunConfig. Raises PipelineError naming
    the failing stage; ValueError for a run folder made with a different configuration.
    """
    config = config or RunConfig.preset_config(default_preset())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(config, out, log, progress)
    write_json_atomic(out / "config.json", config.to_dict())
    log(f"[pipeline] preset {config.preset} on {run.device}, run folder {out}")
    for stage in STAGES:
        run.run(stage, _STAGE_FUNCTIONS[stage])
    return json.loads((out / "report.json").read_text())
