"""Import and export of the published HDF5 dataset layout (needs ``pip install lewm-fast[hdf5]``).

The published Two-Room files hold one HDF5 dataset per column::

    pixels       uint8 (R, 224, 224, 3) (channels-first (R, 3, 224, 224) is accepted too)
    action       float (R, 2)       action taken at the row (NaN rows allowed)
    proprio      float (R, 2)       agent (x, y)
    episode_idx  int (R,)           (or ep_idx)
    step_idx     int (R,)
    ep_len       int (E,)
    ep_offset    int (E,)
    goal         float (R, 2)       optional; written by :func:`export_hdf5`

and optionally a file attribute ``layout``, the :class:`TwoRoomLayout` as JSON (written by
:func:`export_hdf5`; the published files have none and use the published layout).

:func:`import_hdf5` turns such a file into a lewm_fast dataset folder. Frames are a pure
function of ``proprio``, so by default it drops the stored pixels (they would be 139 GB
uncompressed for the published 920,809 frames) after checking a sample of them against
:func:`lewm_fast.envs.render`; ``pixels="keep"`` copies them into frame shards instead.

The dynamics are known too, so the importer replays every stored transition: row t's
``action`` must take row t's ``proprio`` to row t + 1's through :func:`lewm_fast.envs.step`
(within 1e-3 px) for every row but an episode's last. A file on which more than 1% of
transitions disagree (an ``action`` column shifted by a row, another layout or speed) is
refused unless ``on_bad_dynamics="record"``; the count is recorded either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import atomic_path
from ..envs.two_room import DEFAULT_LAYOUT, TwoRoomLayout, layout_image, render, step
from .dataset import COLUMNS, DatasetWriter, TwoRoomDataset, validate_columns

__all__ = ["import_hdf5", "export_hdf5", "HDF5_FORMAT", "DYNAMICS_TOLERANCE", "DYNAMICS_MAX_FRACTION"]

HDF5_FORMAT = "lewm_fast/two-room-hdf5"
_ALIASES = {"episode_idx": ("episode_idx", "ep_idx")}
DYNAMICS_TOLERANCE = 1e-3  # px: a stored transition agrees when step() lands this close to the next row
DYNAMICS_MAX_FRACTION = 0.01  # more disagreeing transitions than this refuses the file
_LAYOUT_FROM = {
    "argument": "the layout passed in",
    "file": "the layout in the file's 'layout' attribute",
    "default": "the published layout (the file records none; pass layout= if it was made with another)",
}


def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise ImportError("HDF5 import/export needs h5py: pip install 'lewm-fast[hdf5]'") from exc
    return h5py


def _read_column(f, path: Path, name: str, kind: str) -> np.ndarray | None:
    h5py = _h5py()
    key = next((k for k in _ALIASES.get(name, (name,)) if k in f), None)
    if key is None:
        return None
    node = f[key]
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{path}: column {key!r} must be an HDF5 dataset, got a {type(node).__name__}")
    if kind == "float" and node.dtype.kind not in "fiu":
        raise ValueError(f"{path}: column {key!r} must be numeric, got dtype {node.dtype}")
    if kind == "int" and node.dtype.kind not in "iu":
        raise ValueError(f"{path}: column {key!r} must hold integers, got dtype {node.dtype}")
    try:
        data = node[()]
    except Exception as exc:  # truncated or corrupt data blocks
        raise ValueError(f"{path}: column {key!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    return np.asarray(data)


def _pixels_layout(node, path: Path, rows: int, size: int) -> bool:
    """True if channels-last (R, S, S, 3), False if channels-first (R, 3, S, S); raises otherwise."""
    shape = tuple(node.shape)
    if node.dtype != np.uint8 or shape not in ((rows, size, size, 3), (rows, 3, size, size)):
        raise ValueError(
            f"{path}: column 'pixels' must be uint8 ({rows}, {size}, {size}, 3) or "
            f"({rows}, 3, {size}, {size}), got {node.dtype} {shape}"
        )
    return shape[-1] == 3


def _read_frames(node, path: Path, start: int, stop: int, channels_last: bool) -> np.ndarray:
    try:
        block = np.asarray(node[start:stop])
    except Exception as exc:
        raise ValueError(
            f"{path}: column 'pixels' rows {start}..{stop - 1} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    return block if channels_last else np.ascontiguousarray(block.transpose(0, 2, 3, 1))


def import_hdf5(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    pixels: str = "drop",
    verify_frames: int = 16,
    layout: TwoRoomLayout | None = None,
    on_bad_dynamics: str = "raise",
    device: str | torch.device = "cpu",
    force: bool = False,
    shard_frames: int = 512,
    chunk_rows: int = 1024,
    progress: bool = False,
) -> TwoRoomDataset:
    """Convert the HDF5 file ``path`` (published layout) into the dataset folder ``out``.

    ``pixels="drop"`` stores no frames; when the file has them, ``verify_frames`` sampled
    rows are compared with frames rendered from their ``proprio`` and the import fails
    if they disagree by more than one grey level on average (not this Two-Room layout).
    ``source["verify"]`` records the differences: ``max_abs_diff`` (grey levels),
    ``mismatched_pixels`` and ``mismatched_pixel_fraction`` (pixels with any channel off;
    the published environment's frames differ from lewm_fast's by one grey level on
    about 0.14% of pixels, see the README), ``mismatched_bytes`` and ``mean_abs_diff``.
    ``pixels="keep"`` copies the frames into shards. ``layout=None`` takes the layout from
    the file's ``layout`` attribute (which :func:`export_hdf5` writes) or, when the file
    records none (the published files), the published :data:`DEFAULT_LAYOUT`; which one
    was used is recorded as ``source["layout_from"]`` ("file", "default" or "argument").
    Every transition (row t's ``proprio`` and ``action`` -> row t + 1's ``proprio``, within
    an episode) is replayed through :func:`lewm_fast.envs.step` with that layout; one
    disagrees when it lands more than ``DYNAMICS_TOLERANCE`` (1e-3 px) from the next row or
    its action is NaN. ``source["dynamics"]`` records ``transitions``, ``mismatched``,
    ``fraction``, ``first_row`` (the first disagreeing row, or None), ``max_error_px``
    and ``tolerance_px``. More than ``DYNAMICS_MAX_FRACTION`` (1%) disagreeing raises,
    naming the first bad row, unless ``on_bad_dynamics="record"``, which imports anyway.

    Errors name the file and column. Returns the opened dataset; ``force=True`` replaces
    an existing one.
    """
    h5py = _h5py()
    if pixels not in ("drop", "keep"):
        raise ValueError(f"pixels must be 'drop' or 'keep', got {pixels!r}")
    if on_bad_dynamics not in ("raise", "record"):
        raise ValueError(f"on_bad_dynamics must be 'raise' or 'record', got {on_bad_dynamics!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise ValueError(f"{path}: cannot open as an HDF5 file ({type(exc).__name__}: {exc})") from exc
    with f:
        layout, layout_from = _layout(f, path, layout)
        columns = _read_columns(f, path)
        rows, _ = validate_columns(columns, lambda name: str(path), layout)
        dynamics = _check_dynamics(columns, path, layout, layout_from, device, on_bad_dynamics)
        source = {
            "kind": "hdf5",
            "file": str(path.resolve()),
            "pixels": pixels,
            "layout_from": layout_from,
            "dynamics": dynamics,
        }
        node = f.get("pixels")
        if node is None and pixels == "keep":
            raise ValueError(
                f"{path}: column 'pixels' is missing; use pixels='drop' to render frames from proprio"
            )
        channels_last = _pixels_layout(node, path, rows, layout.size) if node is not None else True
        with DatasetWriter(out, force=force, shard_rows=shard_frames) as writer:
            if node is not None and pixels == "keep":
                _copy_frames(writer, node, path, rows, chunk_rows, channels_last, progress)
            elif node is not None and verify_frames > 0:
                source["verify"] = _verify(
                    node, path, columns["proprio"], layout, device, verify_frames, channels_last
                )
            writer.commit(columns, layout, source)
    return TwoRoomDataset.open(out)


def _read_columns(f, path: Path) -> dict[str, np.ndarray]:
    """Every column of :data:`COLUMNS` the file holds, in its dtype; ValueError for a
    missing required one (named with its accepted aliases)."""
    columns = {}
    for name, col in COLUMNS.items():
        kind = "float" if col.dtype.startswith("float") else "int"
        data = _read_column(f, path, name, kind)
        if data is None:
            if col.required:
                aliases = " or ".join(repr(k) for k in _ALIASES.get(name, (name,)))
                raise ValueError(f"{path}: column {aliases} is missing")
            continue
        columns[name] = data.astype(col.dtype, copy=False)
    return columns


def _copy_frames(writer, node, path: Path, rows: int, chunk_rows: int, channels_last: bool, progress: bool):
    bar = tqdm(total=rows, unit="frame", desc="import pixels", disable=not progress)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        writer.add_frames(_read_frames(node, path, start, stop, channels_last))
        bar.update(stop - start)
    bar.close()


def _layout(f, path: Path, layout: TwoRoomLayout | None) -> tuple[TwoRoomLayout, str]:
    """The layout to import with and where it came from: "argument", "file" or "default"."""
    if layout is not None:
        if not isinstance(layout, TwoRoomLayout):
            raise ValueError(f"layout must be a TwoRoomLayout or None, got {type(layout).__name__}")
        return layout, "argument"
    text = f.attrs.get("layout")
    if text is None:
        return DEFAULT_LAYOUT, "default"
    try:
        return TwoRoomLayout.from_dict(json.loads(text)), "file"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: attribute 'layout' is not a TwoRoomLayout as JSON ({exc})") from exc


def _check_dynamics(columns, path: Path, layout, layout_from: str, device, on_bad: str) -> dict:
    """Replay every transition (proprio[t], action[t]) -> proprio[t + 1] within an episode through step()."""
    starts = np.ones(columns["proprio"].shape[0], dtype=bool)
    starts[columns["ep_offset"] + columns["ep_len"] - 1] = False  # an episode's last row takes no action
    rows = np.flatnonzero(starts)  # (N,) rows whose action is replayed
    xy = torch.from_numpy(columns["proprio"]).to(device)
    index = torch.from_numpy(rows).to(device)
    action = torch.from_numpy(columns["action"]).to(device)[index]  # (N, 2), NaN rows left as NaN
    acted = ~torch.isnan(action).any(dim=1)
    moved = step(xy[index], torch.where(acted[:, None], action, 0.0), layout, check=False)
    error = (moved - xy[index + 1]).abs().amax(dim=1)  # (N,) px, largest coordinate error
    bad = ~acted | (error > DYNAMICS_TOLERANCE)
    mismatched = int(bad.sum())
    first = int(bad.nonzero()[0, 0]) if mismatched else None
    summary = {
        "transitions": int(rows.size),
        "mismatched": mismatched,
        "fraction": mismatched / rows.size if rows.size else 0.0,
        "first_row": int(rows[first]) if mismatched else None,
        "max_error_px": float(error[acted].max()) if bool(acted.any()) else None,
        "tolerance_px": DYNAMICS_TOLERANCE,
    }
    if on_bad == "raise" and summary["fraction"] > DYNAMICS_MAX_FRACTION:
        r = summary["first_row"]
        if bool(acted[first]):
            want, got = moved[first].tolist(), xy[r + 1].tolist()
            seen = f"step(proprio[{r}], action[{r}]) = {want}, proprio[{r + 1}] = {got}"
        else:
            seen = f"action[{r}] is NaN though the episode goes on"
        raise ValueError(
            f"{path}: column 'action' disagrees with the Two-Room dynamics on {mismatched} of "
            f"{rows.size} transitions ({100 * summary['fraction']:.2f}%, more than "
            f"{100 * DYNAMICS_MAX_FRACTION:g}%); first bad row {r} (episode "
            f"{int(columns['episode_idx'][r])}, step {int(columns['step_idx'][r])}): {seen}. Is the "
            f"column shifted by a row? Checked with {_LAYOUT_FROM[layout_from]}; "
            "on_bad_dynamics='record' (--allow-bad-dynamics) imports anyway"
        )
    return summary


def _verify(node, path, proprio, layout, device, count, channels_last) -> dict:
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(proprio.shape[0], size=min(count, proprio.shape[0]), replace=False))
    stored = np.stack([_read_frames(node, path, r, r + 1, channels_last)[0] for r in rows])
    drawn = render(torch.from_numpy(proprio[rows]).to(device), layout, check=False).cpu().numpy()
    diff = np.abs(stored.astype(np.int16) - drawn.astype(np.int16))  # (n, S, S, 3) grey levels
    pixels = (diff > 0).any(axis=-1)  # (n, S, S): a pixel differs when any of its channels does
    result = {
        "frames": int(rows.size),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": int(diff.max()),
        "mismatched_bytes": int((diff > 0).sum()),
        "mismatched_pixels": int(pixels.sum()),
        "mismatched_pixel_fraction": float(pixels.mean()),
    }
    if result["mean_abs_diff"] > 1.0:
        raise ValueError(
            f"{path}: column 'pixels' does not match frames rendered from proprio with this layout "
            f"(mean abs difference {result['mean_abs_diff']:.2f} over {rows.size} sampled frames); "
            "import with pixels='keep' or pass the matching TwoRoomLayout"
        )
    return result


def export_hdf5(
    dataset: TwoRoomDataset,
    path: str | os.PathLike,
    *,
    pixels: bool = True,
    device: str | torch.device = "cpu",
    force: bool = False,
    compression: str | None = "gzip",
    chunk_rows: int = 256,
    progress: bool = False,
) -> Path:
    """Write ``dataset`` to the HDF5 file ``path`` in the published layout (plus ``goal``).

    Pixels (``pixels=True``) come from the stored frames or are rendered on ``device``,
    uint8 (R, 224, 224, 3), one frame per HDF5 chunk with ``compression``. The file is
    written to a hidden temporary sibling and renamed into place when complete; an
    existing file is replaced only with ``force=True``.
    """
    h5py = _h5py()
    path = Path(path)
    if path.exists():
        if not path.is_file():
            raise FileExistsError(f"{path} exists and is not a file; refusing to replace it")
        if not force:
            raise FileExistsError(f"{path} already exists; pass force=True (--force) to replace it")
    rows, s = dataset.num_rows, dataset.layout.size
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = HDF5_FORMAT
            f.attrs["layout"] = json.dumps(dataset.layout.to_dict())
            for name in COLUMNS:
                value = getattr(dataset, name)
                if value is not None:
                    f.create_dataset(name, data=np.asarray(value))
            if pixels:
                node = f.create_dataset(
                    "pixels",
                    shape=(rows, s, s, 3),
                    dtype=np.uint8,
                    chunks=(1, s, s, 3),
                    compression=compression,
                )
                background = layout_image(dataset.layout, device)
                bar = tqdm(total=rows, unit="frame", desc="export pixels", disable=not progress)
                for start in range(0, rows, chunk_rows):
                    stop = min(start + chunk_rows, rows)
                    if dataset.has_frames:
                        node[start:stop] = dataset.read_frames(np.arange(start, stop))
                    else:
                        xy = torch.from_numpy(np.array(dataset.proprio[start:stop])).to(device)
                        node[start:stop] = (
                            render(xy, dataset.layout, background=background, check=False).cpu().numpy()
                        )
                    bar.update(stop - start)
                bar.close()
    return path
