"""Training checkpoints: everything a run needs to continue bit for bit, written atomically.

Layout under the run folder::

    checkpoints/step_000001234/        one complete checkpoint
        model/config.json, weights.pt  the model in the release format (save_pretrained)
        trainer.pt                     the RunState, optimizer, scheduler, RNG states
        train_config.json              the TrainConfig of the run
    checkpoints/latest                 the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, flushed to disk and renamed into
place; only then is ``latest`` replaced (``lewm_fast._io``: write, fsync, rename; atomic on POSIX).
A crash at any moment leaves ``latest`` naming a complete checkpoint (or no checkpoint
at all before the first one); stale temporary folders are removed by the next save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_file, atomic_folder, remove_stale, write_json_atomic, write_text_atomic
from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, convert_encoder_keys, encoder_key_layout, save_pretrained
from ..config import LeWMConfig
from ..encoder import published_parts, split_qkv

__all__ = [
    "RunState",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "fuse_qkv_optimizer_state",
    "CHECKPOINT_DIR",
    "FORMAT_VERSION",
]

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAINER_FILE = "trainer.pt"
TRAIN_CONFIG_FILE = "train_config.json"
FORMAT_VERSION = 1


@dataclass
class RunState:
    """Where a training run stands, saved whole in each checkpoint's ``trainer.pt``.

    ``step``: optimiser steps taken (skipped non-finite steps count); ``epoch``: the 0-based
    epoch in progress; ``step_in_epoch``: steps taken in it, which is the number of global
    batches of its shuffle consumed (see ``TrainingWindows.batches``' ``start``);
    ``best_success``: the best evaluation success rate so far (None before the first
    evaluation); ``evals_since_best``: evaluations since it last improved (early stopping's
    count); ``nonfinite_in_a_row``: the current streak of skipped non-finite steps. The
    epoch's shuffle is seeded from the epoch, so these numbers and the RNG states place a
    resumed run exactly.
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_success: float | None = None
    evals_since_best: int = 0
    nonfinite_in_a_row: int = 0

    def advance(self) -> None:
        """Count one optimiser step."""
        self.step += 1
        self.step_in_epoch += 1

    def next_epoch(self) -> None:
        """Move to the start of the next epoch."""
        self.epoch += 1
        self.step_in_epoch = 0

    def record_step(self, skipped: bool) -> None:
        """Extend the streak of skipped non-finite steps (``skipped``) or end it."""
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0

    def record_eval(self, success: float, min_delta: float) -> bool:
        """Count an evaluation; True (and a new best) when ``success`` beats the best by more
        than ``min_delta``, else False and one more evaluation since the best."""
        if self.best_success is None or success > self.best_success + min_delta:
            self.best_success = success
            self.evals_since_best = 0
            return True
        self.evals_since_best += 1
        return False

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict of numbers (None for no best yet), for ``trainer.pt``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> RunState:
        """The run state in a trainer-state dict; other keys are ignored. A missing
        ``nonfinite_in_a_row`` (checkpoints written before it was saved) reads as 0; another
        missing field is a ValueError."""
        missing = [
            f.name for f in dataclasses.fields(cls) if f.name != "nonfinite_in_a_row" and f.name not in state
        ]
        if missing:
            raise ValueError(f"trainer state lacks the run state field(s) {missing}")
        best = state["best_success"]
        return cls(
            step=int(state["step"]),
            epoch=int(state["epoch"]),
            step_in_epoch=int(state["step_in_epoch"]),
            best_success=None if best is None else float(best),
            evals_since_best=int(state["evals_since_best"]),
            nonfinite_in_a_row=int(state.get("nonfinite_in_a_row", 0)),
        )


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None if it has none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    try:
        name = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    folder = root / name
    if not name or "/" in name or not folder.is_dir():
        raise ValueError(f"{root / LATEST_FILE} names {name!r}, which is not a checkpoint folder in {root}")
    return folder


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    model_config: LeWMConfig,
    trainer_state: dict[str, Any],
    train_config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` of the run atomically and point ``latest`` at it.

    ``trainer_state`` holds tensors, numbers, strings, lists and dicts only (it is read back
    with ``torch.load(weights_only=True)``). Keeps the ``keep`` newest checkpoints.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:09d}"
    folder = root / name
    if not folder.is_dir():
        with atomic_folder(folder) as tmp:
            save_pretrained(model, tmp / "model", config=model_config, key_layout="4.x")
            state = dict(trainer_state, format_version=FORMAT_VERSION, step=step)
            with atomic_file(tmp / TRAINER_FILE) as f:
                torch.save(state, f)
            write_json_atomic(tmp / TRAIN_CONFIG_FILE, train_config)
    write_text_atomic(root / LATEST_FILE, name)

    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in complete[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale(root)
    return folder


def load_checkpoint(folder: str | os.PathLike, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint's weights into ``model`` (strict) and return (trainer state, train config dict).

    An optimizer state saved while the encoder had separate q/k/v parameters is returned
    re-keyed to ``model``'s fused ones (:func:`fuse_qkv_optimizer_state`).
    """
    folder = Path(folder)
    for required in (
        Path("model") / CONFIG_FILE,
        Path("model") / WEIGHTS_FILE,
        TRAINER_FILE,
        TRAIN_CONFIG_FILE,
    ):
        if not (folder / required).is_file():
            raise ValueError(f"{folder} is not a complete training checkpoint: {required} is missing")
    weights = torch.load(folder / "model" / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    native = encoder_key_layout(model.state_dict()) or "5.x"
    model.load_state_dict(convert_encoder_keys(weights, to=native), strict=True)
    state = torch.load(folder / TRAINER_FILE, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / TRAINER_FILE} has format version {state.get('format_version')!r}; "
            f"this lewm_fast reads version {FORMAT_VERSION}"
        )
    if isinstance(state.get("optimizer"), Mapping):
        state["optimizer"] = fuse_qkv_optimizer_state(state["optimizer"], model)
    config = json.loads((folder / TRAIN_CONFIG_FILE).read_text(encoding="utf-8"))
    return state, config


def fuse_qkv_optimizer_state(optimizer_state: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """An optimizer ``state_dict()`` saved for the unfused encoder, re-keyed to ``model``.

    Before the encoder computed q, k and v with one GEMM, the trainer's parameter list
    (``model.parameters()`` with ``requires_grad``) held them apart, in the published order
    of :func:`lewm_fast.encoder.split_qkv`. A state with one parameter group of that many
    entries is mapped onto the fused parameters: per-parameter tensors (AdamW's moments,
    (D, ...) each) are stacked as the weights are into (3D, ...), scalars (``step``) are
    q's. Any other state is returned as it is: one that fits ``model`` already, or one
    ``Optimizer.load_state_dict`` refuses. ValueError when a saved moment does not have its
    parameter's shape (the state belongs to another model).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    published = list(split_qkv(dict(named)))
    groups = optimizer_state.get("param_groups", [])
    if len(published) == len(named) or len(groups) != 1 or len(groups[0]["params"]) != len(published):
        return dict(optimizer_state)
    saved = optimizer_state["state"]
    by_name = {name: saved[i] for name, i in zip(published, groups[0]["params"]) if i in saved}
    state = {}
    for index, (name, param) in enumerate(named):
        keys = published_parts(name) or (name,)
        parts = [by_name[key] for key in keys if key in by_name]
        if not parts:  # never stepped
            continue
        if len(parts) != len(keys):
            raise ValueError(f"the saved optimizer state has some but not all of {keys}")
        merged = {
            key: torch.cat([part[key] for part in parts]) if _per_element(value) and len(parts) > 1 else value
            for key, value in parts[0].items()
        }
        for key, value in merged.items():
            if _per_element(value) and value.shape != param.shape:
                raise ValueError(
                    f"the saved optimizer state's {key} for {name} has shape {tuple(value.shape)}, the "
                    f"parameter {tuple(param.shape)}: the state belongs to another model"
                )
        state[index] = merged
    group = {**groups[0], "params": list(range(len(named)))}
    return {**optimizer_state, "state": state, "param_groups": [group]}


def _per_element(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() > 0
