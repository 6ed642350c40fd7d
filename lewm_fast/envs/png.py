"""Write a uint8 RGB frame as a PNG file with the standard library only (zlib + struct)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_png"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def save_png(frame, path: str | os.PathLike) -> Path:
    """Save ``frame``, uint8 (H, W, 3) (tensor or array), as an RGB PNG; returns the path."""
    if torch.is_tensor(frame):
        frame = frame.detach().cpu().numpy()
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
    h, w, _ = frame.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), frame.reshape(h, w * 3)], axis=1)  # filter 0 per row
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )
    path = Path(path)
    path.write_bytes(data)
    return path
