"""Training checkpoints: everything a run needs to continue bit for bit, written atomically.

Layout under the run folder::

    checkpoints/step_000001234/        one complete checkpoint
        model/config.json, weights.pt  the model in the release format (save_pretrained)
        trainer.pt                     optimizer, scheduler, RNG states, data position, ...
        train_config.json              the TrainConfig of the run
    checkpoints/latest                 the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, flushed to disk and renamed into
place; only then is ``latest`` replaced (``lewm_fast._io``: write, fsync, rename; atomic on POSIX).
A crash at any moment leaves ``latest`` naming a complete checkpoint (or no checkpoint
at all before the first one); stale temporary folders are removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_file, atomic_folder, remove_stale, write_json_atomic, write_text_atomic
from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, convert_encoder_keys, encoder_key_layout, save_pretrained
from ..config import LeWMConfig

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "CHECKPOINT_DIR", "FORMAT_VERSION"]

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAINER_FILE = "trainer.pt"
TRAIN_CONFIG_FILE = "train_config.json"
FORMAT_VERSION = 1


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
    """Load a checkpoint's weights into ``model`` (strict) and return (trainer state, train config dict)."""
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
    config = json.loads((folder / TRAIN_CONFIG_FILE).read_text(encoding="utf-8"))
    return state, config
