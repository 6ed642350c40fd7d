"""Two-Room datasets: generation, on-disk storage, HDF5 import/export and training windows.

``import_hdf5`` / ``export_hdf5`` need h5py (``pip install lewm-fast[hdf5]``); it is
imported when they are called, so this package imports without it.
"""

from .dataset import TwoRoomDataset
from .generate import generate_dataset, rollout
from .hdf5 import export_hdf5, import_hdf5
from .windows import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelFrames,
    RenderedFrames,
    StoredFrames,
    TrainingWindows,
    action_stats,
    as_dataset,
    normalize_frames,
    window_rows,
    window_starts,
)

__all__ = [
    "TwoRoomDataset",
    "generate_dataset",
    "rollout",
    "import_hdf5",
    "export_hdf5",
    "TrainingWindows",
    "as_dataset",
    "ModelFrames",
    "RenderedFrames",
    "StoredFrames",
    "normalize_frames",
    "action_stats",
    "window_starts",
    "window_rows",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
