"""Atomic writes, the only module of the package that writes through temporaries.

Every file or folder lewm_fast writes for others to read (checkpoints, trainer state,
datasets, HDF5 exports, evaluation/probe/report/benchmark JSON) goes through here, so a
reader (or a crash) never meets a half-written one:

- :func:`atomic_path` / :func:`atomic_file` write a file through a hidden temporary
  sibling ``.<name>.tmp-<id>``, flushed to disk (fsync) and renamed over the target with
  ``os.replace`` (atomic on POSIX and Windows); :func:`write_bytes_atomic`,
  :func:`write_text_atomic`, :func:`write_json_atomic` and :func:`write_npz_atomic` are the
  one-call forms.
- :func:`atomic_folder` does the same for a folder of files.

Temporaries are removed when the write fails; only a hard kill leaves one behind, always
hidden and named ``.<name>.tmp-<id>`` (or ``.<name>.old-<id>``, see :func:`atomic_folder`),
which :func:`remove_stale` clears.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_file",
    "atomic_folder",
    "AtomicFolder",
    "write_text_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_npz_atomic",
    "json_safe",
    "json_number",
    "fsync_dir",
    "remove_stale",
]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where that is unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def _is_temporary(name: str) -> bool:
    # ".<name>.tmp-<id>" / ".<name>.old-<id>" from this module; ".tmp-<name>-<id>" from
    # trainer checkpoints written before the writes moved here
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def remove_stale(folder: str | os.PathLike) -> None:
    """Delete the hidden temporaries that interrupted atomic writes left in ``folder``.

    Call it only where no other writer is at work in ``folder`` at the same time.
    """
    for entry in Path(folder).iterdir():
        if _is_temporary(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path`` to write a file to; on success it becomes ``path``.

    For writers that take a file name (``h5py.File``); :func:`atomic_file` yields an open
    file instead. When the block ends without an exception the temporary file is flushed
    to disk and renamed over ``path`` (``os.replace``, then the folder entry is flushed):
    a reader sees the old file or the new one, never a part. When the block raises, the
    temporary file is deleted and ``path`` is left as it was. The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically.

    ``mode`` is "wb" (binary) or "w" (UTF-8 text). Same guarantees as :func:`atomic_path`,
    e.g. ``with atomic_file(p) as f: torch.save(state, f)``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if mode == "wb" else "utf-8") as f:
        yield f


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_npz_atomic(path: str | os.PathLike, arrays: dict[str, Any]) -> Path:
    """Write numpy ``arrays`` {name: array} as one compressed ``.npz`` to ``path`` atomically.

    Read back with ``numpy.load(path, allow_pickle=False)``: object arrays are refused here,
    so every array loads without pickle. ``path`` is used as given (no ``.npz`` appended).
    """
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in arrays.items():
        if value.dtype.hasobject:
            raise TypeError(f"write_npz_atomic: array {name!r} holds Python objects; npz needs plain dtypes")
    with atomic_file(path) as f:
        np.savez_compressed(f, **arrays)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, in nested dicts/lists/tuples.

    Tuples become lists (as JSON writes them); other values are returned unchanged.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON plus a newline to ``path`` atomically (see :func:`atomic_path`).

    The file is strict JSON: non-finite numbers (NaN, inf, -inf, which JSON cannot
    express) are written as ``null`` (:func:`json_safe`), so any JSON reader can load
    it; a value JSON cannot hold at all raises ``TypeError`` and leaves ``path`` as it was.
    """
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def json_number(value: Any) -> float | int | None:
    """``value`` as a finite JSON number, or None when it is missing or not finite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    return int(value) if isinstance(value, int) else number


class AtomicFolder:
    """A folder written in a hidden temporary sibling and swapped into place on :meth:`commit`.

    Made by :func:`atomic_folder`, which documents the rules; use it directly when the
    writing and the commit happen in different calls (``DatasetWriter``).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self._check_target()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _sibling(self.path, "tmp")
        self.tmp.mkdir()
        self.committed = False

    def _check_target(self) -> None:
        if not os.path.lexists(self.path):
            return
        if not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a folder; refusing to replace it")
        if not self.overwrite:
            raise FileExistsError(f"{self.path} already exists")

    def commit(self) -> Path:
        """Flush the temporary folder to disk and swap it into place; returns the target path."""
        if self.committed:
            return self.path
        for folder, _, _ in os.walk(self.tmp, topdown=False):
            fsync_dir(folder)
        self._check_target()  # the target may have appeared while we wrote
        parent = self.path.parent
        if os.path.lexists(self.path):
            # rename() cannot put a folder over a non-empty one: move the old one aside first
            old = _sibling(self.path, "old")
            os.replace(self.path, old)
            try:
                os.replace(self.tmp, self.path)
            except BaseException:
                os.replace(old, self.path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        fsync_dir(parent)
        self.committed = True
        return self.path

    def discard(self) -> None:
        """Delete the temporary folder (a no-op after :meth:`commit`)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            finally:
                self.discard()
        else:
            self.discard()


def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> AtomicFolder:
    """Context manager that yields an empty temporary folder to fill; on success it becomes ``path``.

    ``with atomic_folder(out) as tmp: ...`` writes into ``tmp``, a hidden sibling
    ``.<name>.tmp-<id>`` of ``path`` (same file system, so the move is a rename). When the
    block ends without an exception, the folders in ``tmp`` are flushed to disk and ``tmp``
    is renamed to ``path``; when it raises, ``tmp`` is deleted and ``path`` is untouched.
    Write the files inside with the helpers of this module (they flush each file).

    An existing ``path`` raises ``FileExistsError`` unless ``overwrite=True``, checked on
    entry and again at the swap; a path that is not a folder (a file) is never replaced.
    With ``overwrite=True`` the old folder is replaced only once the new one is complete:
    the old one is renamed aside to ``.<name>.old-<id>``, the new one is renamed in, and
    the old one is deleted. POSIX cannot rename a folder over a non-empty one, so this is
    as atomic as the OS allows: between the two renames ``path`` is briefly absent (a
    reader sees the old folder, nothing, or the new one; never a mix), and a crash in that
    moment leaves the old content in ``.<name>.old-<id>``. If the second rename fails the
    old folder is moved back. The parent folder is created.
    """
    return AtomicFolder(path, overwrite=overwrite)
