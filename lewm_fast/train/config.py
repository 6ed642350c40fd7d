"""Training configuration: a frozen dataclass with the published recipe as defaults.

``TrainConfig()`` is the recipe of spec section 8 (AdamW lr 5e-5, weight decay 1e-3, bf16
autocast, linear warm-up then cosine, gradient clipping at 1.0, batch 128, seed 3072,
predictor dropout 0.1 through the model config) for 10 epochs, the length the authors
report stopping at. ``TrainConfig.preset("paper")`` is the published config file as
written (100 epochs); ``"tiny"`` is a small model and short run for CPU tests and smoke
runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .. import _checks
from ..config import LeWMConfig, parse_value
from .compiled import compile_backend
from .memory import parse_size
from .step import PLANS

__all__ = ["TrainConfig", "TRAIN_PRESETS", "RESUME_FREE_FIELDS"]

# Fields that may change between a run and its resumption: they change how a step is
# computed or reported, not what it computes. Everything else must match the checkpoint.
RESUME_FREE_FIELDS = (
    "memory_plan",
    "chunk_size",
    "vram_budget",
    "enforce_vram_budget",
    "log_every",
    "progress",
    "max_steps",
    "val_max_batches",
    "eval_every_epochs",
    "bn_recalibrate",
    "early_stop_patience",
    "early_stop_min_delta",
    "max_nonfinite_steps",
    "backend",
    "keep_checkpoints",
    "compile",
)


def _number(name: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"TrainConfig.{name} must be in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train LeWM. Defaults: the published recipe for 10 epochs.

    Optimisation: ``lr``, ``weight_decay``, ``betas``, ``eps`` (AdamW); the learning rate
    rises linearly from 0 over the first ``warmup_fraction`` of the scheduled steps
    (epochs x steps per epoch), then follows a cosine to ``min_lr_ratio * lr``;
    ``grad_clip`` clips the global gradient norm (None: no clipping). The spec names
    "warmup + cosine" without a length; 5% is this library's choice.
    ``precision``: "bf16" (autocast) or "fp32". ``batch_size`` is the global batch (split
    evenly over data-parallel processes). ``sigreg_weight`` is the loss's lambda.

    Memory: ``memory_plan`` "auto" picks from ``vram_budget`` (bytes or a size such as
    "8GiB"; None or "auto" = the device's free memory); ``enforce_vram_budget`` caps the
    CUDA caching allocator at an explicit budget.

    Run control: ``epochs``; ``epoch_steps`` caps the steps per epoch; ``max_steps`` stops
    the run early at that global step (with a checkpoint) without changing the schedule;
    ``log_every`` steps between metric flushes (the only host synchronisations of the
    loop); ``val_max_batches`` caps validation batches; ``eval_every_epochs`` and
    ``early_stop_patience`` / ``early_stop_min_delta`` drive evaluation and early stopping
    when an evaluator is given; ``bn_recalibrate`` > 0 recomputes the BatchNorm running
    statistics of ``projector`` and ``pred_proj`` on that many training batches before each
    epoch's validation and evaluation (:mod:`lewm_fast.train.batchnorm`; 0: off, default 4)
    and puts them back afterwards, so the eval-mode numbers describe the current weights
    rather than the statistics of the last ~10 steps, and the training run is unchanged
    (``best_model/`` keeps the recalibrated statistics it was evaluated with); ``max_nonfinite_steps``
    non-finite steps in a row abort the run; ``keep_checkpoints`` most recent checkpoints
    are kept.

    Speed: ``backend`` selects the fused kernels ("auto": on CUDA). ``compile`` runs the
    training step's forward and backward under ``torch.compile`` with static shapes, every
    piece the memory plan runs (:mod:`lewm_fast.train.compiled`): False (eager, the
    default), True or "inductor" (generated kernels; on CUDA the "whole" plan replays CUDA
    graphs), "inductor-no-cudagraphs", or "aot_eager" (traced graphs run eagerly: for
    checking). Same weights, state-dict keys and checkpoints; the first steps compile for a
    minute or so.
    """

    model: LeWMConfig = field(default_factory=LeWMConfig)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-5
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "bf16"
    seed: int = 3072
    sigreg_weight: float = 0.09
    sigreg_knots: int = 17
    sigreg_num_proj: int = 1024
    data_source: str = "rendered"
    memory_plan: str = "auto"
    chunk_size: int | None = None
    vram_budget: int | str | None = None
    enforce_vram_budget: bool = True
    epoch_steps: int | None = None
    max_steps: int | None = None
    log_every: int = 20
    val_max_batches: int | None = None
    eval_every_epochs: int = 1
    bn_recalibrate: int = 4
    early_stop_patience: int | None = None
    early_stop_min_delta: float = 0.0
    max_nonfinite_steps: int = 20
    keep_checkpoints: int = 2
    backend: str = "auto"
    compile: bool | str = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, LeWMConfig):
            raise ValueError(f"TrainConfig.model must be a LeWMConfig, got {type(self.model).__name__}")
        for name in ("epochs", "batch_size", "sigreg_knots", "sigreg_num_proj", "log_every"):
            _checks.positive(getattr(self, name), f"TrainConfig.{name}")
        for name in ("chunk_size", "epoch_steps", "max_steps", "val_max_batches", "early_stop_patience"):
            if getattr(self, name) is not None:
                _checks.positive(getattr(self, name), f"TrainConfig.{name}")
        for name in ("eval_every_epochs", "max_nonfinite_steps", "keep_checkpoints"):
            _checks.positive(getattr(self, name), f"TrainConfig.{name}")
        _checks.integer(self.seed, "TrainConfig.seed", 0)
        _checks.integer(self.bn_recalibrate, "TrainConfig.bn_recalibrate", 0)
        if not 0 < self.lr < 1:
            raise ValueError(f"TrainConfig.lr must be in (0, 1), got {self.lr!r}")
        _number("weight_decay", self.weight_decay, 0.0)
        _number("eps", self.eps, 0.0)
        _number("warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        _number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _number("sigreg_weight", self.sigreg_weight, 0.0)
        _number("early_stop_min_delta", self.early_stop_min_delta, 0.0)
        if self.grad_clip is not None:
            _number("grad_clip", self.grad_clip, 0.0)
            if self.grad_clip <= 0:
                raise ValueError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if (
            betas is None
            or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.data_source not in ("rendered", "stored"):
            raise ValueError(
                f"TrainConfig.data_source must be 'rendered' or 'stored', got {self.data_source!r}"
            )
        if self.memory_plan != "auto" and self.memory_plan not in PLANS:
            raise ValueError(
                f"TrainConfig.memory_plan must be 'auto' or one of {PLANS}, got {self.memory_plan!r}"
            )
        if self.chunk_size is not None and self.memory_plan not in ("auto", "two_pass"):
            raise ValueError(
                f"TrainConfig.chunk_size applies to the two_pass plan, not memory_plan={self.memory_plan!r}"
            )
        if self.vram_budget not in (None, "auto"):
            parse_size(self.vram_budget)  # raises ValueError on a bad size
        from ..backend import check_name

        check_name(self.backend)
        try:
            compile_backend(self.compile)
        except ValueError as exc:
            raise ValueError(f"TrainConfig.{exc}") from None
        for name in ("enforce_vram_budget", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        """A named configuration: "default" (recipe, 10 epochs), "paper" (100 epochs), "tiny"."""
        if name not in TRAIN_PRESETS:
            raise ValueError(f"unknown TrainConfig preset {name!r}; expected one of {sorted(TRAIN_PRESETS)}")
        return TRAIN_PRESETS[name]

    @property
    def autocast_dtype(self):
        import torch

        return torch.bfloat16 if self.precision == "bf16" else None

    def override(self, values: dict[str, Any]) -> TrainConfig:
        """A copy with overrides, e.g. ``{"lr": 1e-4, "model.predictor.depth": 2}``.

        String values (as from ``--set key=value``) are read as Python literals where they
        parse (``"1e-4"``, ``"(0.9, 0.95)"``, ``"None"``, ``"true"``), else kept as text.
        """
        own = {f.name for f in fields(self)} - {"model"}
        plain: dict[str, Any] = {}
        model: dict[str, Any] = {}
        for key, value in values.items():
            value = parse_value(value)
            if key.startswith("model."):
                model[key[len("model.") :]] = value
            elif key in own:
                plain[key] = value
            else:
                raise ValueError(
                    f"unknown TrainConfig key {key!r}; expected one of {sorted(own)} or model.<part>.<field>"
                )
        if model:
            try:
                plain["model"] = self.model.override(model)
            except TypeError as exc:
                raise ValueError(f"bad model override {model}: {exc}") from None
        return dataclasses.replace(self, **plain)

    # ---------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model"] = self.model.to_dict()
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        if "model" in data:
            data["model"] = LeWMConfig.from_dict(data["model"])
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


TRAIN_PRESETS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    "paper": TrainConfig(epochs=100),
    "tiny": TrainConfig(
        model=LeWMConfig.preset("tiny"),
        epochs=2,
        batch_size=8,
        lr=1e-3,
        precision="fp32",
        sigreg_num_proj=64,
        epoch_steps=4,
        log_every=2,
        val_max_batches=2,
        progress=False,
    ),
}
