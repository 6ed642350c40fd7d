"""Training windows (spec section 5): indexable on the device, from stored or rendered frames.

A window starting at row t of an episode holds frames t, t+5, t+10, t+15 and, for frame
i, the 5 raw actions t+5i .. t+5i+4 concatenated (10 numbers), z-scored per raw dimension
with the dataset's mean and std (NaN rows excluded, NaN kept: the last window of an
episode ends on the episode's NaN action). Window t exists when rows t .. t+19 lie in one
episode, so an episode of L rows gives L - 19 windows. Pixels go uint8 -> [0, 1] ->
ImageNet mean/std -> resize to the model's image size (bilinear, antialiased; a no-op at
224), channels first. The windows are split 90/10 into train/val with
``torch.utils.data.random_split`` seeded with 3072.

Everything a batch needs lives on the device (window starts, z-scored actions,
positions), so a trainer iterates :meth:`TrainingWindows.batches` (a seeded shuffle per
epoch, resumable mid-epoch, sliced per process) with no loader workers. Frames come from
one of two interchangeable sources that give identical tensors for the same indices:

- :class:`RenderedFrames` renders frames from the positions on the device (reads no pixels
  from disk);
- :class:`StoredFrames` reads them from the dataset's memory-mapped shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .. import _checks
from ..envs.two_room import TwoRoomLayout, crop_pixels, dot_crop, layout_image, render
from .dataset import TwoRoomDataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize_frames",
    "action_stats",
    "window_starts",
    "window_rows",
    "ModelFrames",
    "RenderedFrames",
    "StoredFrames",
    "TrainingWindows",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_frames(frames: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """uint8 frames (..., H, W, 3) -> float32 (..., 3, S, S), ImageNet-normalised, resized to S.

    x = (u8 / 255 - mean) / std per channel, then a bilinear antialiased resize to
    ``image_size`` when it differs from H, W (none at the native size).
    """
    if frames.dtype != torch.uint8 or frames.dim() < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (..., H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    lead, (h, w) = frames.shape[:-3], frames.shape[-3:-1]
    x = frames.reshape(-1, h, w, 3).permute(0, 3, 1, 2).to(torch.float32)
    x = x / x.new_tensor(255.0)  # a device divisor: true division on CPU and CUDA alike
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if image_size is not None and (image_size, image_size) != (h, w):
        _checks.positive(image_size, "image_size")
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    return x.reshape(*lead, 3, x.shape[-2], x.shape[-1])


def action_stats(action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of raw actions (R, A), NaN rows excluded; float32 (A,) each.

    The std is the population one (divides by the row count), as the published pipeline's
    scikit-learn ``StandardScaler`` computes it.
    """
    valid = action[~np.isnan(action).any(axis=1)].astype(np.float64)
    if valid.shape[0] < 2:
        raise ValueError(f"need at least 2 non-NaN action rows to z-score actions, got {valid.shape[0]}")
    std = valid.std(axis=0, ddof=0)
    if (std == 0).any():
        raise ValueError(f"actions have zero variance in dimension(s) {np.flatnonzero(std == 0).tolist()}")
    return valid.mean(axis=0).astype(np.float32), std.astype(np.float32)


def window_starts(ep_len, span: int, ep_offset=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First row and episode of every window of ``span`` consecutive rows inside one episode.

    ep_len (E,) rows per episode; ep_offset (E,) first row of each episode (default
    ``cumsum(ep_len) - ep_len``: episodes stored end to end). Episode e holds
    n_e = max(ep_len[e] - span + 1, 0) windows, starting at rows ep_offset[e] + 0 .. n_e - 1.
    Returns ``starts`` and ``episode``, (W,) int64 each with W = sum(n_e), in episode then
    row order, on ep_len's device (numpy inputs give CPU tensors). No episode long enough
    gives W = 0; the caller says why that is an error.
    """
    ep_len = _int64(ep_len)
    if ep_offset is None:
        ep_offset = torch.cumsum(ep_len, 0) - ep_len
    ep_offset = _int64(ep_offset).to(ep_len.device)
    per_episode = torch.clamp(ep_len - span + 1, min=0)  # (E,)
    episode = torch.repeat_interleave(torch.arange(ep_len.shape[0], device=ep_len.device), per_episode)
    first_window = torch.cumsum(per_episode, 0) - per_episode  # (E,) index of each episode's first window
    within = torch.arange(episode.shape[0], device=ep_len.device) - first_window[episode]
    return ep_offset[episode] + within, episode


def _int64(values) -> torch.Tensor:
    """An int64 tensor of ``values``; numpy columns (often read-only memory maps) are copied."""
    if torch.is_tensor(values):
        return values.to(torch.int64)
    return torch.from_numpy(np.array(values, dtype=np.int64))


def window_rows(starts: torch.Tensor, num_frames: int, frameskip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of windows starting at ``starts`` (W,): frame rows (W, num_frames), frame i at
    t + frameskip * i, and action rows (W, num_frames * frameskip), t .. t + span - 1
    (frame i's action is rows t + frameskip * i .. + frameskip - 1, concatenated)."""
    steps = torch.arange(num_frames * frameskip, device=starts.device)
    return starts[:, None] + steps[::frameskip], starts[:, None] + steps


class RenderedFrames:
    """Frame source that renders rows from their positions on the device: rows (n,) -> uint8 (n, H, W, 3)."""

    def __init__(self, proprio: torch.Tensor, layout: TwoRoomLayout):
        self.proprio = proprio
        self.layout = layout
        self.background = layout_image(layout, proprio.device)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return render(self.proprio[rows], self.layout, background=self.background, check=False)


class ModelFrames:
    """Model-ready frames of agent positions, rendered and normalised in one pass.

    ``ModelFrames(layout, image_size, device)(xy)``: positions (N, 2) float -> float32
    (N, 3, S, S), the value of ``normalize_frames(render(xy, layout), image_size)`` without
    building the full-size frames. A frame differs from the empty scene only in the K x K
    crop the dot changes (:func:`~lewm_fast.envs.two_room.dot_crop`), and normalisation
    and the bilinear antialiased resize are both linear, so

        frame = resize(norm(scene)) + R[:, rows] @ (norm(crop) - norm(scene crop)) @ R[:, cols]^T

    per channel, where R (S, size) holds the resize's own weights (``F.interpolate`` of the
    unit vectors, so the same filter) and norm is a 256-entry table per channel computed
    with :func:`normalize_frames`' operations. At S = size there is no resize and the
    result is bit-identical to the two-step path; at other sizes it equals it up to float32
    rounding (a few 1e-7; tested at 1e-5). On a CPU at 64 px this is about 10x cheaper
    than rendering and normalising 224 px frames, most of a small model's training step.
    """

    def __init__(self, layout: TwoRoomLayout, image_size: int, device: str | torch.device = "cpu"):
        _checks.positive(image_size, "image_size")
        self.layout, self.image_size, self.device = layout, int(image_size), torch.device(device)
        self.background = layout_image(layout, self.device)
        levels = torch.arange(256, dtype=torch.uint8, device=self.device).view(1, 1, 256, 1)
        self.table = normalize_frames(levels.repeat(1, 1, 1, 3))[0, :, 0]  # (3, 256): channel c, level u
        scene = self._norm(self.background.permute(2, 0, 1))  # (3, size, size)
        self.size = layout.size
        self.scene_table = scene.reshape(3, -1)  # (3, size * size)
        if self.image_size == self.size:
            self.scene, self.weights = scene, None
        else:
            self.scene = F.interpolate(
                scene[None], size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True
            )[0]
            eye = torch.eye(self.size, device=self.device).view(1, self.size, 1, self.size)
            weights = F.interpolate(
                eye, size=(1, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )  # (1, size, 1, S): input pixel i's weight in output pixel j
            self.weights = weights[0, :, 0].t().contiguous()  # (S, size)

    def _norm(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (3, ...) channel-first -> normalised float32 by table lookup."""
        flat = pixels.reshape(3, -1).long()
        return torch.gather(self.table, 1, flat).view(pixels.shape)

    def __call__(self, xy: torch.Tensor) -> torch.Tensor:
        xy = xy.to(self.device, torch.float32)
        n, s = xy.shape[0], self.image_size
        if n == 0:
            return self.scene.expand(0, 3, s, s).clone()
        rows, cols, crop = dot_crop(xy, self.layout, self.background)  # (N, K), (N, K), (N, K, K, 3)
        k = rows.shape[1]
        crop = self._norm(crop.permute(3, 0, 1, 2))  # (3, N, K, K)
        pixel = crop_pixels(rows, cols, self.size)  # (N, K, K) flat canvas indices
        if self.weights is None:  # no resize: the normalised scene with the crop pasted in
            flat = self.scene_table.repeat(1, n)  # (3, N * S * S)
            frame = torch.arange(n, device=self.device)[:, None, None] * (s * s)
            flat.index_copy_(1, (pixel + frame).view(-1), crop.reshape(3, -1))
            return flat.view(3, n, s, s).transpose(0, 1).contiguous()
        base = self.scene_table.index_select(1, pixel.view(-1)).view(3, n, k, k)  # the scene's crop
        delta = (crop - base).transpose(0, 1)  # (N, 3, K, K), zero where the dot leaves the scene
        left = self.weights[:, rows].permute(1, 0, 2)  # (N, S, K)
        right = self.weights[:, cols].permute(1, 2, 0)  # (N, K, S)
        return self.scene + left[:, None] @ delta @ right[:, None]


class StoredFrames:
    """Frame source that reads rows from the dataset's stored shards and copies them to ``device``."""

    def __init__(self, dataset: TwoRoomDataset, device: torch.device):
        if not dataset.has_frames:
            raise ValueError(
                f"{dataset.path} stores no frames; use source='rendered' or generate with frames"
            )
        self.dataset = dataset
        self.device = device

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        frames = torch.from_numpy(self.dataset.read_frames(rows.cpu().numpy()))
        if self.device.type == "cuda":
            frames = frames.pin_memory()
        return frames.to(self.device, non_blocking=True)


class TrainingWindows:
    """The training windows of a dataset with a frame source, split into train and val.

    Args:
        dataset: an opened :class:`TwoRoomDataset`.
        source: "rendered" (default; frames rendered on ``device`` from positions),
            "stored" (frames read from the dataset), or any callable rows (n,) -> uint8
            (n, H, W, 3) on ``device``.
        device: where batches are built and returned.
        image_size: model image size S (frames are resized when S != 224).
        num_frames, frameskip: window shape (4 frames, 5 raw actions per frame).
        val_fraction, split_seed: the 90/10 split seeded with 3072.

    Attributes: ``starts`` (W,) first row of each window, ``train_ids`` / ``val_ids``
    window indices, ``action_mean`` / ``action_std`` (2,), all int64/float32 on ``device``.
    """

    def __init__(
        self,
        dataset: TwoRoomDataset,
        *,
        source="rendered",
        device: str | torch.device = "cpu",
        image_size: int = 224,
        num_frames: int = 4,
        frameskip: int = 5,
        val_fraction: float = 0.1,
        split_seed: int = 3072,
    ):
        for name, value in (("num_frames", num_frames), ("frameskip", frameskip), ("image_size", image_size)):
            _checks.positive(value, name)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.dataset = dataset
        self.device = torch.device(device)
        self.image_size = image_size
        self.num_frames = num_frames
        self.frameskip = frameskip
        self.span = num_frames * frameskip

        ep_len = np.asarray(dataset.ep_len)
        starts, _ = window_starts(ep_len, self.span, np.asarray(dataset.ep_offset))
        if starts.numel() == 0:
            raise ValueError(
                f"{dataset.path}: no episode has the {self.span} rows a window of {num_frames} frames at "
                f"frameskip {frameskip} needs (longest episode: {int(ep_len.max())} rows)"
            )
        self.starts = starts.to(self.device)

        n = len(starts)
        train, val = torch.utils.data.random_split(
            range(n), [1.0 - val_fraction, val_fraction], generator=torch.Generator().manual_seed(split_seed)
        )
        self.train_ids = torch.tensor(train.indices, dtype=torch.int64, device=self.device)
        self.val_ids = torch.tensor(val.indices, dtype=torch.int64, device=self.device)

        action = np.array(dataset.action)  # copies out of the read-only memory map
        mean, std = action_stats(action)
        self.action_mean = torch.from_numpy(mean).to(self.device)
        self.action_std = torch.from_numpy(std).to(self.device)
        self._actions = (torch.from_numpy(action).to(self.device) - self.action_mean) / self.action_std
        self._proprio = torch.from_numpy(np.array(dataset.proprio)).to(self.device)
        self._goal = (
            None if dataset.goal is None else torch.from_numpy(np.array(dataset.goal)).to(self.device)
        )
        self._model_frames = None
        if source == "rendered":
            self.frames = RenderedFrames(self._proprio, dataset.layout)
            self._model_frames = ModelFrames(dataset.layout, image_size, self.device)
        elif source == "stored":
            self.frames = StoredFrames(dataset, self.device)
        elif callable(source):
            self.frames = source
        else:
            raise ValueError(f"source must be 'rendered', 'stored' or a callable, got {source!r}")

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def frame_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dataset rows of the frames of windows ``ids`` (B,) -> (B, num_frames)."""
        return window_rows(self.starts[ids], self.num_frames, self.frameskip)[0]

    def actions(self, ids: torch.Tensor) -> torch.Tensor:
        """Z-scored model actions of windows ``ids`` (B,) -> (B, num_frames, frameskip * 2), NaN kept."""
        rows = window_rows(self.starts[ids], self.num_frames, self.frameskip)[1]  # (B, T * skip)
        return self._actions[rows].reshape(ids.shape[0], self.num_frames, -1)

    def batch(self, ids, *, check: bool = True) -> dict[str, torch.Tensor]:
        """The windows ``ids`` (B,) int as a training batch on ``device``.

        Returns ``pixels`` (B, 4, 3, S, S) float32 (normalised), ``action`` (B, 4, 10)
        float32 (z-scored, NaN at episode ends), ``proprio`` (B, 4, 2) raw agent positions
        of the 4 frames, ``goal`` (B, 2) when the dataset has goals, and ``ids`` (B,).
        ``check=False`` skips the range check of ``ids`` (a device sync).
        """
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.device).reshape(-1)
        if check and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise ValueError(
                f"window ids must be in [0, {len(self)}), got {int(ids.min())}..{int(ids.max())}"
            )
        b = ids.shape[0]
        rows = self.frame_rows(ids)  # (B, T)
        if self._model_frames is not None:  # rendered: straight to model frames
            pixels = self._model_frames(self._proprio[rows.reshape(-1)])
        else:
            frames = self.frames(rows.reshape(-1))  # (B*T, H, W, 3) uint8
            pixels = normalize_frames(frames, self.image_size)
        out = {
            "pixels": pixels.reshape(b, self.num_frames, 3, self.image_size, -1),
            "action": self.actions(ids),
            "proprio": self._proprio[rows],
            "ids": ids,
        }
        if self._goal is not None:
            out["goal"] = self._goal[self.starts[ids]]
        return out

    def batches(
        self,
        split: str = "train",
        batch_size: int = 128,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of batches (see :meth:`batch`) over ``split`` ("train", "val" or "all").

        The split's window ids are shuffled on the device by ``torch.randperm`` drawn from
        ``generator``, or from a fresh generator on ``device`` seeded with ``seed`` (the same
        ``seed`` gives the same order, so pass a new one each epoch; the trainer passes
        ``TrainConfig.seed + epoch``), or else from the global stream; ``shuffle=False``
        keeps the split's order. Global batch i holds windows ``[i * batch_size, (i + 1) *
        batch_size)`` of that order; ``drop_last`` drops a short last batch. Iteration
        starts at global batch ``start`` (a resumed epoch yields exactly the batches it had
        left). With ``world_size`` > 1 each process takes the ``rank``-th contiguous
        ``batch_size // world_size`` windows of every global batch, so ranks get disjoint
        slices that together cover it.

        Raises ValueError for an unknown split, a batch_size that is not a positive integer
        or not a multiple of ``world_size``, a negative ``start``, a ``rank`` outside
        [0, world_size), both ``generator`` and ``seed``, or ``drop_last=False`` with
        ``world_size`` > 1 (the ranks' last batches would differ in size).
        """
        ids = {"train": self.train_ids, "val": self.val_ids}.get(split)
        if ids is None:
            if split != "all":
                raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
            ids = torch.arange(len(self), device=self.device)
        _checks.positive(batch_size, "batch_size")
        _checks.positive(world_size, "world_size")
        _checks.integer(start, "start", 0)
        _checks.integer(rank, "rank", 0)
        if rank >= world_size or batch_size % world_size:
            raise ValueError(
                f"need 0 <= rank < world_size and batch_size divisible by world_size, got rank {rank}, "
                f"world_size {world_size}, batch_size {batch_size}"
            )
        if world_size > 1 and not drop_last:
            raise ValueError("drop_last=False needs world_size 1: the ranks' last batches would differ")
        if seed is not None:
            if generator is not None:
                raise ValueError("give a generator or a seed, not both")
            generator = torch.Generator(device=self.device).manual_seed(seed)
        if shuffle:
            ids = ids[torch.randperm(ids.shape[0], device=self.device, generator=generator)]
        local = batch_size // world_size
        stop = ids.shape[0] - batch_size + 1 if drop_last else ids.shape[0]
        for i in range(start * batch_size, max(stop, 0), batch_size):
            first = i + rank * local
            yield self.batch(ids[first : first + local], check=False)


def as_dataset(dataset: TwoRoomDataset | TrainingWindows | str | os.PathLike) -> TwoRoomDataset:
    """The dataset behind ``dataset``: a dataset folder is opened, ``TrainingWindows`` give
    their dataset, a ``TwoRoomDataset`` is returned as is; anything else is a ValueError."""
    if isinstance(dataset, TrainingWindows):
        return dataset.dataset
    if isinstance(dataset, TwoRoomDataset):
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        return TwoRoomDataset.open(dataset)
    raise ValueError(
        f"dataset must be a dataset folder, a TwoRoomDataset or TrainingWindows, got {type(dataset).__name__}"
    )
