"""Two-Room offline datasets on disk: a folder of ``.npy`` columns, frames optional.

Layout of a dataset folder (all arrays are plain ``.npy`` files, memory-mapped on open)::

    meta.json            format, version, row and episode counts, column table, layout, source
    episode_idx.npy      int32 (R,)      episode of each row
    step_idx.npy         int32 (R,)      step within the episode, 0 .. ep_len - 1
    proprio.npy          float32 (R, 2)  agent (x, y) at the row (the state)
    goal.npy             float32 (R, 2)  goal (x, y) of the row's episode (optional column)
    action.npy           float32 (R, 2)  action taken at the row; NaN on an episode's last row
    ep_len.npy           int64 (E,)      rows per episode (actions taken + 1)
    ep_offset.npy        int64 (E,)      first row of each episode
    pixels/shard_00000.npy ...           optional frames, uint8 (shard_rows, 224, 224, 3) each
                                         (the last shard may be shorter)

Rows are grouped by episode in order. Frames are a pure function of ``proprio`` (spec
section 4), so most datasets omit them and render on the fly. Writes are atomic: files
go to a hidden sibling folder ``.<name>.tmp-<id>`` that is renamed into place once
complete (``meta.json`` last), so an interrupted write never leaves a folder that
:meth:`TwoRoomDataset.open` accepts; an existing dataset is replaced only with
``force=True``. Opening validates every column (file readable, dtype, shape, episode
bookkeeping, finite positions on the canvas, actions in [-1, 1] or NaN) and names the
file and column of the first problem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _checks
from .._io import AtomicFolder, atomic_file, write_json_atomic
from ..envs.two_room import DEFAULT_LAYOUT, TwoRoomLayout

__all__ = ["TwoRoomDataset", "DatasetWriter", "COLUMNS", "FORMAT", "VERSION", "validate_columns"]

FORMAT = "lewm_fast/two-room-dataset"
VERSION = 1
META_FILE = "meta.json"
FRAMES_DIR = "pixels"


@dataclass(frozen=True)
class Column:
    """One stored column: dtype, per-row trailing shape, indexed by rows or by episodes."""

    dtype: str
    trailing: tuple[int, ...]
    per: str  # "row" or "episode"
    required: bool = True


COLUMNS: dict[str, Column] = {
    "episode_idx": Column("int32", (), "row"),
    "step_idx": Column("int32", (), "row"),
    "proprio": Column("float32", (2,), "row"),
    "goal": Column("float32", (2,), "row", required=False),
    "action": Column("float32", (2,), "row"),
    "ep_len": Column("int64", (), "episode"),
    "ep_offset": Column("int64", (), "episode"),
}


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def validate_columns(
    columns: Mapping[str, np.ndarray],
    where: Callable[[str], str],
    layout: TwoRoomLayout = DEFAULT_LAYOUT,
) -> tuple[int, int]:
    """Check a full set of columns; returns (rows, episodes). ``where(name)`` names the file of a column.

    Raises ValueError "<file>: column '<name>' ..." on a missing column, a wrong dtype or
    shape, inconsistent episode bookkeeping, non-finite or off-canvas positions, or
    actions that are neither in [-1, 1] nor NaN on the whole row.
    """
    for name, col in COLUMNS.items():
        if name not in columns:
            if col.required:
                raise ValueError(f"{where(name)}: column {name!r} is missing")
            continue
        array = columns[name]
        if array.dtype != np.dtype(col.dtype):
            raise ValueError(f"{where(name)}: column {name!r} must have dtype {col.dtype}, got {array.dtype}")
        if array.ndim != 1 + len(col.trailing) or tuple(array.shape[1:]) != col.trailing:
            want = _checks.shape(("rows" if col.per == "row" else "episodes",) + col.trailing)
            raise ValueError(
                f"{where(name)}: column {name!r} must have shape {want}, got {_checks.shape(array.shape)}"
            )
    rows = columns["proprio"].shape[0]
    episodes = columns["ep_len"].shape[0]
    for name, col in COLUMNS.items():
        if name in columns:
            n = rows if col.per == "row" else episodes
            if columns[name].shape[0] != n:
                what = "rows (as proprio)" if col.per == "row" else "episodes (as ep_len)"
                raise ValueError(
                    f"{where(name)}: column {name!r} has {columns[name].shape[0]} entries, "
                    f"expected {n} {what}"
                )
    ep_len = np.asarray(columns["ep_len"])
    if episodes == 0:
        raise ValueError(f"{where('ep_len')}: column 'ep_len' is empty; a dataset needs at least one episode")
    if (ep_len < 1).any():
        e = _first(ep_len < 1)
        raise ValueError(f"{where('ep_len')}: column 'ep_len' must be >= 1, episode {e} has {int(ep_len[e])}")
    if int(ep_len.sum()) != rows:
        raise ValueError(
            f"{where('ep_len')}: column 'ep_len' sums to {int(ep_len.sum())}, but there are {rows} rows"
        )
    offset = np.concatenate([[0], np.cumsum(ep_len)[:-1]])
    ep_offset = np.asarray(columns["ep_offset"])
    if not np.array_equal(ep_offset, offset):
        e = _first(ep_offset != offset)
        raise ValueError(
            f"{where('ep_offset')}: column 'ep_offset' must be the running sum of ep_len; episode {e} "
            f"starts at {int(ep_offset[e])}, expected {int(offset[e])}"
        )
    episode_of_row = np.repeat(np.arange(episodes), ep_len)
    for name, want in (
        ("episode_idx", episode_of_row),
        ("step_idx", np.arange(rows) - np.repeat(offset, ep_len)),
    ):
        got = np.asarray(columns[name])
        if not np.array_equal(got, want):
            r = _first(got != want)
            raise ValueError(
                f"{where(name)}: column {name!r} disagrees with ep_len/ep_offset at row {r}: "
                f"{int(got[r])}, expected {int(want[r])}"
            )
    hi = layout.size - 1
    for name in ("proprio", "goal"):
        if name not in columns:
            continue
        xy = np.asarray(columns[name])
        bad = ~(np.isfinite(xy) & (xy >= 0) & (xy <= hi)).all(axis=1)
        if bad.any():
            r = _first(bad)
            raise ValueError(
                f"{where(name)}: column {name!r} must hold finite (x, y) positions in [0, {hi}]; "
                f"row {r} is {xy[r].tolist()} ({int(bad.sum())} bad row(s))"
            )
    action = np.asarray(columns["action"])
    nan_row = np.isnan(action).all(axis=1)
    ok = (np.isfinite(action) & (np.abs(action) <= 1)).all(axis=1) | nan_row
    if not ok.all():
        r = _first(~ok)
        raise ValueError(
            f"{where('action')}: column 'action' must be in [-1, 1] (or NaN on a whole row at an "
            f"episode's end); row {r} is {action[r].tolist()} ({int((~ok).sum())} bad row(s))"
        )
    return rows, episodes


def _load_npy(path: Path, name: str) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: column {name!r} file is missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError for corrupt or truncated files
        raise ValueError(f"{path}: column {name!r} cannot be read ({type(exc).__name__}: {exc})") from exc


class TwoRoomDataset:
    """A Two-Room dataset opened from its folder; columns are read-only numpy memory maps.

    Attributes: ``episode_idx``, ``step_idx`` (R,) int32; ``proprio``, ``action`` (R, 2)
    float32; ``goal`` (R, 2) float32 or None; ``ep_len``, ``ep_offset`` (E,) int64;
    ``layout``; ``source`` (how it was made); ``has_frames``. Frames, when stored, are
    read with :meth:`read_frames`.
    """

    def __init__(self, path: Path, meta: dict, columns: dict[str, np.ndarray], shards: list[np.ndarray]):
        self.path = path
        self.meta = meta
        self.layout = TwoRoomLayout.from_dict(meta["layout"])
        self.source: dict[str, Any] = meta.get("source", {})
        self.episode_idx = columns["episode_idx"]
        self.step_idx = columns["step_idx"]
        self.proprio = columns["proprio"]
        self.goal = columns.get("goal")
        self.action = columns["action"]
        self.ep_len = columns["ep_len"]
        self.ep_offset = columns["ep_offset"]
        self._shards = shards
        self._shard_rows = int(meta["frames"]["shard_rows"]) if shards else 0

    @property
    def num_rows(self) -> int:
        return int(self.proprio.shape[0])

    @property
    def num_episodes(self) -> int:
        return int(self.ep_len.shape[0])

    @property
    def has_frames(self) -> bool:
        return bool(self._shards)

    def __repr__(self) -> str:
        frames = "stored frames" if self.has_frames else "frames rendered from state"
        counts = f"{self.num_episodes} episodes, {self.num_rows} rows"
        return f"TwoRoomDataset({str(self.path)!r}: {counts}, {frames})"

    def read_frames(self, rows) -> np.ndarray:
        """Stored frames of ``rows`` (n,) int -> uint8 (n, H, W, 3), read from the memory-mapped shards."""
        if not self.has_frames:
            raise ValueError(
                f"{self.path} stores no frames; render them from proprio (lewm_fast.envs.render)"
            )
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise ValueError(f"frame rows must be in [0, {self.num_rows}), got {rows.min()}..{rows.max()}")
        s = self.layout.size
        out = np.empty((rows.size, s, s, 3), dtype=np.uint8)
        shard, local = np.divmod(rows, self._shard_rows)
        for k in np.unique(shard):
            sel = np.flatnonzero(shard == k)
            out[sel] = self._shards[k][local[sel]]
        return out

    @classmethod
    def open(cls, path: str | os.PathLike) -> TwoRoomDataset:
        """Open and validate the dataset folder ``path``; errors name the file and column at fault."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {path}")
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise ValueError(
                f"{meta_path} is missing: {path} is not a complete lewm_fast dataset "
                "(an interrupted write leaves only a hidden .tmp folder)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{meta_path}: cannot read dataset metadata ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a {FORMAT} metadata file")
        if meta.get("version") != VERSION:
            raise ValueError(
                f"{meta_path}: format version {meta.get('version')!r} is not supported (need {VERSION})"
            )
        try:
            layout = TwoRoomLayout.from_dict(meta["layout"])
            rows, episodes = int(meta["num_rows"]), int(meta["num_episodes"])
            table = meta["columns"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{meta_path}: malformed metadata ({type(exc).__name__}: {exc})") from exc
        columns = {}
        files = {}
        for name, col in COLUMNS.items():
            if name not in table:
                if col.required:
                    raise ValueError(f"{meta_path}: column {name!r} is not listed")
                continue
            files[name] = path / f"{name}.npy"
            columns[name] = _load_npy(files[name], name)
        got = validate_columns(columns, lambda name: str(files.get(name, meta_path)), layout)
        if got != (rows, episodes):
            raise ValueError(f"{meta_path}: says {rows} rows and {episodes} episodes, the columns hold {got}")
        shards = cls._open_frames(path, meta, rows, layout)
        return cls(path, meta, columns, shards)

    @staticmethod
    def _open_frames(path: Path, meta: dict, rows: int, layout: TwoRoomLayout) -> list[np.ndarray]:
        frames = meta.get("frames")
        if not frames:
            return []
        try:
            shard_rows = int(frames["shard_rows"])
            names = list(frames["shards"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path / META_FILE}: malformed frames entry ({exc})") from exc
        expect = [min(shard_rows, rows - i * shard_rows) for i in range(len(names))]
        if shard_rows < 1 or sum(expect) != rows or (expect and expect[-1] < 1):
            raise ValueError(
                f"{path / META_FILE}: {len(names)} frame shards of {shard_rows} rows do not cover {rows} rows"
            )
        s = layout.size
        shards = []
        for name, n in zip(names, expect):
            shard = _load_npy(path / name, "pixels")
            if shard.dtype != np.uint8 or shard.shape != (n, s, s, 3):
                raise ValueError(
                    f"{path / name}: column 'pixels' shard must be uint8 {_checks.shape((n, s, s, 3))}, "
                    f"got {shard.dtype} {_checks.shape(shard.shape)}"
                )
            shards.append(shard)
        return shards


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.save(f, array, allow_pickle=False)


class DatasetWriter:
    """Writes one dataset atomically: a hidden temporary sibling folder, renamed into place on commit.

    Use as a context manager; leaving the block with an exception (or never committing)
    deletes the temporary folder. ``add_frames`` streams frames into fixed-size shards.
    The target is checked at construction: an existing dataset (or empty folder) is
    replaced only with ``force=True``; any other existing path is never replaced.
    """

    def __init__(self, path: str | os.PathLike, *, force: bool = False, shard_rows: int = 512):
        path = Path(path)
        if path.exists():
            replaceable = path.is_dir() and (not any(path.iterdir()) or (path / META_FILE).exists())
            if not replaceable:
                raise FileExistsError(f"{path} exists and is not a lewm_fast dataset; refusing to replace it")
            if not force:
                raise FileExistsError(f"{path} already exists; pass force=True (--force) to replace it")
        self.path = path
        self.shard_rows = _checks.positive(shard_rows, "shard_rows")
        self._folder = AtomicFolder(path, overwrite=True)
        self.tmp = self._folder.tmp
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._shards: list[str] = []
        self.frame_rows = 0

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._folder.discard()

    def add_frames(self, frames: np.ndarray) -> None:
        """Append uint8 frames (n, H, W, 3) in row order."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise ValueError(f"frames must be uint8 (n, H, W, 3), got {frames.dtype} {_checks.shape(frames)}")
        self._pending.append(np.ascontiguousarray(frames))
        self._pending_rows += frames.shape[0]
        self.frame_rows += frames.shape[0]
        while self._pending_rows >= self.shard_rows:
            self._flush_shard(self.shard_rows)

    def _flush_shard(self, n: int) -> None:
        block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        rest = block[n:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]
        (self.tmp / FRAMES_DIR).mkdir(exist_ok=True)
        name = f"{FRAMES_DIR}/shard_{len(self._shards):05d}.npy"
        _save_npy(self.tmp / name, block[:n])
        self._shards.append(name)

    def commit(self, columns: Mapping[str, np.ndarray], layout: TwoRoomLayout, source: dict) -> Path:
        """Validate and write the columns and ``meta.json``, then move the folder into place."""
        columns = {k: np.ascontiguousarray(v) for k, v in columns.items()}
        rows, episodes = validate_columns(columns, lambda name: f"{self.path} (being written)", layout)
        if self._pending_rows:
            self._flush_shard(self._pending_rows)
        if self.frame_rows not in (0, rows):
            raise ValueError(f"{self.path}: {self.frame_rows} frames were written for {rows} rows")
        for name, array in columns.items():
            _save_npy(self.tmp / f"{name}.npy", array)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "num_rows": rows,
            "num_episodes": episodes,
            "columns": {
                name: {"file": f"{name}.npy", "dtype": str(a.dtype), "shape": list(a.shape)}
                for name, a in columns.items()
            },
            "frames": (
                {"dir": FRAMES_DIR, "shard_rows": self.shard_rows, "shards": self._shards}
                if self._shards
                else None
            ),
            "layout": layout.to_dict(),
            "source": source,
        }
        write_json_atomic(self.tmp / META_FILE, meta)
        return self._folder.commit()
