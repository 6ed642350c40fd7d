"""Checkpoints in the published release format (spec section 7).

A checkpoint is a folder with ``config.json`` (constructor arguments per part) and
``weights.pt`` (the state dict of the whole model, prefixes ``encoder.``, ``predictor.``,
``action_encoder.``, ``projector.``, ``pred_proj.``). The encoder's keys follow either the
transformers 4.x or the 5.x layout; both load, and either can be written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import _checks
from ._io import atomic_file, atomic_folder, write_json_atomic
from .config import LeWMConfig

__all__ = ["load_pretrained", "save_pretrained", "convert_encoder_keys", "encoder_key_layout"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
LAYOUTS = ("4.x", "5.x")

# Per-layer module names: transformers 4.x -> 5.x (the rest of the key is unchanged).
_LAYER_4_TO_5 = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
}
_LAYER_5_TO_4 = {v: k for k, v in _LAYER_4_TO_5.items()}
_LAYER_PREFIX = {"4.x": "encoder.layer.", "5.x": "layers."}


def encoder_key_layout(keys, prefix: str = "encoder.") -> str | None:
    """ "4.x" or "5.x" by the encoder's per-layer key names; None if there are no layer keys."""
    for key in keys:
        for layout, layer in _LAYER_PREFIX.items():
            if key.startswith(prefix + layer):
                return layout
    return None


def convert_encoder_keys(
    state_dict: Mapping[str, torch.Tensor], to: str, prefix: str = "encoder."
) -> dict[str, torch.Tensor]:
    """Rename the ViT encoder's per-layer keys (under ``prefix``) to the ``to`` layout.

    Keys outside the encoder layers (embeddings, final layernorm, other parts) are kept.
    """
    if to not in LAYOUTS:
        raise ValueError(f"unknown encoder key layout {to!r}; expected one of {LAYOUTS}")
    source = encoder_key_layout(state_dict, prefix)
    if source is None or source == to:
        return dict(state_dict)
    table = _LAYER_4_TO_5 if to == "5.x" else _LAYER_5_TO_4
    pattern = re.compile(re.escape(prefix + _LAYER_PREFIX[source]) + r"(\d+)\.(.+)\.(weight|bias)$")
    out = {}
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match and match.group(2) in table:
            index, module, param = match.groups()
            key = f"{prefix}{_LAYER_PREFIX[to]}{index}.{table[module]}.{param}"
        out[key] = value
    return out


def _listing(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_state_dict(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str
) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"{k}: checkpoint {_checks.shape(got[k])} vs model {_checks.shape(expected[k])}"
        for k in sorted(set(expected) & set(got))
        if tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    if problems:
        raise ValueError(
            f"{source} does not match the model built from its config.json:\n  " + "\n  ".join(problems)
        )


def _read_config(path: Path) -> LeWMConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint config not found: {path}") from None
    except OSError as exc:
        raise OSError(f"cannot read checkpoint config {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint config {path} is not valid JSON: {exc}") from exc
    try:
        return LeWMConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint config {path}: {exc}") from exc


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or truncated files
        raise ValueError(f"cannot read checkpoint weights {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise ValueError(
            f"checkpoint weights {path} must hold a state dict (str -> tensor), got {type(state).__name__}"
        )
    return dict(state)


def load_pretrained(
    folder: str | os.PathLike, *, device: str | torch.device | None = None, reference: bool = False
) -> nn.Module:
    """Load a LeWM checkpoint folder (``config.json`` + ``weights.pt``) with strict key matching.

    Accepts encoder keys in the transformers 4.x or 5.x layout. Returns the model in eval
    mode on ``device`` (default CPU); ``reference=True`` builds ``lewm_fast.reference``
    classes instead of the public ones. The key layout read is kept on the model as
    ``checkpoint_key_layout`` so :func:`save_pretrained` writes it back the same way.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    config = _read_config(folder / CONFIG_FILE)
    weights_path = folder / WEIGHTS_FILE
    state = _read_weights(weights_path)

    model = config.build(reference=reference)
    expected = model.state_dict()
    native = encoder_key_layout(expected) or "5.x"
    layout = encoder_key_layout(state)
    state = convert_encoder_keys(state, to=native)
    _check_state_dict(expected, state, str(weights_path))
    model.load_state_dict(state, strict=True)
    model.checkpoint_key_layout = layout or "4.x"
    return model.to(device or "cpu").eval()


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    config: LeWMConfig | None = None,
    key_layout: str | None = None,
) -> Path:
    """Write ``model`` to ``folder`` in the release format, atomically.

    ``config`` defaults to the configuration recovered from the model's structure;
    ``key_layout`` ("4.x" or "5.x") defaults to the layout the model was loaded from, else
    "4.x". The files are written to a temporary sibling folder and moved into place, so an
    interrupted save never leaves a half-written ``folder``; an existing checkpoint folder
    is replaced only once the new one is complete (any other existing path raises
    ``FileExistsError``). Returns the folder path.
    """
    folder = Path(folder)
    if folder.exists() and not (
        folder.is_dir()
        and (not any(folder.iterdir()) or (folder / CONFIG_FILE).exists() or (folder / WEIGHTS_FILE).exists())
    ):
        raise FileExistsError(f"{folder} exists and is not a LeWM checkpoint folder; refusing to replace it")
    config = config or LeWMConfig.from_model(model)
    key_layout = key_layout or getattr(model, "checkpoint_key_layout", "4.x")
    if key_layout not in LAYOUTS:
        raise ValueError(f"key_layout must be one of {LAYOUTS}, got {key_layout!r}")
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    state = convert_encoder_keys(state, to=key_layout)

    with atomic_folder(folder, overwrite=True) as tmp:
        write_json_atomic(tmp / CONFIG_FILE, config.to_dict())
        with atomic_file(tmp / WEIGHTS_FILE) as f:
            torch.save(state, f)
    return folder
