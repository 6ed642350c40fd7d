"""Probes of a trained LeWM (issue 7): what the frozen embeddings know about the state, how
well the predictor predicts one step ahead on data it never saw, and how Gaussian the
embeddings are.

Three measurements, each a function here, all run by :func:`run_probes`:

1. **Linear probe** (:func:`linear_probe`): frames rendered on the model's device from
   dataset states are embedded by the frozen model (encoder CLS -> projector, eval mode),
   and a closed-form ridge regression with a bias maps the embeddings to the agent's
   (x, y). The dataset's episodes are split (seeded) into probe-train and probe-test
   episodes, so no test frame comes from an episode the probe was fitted on; R^2 per
   coordinate is measured on the test episodes. Features are z-scored with the
   probe-train statistics and the ridge strength alpha (penalty alpha * ||W||^2 on the
   mean squared error) is chosen from :data:`DEFAULT_ALPHAS` on a validation split of
   the probe-train episodes, then the probe is refitted on all of them. (The encoder
   itself was trained on windows from every episode, since the published 90/10 split is
   by window; "held out" means held out from the probe's fit.)
2. **1-step predictor MSE on fresh rollouts** (:func:`fresh_windows`,
   :func:`one_step_mse`): new episodes are rolled out with the environment and the
   noisy-expert policy under a seed that the training data does not use, cut into
   windows exactly like training (4 frames at frameskip 5, 10-number actions z-scored
   with the *dataset's* statistics), and the MSE between ``predict(emb[:, :3],
   act_emb[:, :3])`` and ``emb[:, 1:]`` is averaged over windows, the 3 positions and the
   embedding dimensions -- the training ``pred_loss`` formula, in eval mode, on unseen
   data.
3. **SIGReg of held-out embeddings** (:func:`sigreg_heldout`): the SIGReg statistic (spec
   section 3, 17 knots, 1024 directions drawn from a seeded generator) of the fresh
   windows' embeddings laid out as in training, (T=4, B, D), with B = 128 windows each
   from a different fresh episode (so the batch is as independent as a training batch
   drawn from 10,000 episodes), averaged over several batches. The statistic grows with
   B for a non-Gaussian distribution, so the batch size is part of the result.

Everything returns plain Python numbers (JSON-serialisable). Nothing here touches a GPU
unless the model or ``device`` is on one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _checks
from .data.dataset import TwoRoomDataset
from .data.generate import draw_episodes, rollout
from .data.windows import action_stats, as_dataset, normalize_frames, window_rows, window_starts
from .envs.policies import make_policy
from .envs.two_room import DEFAULT_LAYOUT, TwoRoomLayout, layout_image, render
from .reference.jepa import action_width_of, device_of
from .sigreg import sigreg as _sigreg
from .train.step import loss_head

__all__ = [
    "DEFAULT_ALPHAS",
    "FRESH_SEED_OFFSET",
    "RidgeProbe",
    "ridge_fit",
    "r2_score",
    "select_alpha",
    "split_episodes",
    "encode_positions",
    "linear_probe",
    "FreshWindows",
    "fresh_windows",
    "encode_windows",
    "one_step_mse",
    "sigreg_heldout",
    "run_probes",
]

# Ridge strengths tried on the validation split (penalty alpha * ||W||^2 on the mean squared
# error of z-scored features: 1e-6 is ordinary least squares in all but name).
DEFAULT_ALPHAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Fresh rollouts use seed FRESH_SEED_OFFSET + seed by default: far from the small seeds
# datasets are generated with (lewm-fast generate-data defaults to 0).
FRESH_SEED_OFFSET = 1_000_000
COORDS = ("x", "y")


def _check_fraction(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


# ------------------------------------------------------------------------ model helpers
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _model_device(model: nn.Module) -> torch.device:
    device = device_of(model)
    if device is None:
        raise ValueError("the model has no parameters")
    return device


def _model_image_size(model: nn.Module) -> int:
    size = getattr(getattr(getattr(model, "encoder", None), "config", None), "image_size", None)
    if size is None:
        raise ValueError("cannot read the model's image size from model.encoder.config.image_size")
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def encode_positions(
    model: nn.Module,
    positions: torch.Tensor,
    *,
    layout: TwoRoomLayout = DEFAULT_LAYOUT,
    batch_size: int = 256,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Frozen embeddings of agent positions: (N, 2) float (x, y) -> (N, D) float32.

    Each position is rendered on the model's device (:func:`lewm_fast.envs.render`),
    normalised and resized to the model's image size (spec section 5) and embedded with
    ``model.encode`` (encoder CLS token -> projector) in eval mode, ``batch_size`` frames
    at a time, optionally under ``autocast`` (e.g. ``torch.bfloat16``). Returns the
    embeddings on the model's device.
    """
    if not torch.is_tensor(positions) or positions.dim() != 2 or positions.shape[1] != 2:
        shape = tuple(positions.shape) if torch.is_tensor(positions) else type(positions).__name__
        raise ValueError(f"positions must be a tensor of shape (N, 2), got {shape}")
    _checks.integer(batch_size, "batch_size", 1, numpy=True)
    device = _model_device(model)
    size = _model_image_size(model)
    positions = positions.to(device=device, dtype=torch.float32)
    background = layout_image(layout, device)
    out = []
    with _eval_mode(model):
        for i in range(0, positions.shape[0], batch_size):
            frames = render(positions[i : i + batch_size], layout, background=background, check=False)
            pixels = normalize_frames(frames, size)[:, None]  # (n, 1, 3, S, S)
            with _autocast(device, autocast):
                emb = model.encode({"pixels": pixels})["emb"]
            out.append(emb[:, 0].float())
    if not out:
        raise ValueError("positions is empty")
    return torch.cat(out)


# ------------------------------------------------------------------------ ridge probe
@dataclass(frozen=True)
class RidgeProbe:
    """A fitted linear probe: y = ((x - mean) / scale) @ weight + bias.

    ``weight`` (D, K), ``bias`` (K,), ``mean`` and ``scale`` (D,), all float64 on the CPU;
    ``alpha`` the ridge strength it was fitted with.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    alpha: float

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions (N, K) float64 for features x (N, D)."""
        x = _features(x, "x")
        if x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"x has {x.shape[1]} features, the probe was fitted on {self.weight.shape[0]}")
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def _features(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 2:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (N, D), got {shape}")
    x = x.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def _targets(y: torch.Tensor, n: int, name: str) -> torch.Tensor:
    y = _features(y, name)
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} rows, expected {n} (one per feature row)")
    return y


def ridge_fit(x: torch.Tensor, y: torch.Tensor, alpha: float) -> RidgeProbe:
    """Closed-form ridge regression with a bias: features x (N, D), targets y (N, K).

    Features are z-scored with their own mean and standard deviation (constant features
    get scale 1), then W = argmin mean_n ||z_n W + b - y_n||^2 + alpha ||W||^2, i.e.
    (Z^T Z / N + alpha I) W = Z^T (y - mean(y)) / N and b = mean(y); the bias is not
    penalised. Solved in float64 on the CPU. ``alpha`` must be > 0.
    """
    x = _features(x, "x")
    y = _targets(y, x.shape[0], "y")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or math.isinf(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"ridge_fit needs at least 2 samples, got {n}")
    mean = x.mean(0)
    scale = x.std(0)
    scale = torch.where(scale > 1e-12 * (1 + mean.abs()), scale, torch.ones_like(scale))
    z = (x - mean) / scale
    y_mean = y.mean(0)
    gram = z.T @ z / n + float(alpha) * torch.eye(d, dtype=torch.float64)
    weight = torch.linalg.solve(gram, z.T @ (y - y_mean) / n)
    return RidgeProbe(weight, y_mean, mean, scale, float(alpha))


def r2_score(y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination per target column: y, pred (N, K) -> (K,) float64.

    R^2 = 1 - sum_n (y - pred)^2 / sum_n (y - mean_n y)^2 (1 for a perfect fit, 0 for
    predicting the mean, negative for worse); NaN for a constant column.
    """
    y = _features(y, "y")
    pred = _targets(pred, y.shape[0], "pred")
    if pred.shape[1] != y.shape[1]:
        raise ValueError(f"pred has {pred.shape[1]} columns, y has {y.shape[1]}")
    if y.shape[0] < 2:
        raise ValueError(f"R^2 needs at least 2 samples, got {y.shape[0]}")
    ss_res = (y - pred).square().sum(0)
    ss_tot = (y - y.mean(0)).square().sum(0)
    return torch.where(ss_tot > 0, 1.0 - ss_res / ss_tot, torch.full_like(ss_tot, float("nan")))


def select_alpha(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: Sequence[int] | np.ndarray,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> tuple[float, dict[str, float]]:
    """The ridge strength with the lowest validation MSE, validating on held-out groups.

    x (N, D), y (N, K), ``groups`` (N,) the episode of each row. A seeded
    ``val_fraction`` of the groups (at least one) is held out; each alpha is fitted on the
    rest. Returns (best alpha, {str(alpha): validation MSE}); ties go to the larger alpha.
    """
    x = _features(x, "x")
    y = _targets(y, x.shape[0], "y")
    groups = np.asarray(groups).reshape(-1)
    if groups.shape[0] != x.shape[0]:
        raise ValueError(f"groups has {groups.shape[0]} entries, expected {x.shape[0]}")
    if not alphas:
        raise ValueError("alphas is empty")
    _check_fraction("val_fraction", val_fraction)
    unique = np.unique(groups)
    if unique.size < 2:
        raise ValueError(
            f"choosing alpha needs at least 2 episodes in the probe's train split, got {unique.size}; "
            "pass alpha= to fix it instead"
        )
    rng = np.random.default_rng(seed)
    n_val = min(max(1, round(val_fraction * unique.size)), unique.size - 1)
    val_groups = rng.permutation(unique)[:n_val]
    val = torch.from_numpy(np.isin(groups, val_groups))
    scores: dict[str, float] = {}
    best, best_mse = None, math.inf
    for alpha in sorted(float(a) for a in alphas):
        probe = ridge_fit(x[~val], y[~val], alpha)
        mse = float((probe.predict(x[val]) - y[val]).square().mean())
        scores[repr(alpha)] = mse
        if mse <= best_mse:
            best, best_mse = alpha, mse
    return best, scores


def split_episodes(num_episodes: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of episode indices 0..E-1 into (train, test), both sorted int64.

    The test split holds round(test_fraction * E) episodes, at least 1, and leaves at
    least 1 for training.
    """
    num_episodes = _checks.integer(num_episodes, "num_episodes", 2, numpy=True)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    n_test = min(max(1, round(test_fraction * num_episodes)), num_episodes - 1)
    order = np.random.default_rng(seed).permutation(num_episodes)
    return np.sort(order[n_test:]).astype(np.int64), np.sort(order[:n_test]).astype(np.int64)


def linear_probe(
    model: nn.Module,
    dataset: TwoRoomDataset | str | os.PathLike,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_frames: int = 20_000,
    alpha: float | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    batch_size: int = 256,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Linear probe from frozen embeddings to the agent's (x, y), evaluated on held-out episodes.

    Episodes are split with :func:`split_episodes` (``seed``, ``test_fraction``); at most
    ``max_frames`` dataset rows are used, drawn uniformly (seeded) from each split in
    proportion to the split fractions. The frames are rendered from the rows' positions
    and embedded by :func:`encode_positions`; alpha is ``alpha`` when given, else chosen
    by :func:`select_alpha` on the probe-train episodes. Returns ``r2`` {x, y} on the test
    episodes, ``rmse_px`` {x, y}, ``alpha``, ``val_mse_by_alpha`` (empty when alpha was
    given), frame and episode counts, ``seed`` and ``test_fraction``.
    """
    data = as_dataset(dataset)
    seed = _checks.integer(seed, "seed", 0, numpy=True)
    max_frames = _checks.integer(max_frames, "max_frames", 4, numpy=True)
    train_eps, test_eps = split_episodes(data.num_episodes, test_fraction, seed)
    rng = np.random.default_rng([seed, 1])
    row_episode = np.repeat(np.arange(data.num_episodes), np.asarray(data.ep_len))
    cap_train = max(2, round(max_frames * (1.0 - test_fraction)))
    cap_test = max(2, max_frames - cap_train)
    split_rows = []
    for episodes, cap in ((train_eps, cap_train), (test_eps, cap_test)):
        rows = np.flatnonzero(np.isin(row_episode, episodes))
        if rows.size > cap:
            rows = np.sort(rng.choice(rows, size=cap, replace=False))
        if rows.size < 2:
            raise ValueError(f"{data.path}: a probe split has {rows.size} frame(s); need at least 2")
        split_rows.append(rows)
    train_rows, test_rows = split_rows
    xy = torch.from_numpy(np.asarray(data.proprio)[np.concatenate(split_rows)])  # a copy
    x_all = encode_positions(
        model,
        xy,
        layout=data.layout,
        batch_size=batch_size,
        autocast=autocast,
    ).cpu()
    x_train, x_test = x_all[: train_rows.size], x_all[train_rows.size :]
    y_train, y_test = xy[: train_rows.size].double(), xy[train_rows.size :].double()
    scores: dict[str, float] = {}
    if alpha is None:
        alpha, scores = select_alpha(x_train, y_train, row_episode[train_rows], alphas, seed=seed)
    probe = ridge_fit(x_train, y_train, alpha)
    pred = probe.predict(x_test)
    r2 = r2_score(y_test, pred)
    rmse = (pred - y_test).square().mean(0).sqrt()
    return {
        "r2": {c: float(v) for c, v in zip(COORDS, r2.tolist())},
        "rmse_px": {c: float(v) for c, v in zip(COORDS, rmse.tolist())},
        "alpha": float(alpha),
        "val_mse_by_alpha": scores,
        "train_frames": int(train_rows.size),
        "test_frames": int(test_rows.size),
        "train_episodes": int(train_eps.size),
        "test_episodes": int(test_eps.size),
        "seed": seed,
        "test_fraction": float(test_fraction),
    }


# ------------------------------------------------------------------------ fresh rollouts
@dataclass(frozen=True)
class FreshWindows:
    """Training-style windows cut from freshly rolled-out episodes (all tensors on one device).

    ``positions`` (R, 2): agent position at every row of every fresh episode (rows grouped
    by episode); ``frame_rows`` (W, T): rows of the T frames of each window (start + 5 i);
    ``action`` (W, T, frameskip * 2): z-scored model actions, NaN where an episode's last
    row (which takes no action) falls in the window, as in training; ``episode`` (W,):
    the fresh episode of each window. ``seed``, ``episodes``, ``policy``: how they were made.
    """

    positions: torch.Tensor
    frame_rows: torch.Tensor
    action: torch.Tensor
    episode: torch.Tensor
    seed: int
    episodes: int
    policy: str

    def __len__(self) -> int:
        return int(self.frame_rows.shape[0])


@torch.no_grad()
def fresh_windows(
    action_mean: torch.Tensor | np.ndarray,
    action_std: torch.Tensor | np.ndarray,
    *,
    episodes: int = 256,
    seed: int = FRESH_SEED_OFFSET,
    policy: str = "expert",
    max_steps: int = 100,
    frameskip: int = 5,
    num_frames: int = 4,
    layout: TwoRoomLayout = DEFAULT_LAYOUT,
    device: str | torch.device = "cpu",
) -> FreshWindows:
    """Roll out ``episodes`` new episodes and cut them into windows like training (spec section 5).

    Episode e is :func:`lewm_fast.envs.episode_generator` (``seed``, e) rolled out with
    ``policy`` ("expert": the published noisy expert; "random") until success or
    ``max_steps`` actions -- the same process as ``generate_dataset(seed=seed)``, so a seed
    different from the training dataset's gives episodes the model never saw. The windows
    are those of training (:func:`lewm_fast.data.windows.window_starts` and
    :func:`~lewm_fast.data.windows.window_rows`): a window starts at every row t with rows
    t .. t + num_frames * frameskip - 1 in one episode; its frame i is row t + frameskip * i
    and its action i the raw actions of rows t + frameskip * i .. + frameskip - 1,
    concatenated and z-scored with ``action_mean`` and ``action_std`` (2,) -- pass the
    training dataset's statistics.
    """
    episodes = _checks.integer(episodes, "episodes", 1, numpy=True)
    seed = _checks.integer(seed, "seed", 0, numpy=True)
    max_steps = _checks.integer(max_steps, "max_steps", 1, numpy=True)
    frameskip = _checks.integer(frameskip, "frameskip", 1, numpy=True)
    num_frames = _checks.integer(num_frames, "num_frames", 2, numpy=True)
    device = torch.device(device)
    mean = torch.as_tensor(action_mean, dtype=torch.float32).reshape(-1).to(device)
    std = torch.as_tensor(action_std, dtype=torch.float32).reshape(-1).to(device)
    if mean.shape != (2,) or std.shape != (2,) or not bool((std > 0).all()):
        raise ValueError(f"action_mean and action_std must be (2,) with std > 0, got {mean}, {std}")
    actor = make_policy(policy, layout)
    starts, goals, noise = draw_episodes(seed, range(episodes), actor, max_steps, layout)
    starts, goals, noise = starts.to(device), goals.to(device), noise.to(device)
    positions, actions, lengths = rollout(starts, goals, noise, actor, layout)

    c = positions.shape[0]
    ep_len = lengths + 1  # rows per episode: actions taken + 1
    keep = torch.arange(max_steps + 1, device=device)[None, :] < ep_len[:, None]  # (C, T + 1)
    raw = torch.cat([actions, torch.full((c, 1, 2), float("nan"), device=device)], dim=1)
    raw[torch.arange(c, device=device), lengths] = float("nan")  # the last row takes no action
    row_xy = positions[keep]  # (R, 2)
    row_action = (raw[keep] - mean) / std  # (R, 2) z-scored, NaN kept

    start, episode = window_starts(ep_len, num_frames * frameskip)  # (W,) each
    if start.numel() == 0:
        raise ValueError(
            f"none of the {episodes} fresh episodes has the {num_frames * frameskip} rows a window needs "
            f"(longest: {int(ep_len.max())} rows); roll out more episodes or more steps"
        )
    frame_rows, action_rows = window_rows(start, num_frames, frameskip)  # (W, T), (W, T * frameskip)
    window_action = row_action[action_rows].reshape(start.shape[0], num_frames, frameskip * 2)
    return FreshWindows(row_xy, frame_rows, window_action, episode, seed, episodes, actor.name)


def encode_windows(
    model: nn.Module,
    windows: FreshWindows,
    *,
    layout: TwoRoomLayout = DEFAULT_LAYOUT,
    batch_size: int = 256,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Embeddings of the windows' frames, (W, T, D) float32 on the model's device.

    Every row of the fresh episodes is rendered and embedded once (eval mode: a frame's
    embedding does not depend on its batch), then gathered into windows.
    """
    emb_rows = encode_positions(
        model, windows.positions, layout=layout, batch_size=batch_size, autocast=autocast
    )
    return emb_rows[windows.frame_rows.to(emb_rows.device)]


@torch.no_grad()
def one_step_mse(
    model: nn.Module,
    emb: torch.Tensor,
    action: torch.Tensor,
    *,
    history_size: int = 3,
    batch_size: int = 1024,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """1-step predictor MSE: emb (W, T, D) frame embeddings, action (W, T, A) z-scored.

    The training ``pred_loss`` (:func:`lewm_fast.train.step.loss_head`, eval mode): pred =
    model.predict(emb[:, :H], action_encoder(action)[:, :H]) with H = ``history_size``
    (NaN actions -> 0, as in training), target = emb[:, 1:H+1]; ``mse`` = mean over
    windows, positions and dims of (pred - target)^2. ``mse_by_position``[i] is the mean at position i,
    predicting frame i + 1 from frames 0..i. Also returns ``windows``.
    """
    history_size = _checks.integer(history_size, "history_size", 1, numpy=True)
    _checks.integer(batch_size, "batch_size", 1, numpy=True)
    if not torch.is_tensor(emb) or emb.dim() != 3 or emb.shape[1] < history_size + 1:
        shape = tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__
        raise ValueError(
            f"emb must be (W, T, D) with T >= history_size + 1 = {history_size + 1}; got {shape}"
        )
    if not torch.is_tensor(action) or action.dim() != 3 or action.shape[:2] != emb.shape[:2]:
        shape = tuple(action.shape) if torch.is_tensor(action) else type(action).__name__
        raise ValueError(
            f"action must be (W, T, A) with the (W, T) of emb {tuple(emb.shape[:2])}, got {shape}"
        )
    device = _model_device(model)
    emb, action = emb.to(device), action.to(device)
    sums = torch.zeros(history_size, dtype=torch.float64, device=device)
    with _eval_mode(model):
        for i in range(0, emb.shape[0], batch_size):
            e = emb[i : i + batch_size].float()
            with _autocast(device, autocast):
                losses = loss_head(
                    model, e, action[i : i + batch_size], history_size=history_size, by_position=True
                )
            sums += losses["pred_loss_by_position"].double() * e.shape[0]  # (H,) window-weighted
    by_position = (sums / emb.shape[0]).tolist()
    return {
        "mse": float(sum(by_position) / history_size),
        "mse_by_position": [float(v) for v in by_position],
        "windows": int(emb.shape[0]),
    }


@torch.no_grad()
def sigreg_heldout(
    emb: torch.Tensor,
    episode: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 128,
    batches: int = 16,
    num_proj: int = 1024,
    knots: int = 17,
    seed: int = 0,
) -> dict[str, Any]:
    """SIGReg statistic of held-out window embeddings emb (W, T, D), laid out as in training.

    Each of ``batches`` batches takes ``batch_size`` windows from distinct episodes
    (``episode`` (W,) names each window's episode; fewer episodes than ``batch_size``
    shrink the batch to their number), transposes them to (T, B, D) and evaluates
    :func:`lewm_fast.sigreg` with ``num_proj`` unit directions drawn from a generator
    seeded with ``seed``. Returns ``value`` (mean over batches), ``std``, ``batches``,
    ``batch_size`` (the B used), ``num_proj`` and ``knots``.
    """
    _checks.integer(batch_size, "batch_size", 2, numpy=True)
    batches = _checks.integer(batches, "batches", 1, numpy=True)
    num_proj = _checks.integer(num_proj, "num_proj", 1, numpy=True)
    seed = _checks.integer(seed, "seed", 0, numpy=True)
    if not torch.is_tensor(emb) or emb.dim() != 3:
        shape = tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__
        raise ValueError(f"emb must be a tensor (W, T, D), got {shape}")
    episode = np.asarray(episode.cpu() if torch.is_tensor(episode) else episode).reshape(-1)
    if episode.shape[0] != emb.shape[0]:
        raise ValueError(f"episode has {episode.shape[0]} entries, emb has {emb.shape[0]} windows")
    labels, inverse = np.unique(episode, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(labels.size)]
    b = min(batch_size, labels.size)
    if b < 2:
        raise ValueError(f"SIGReg needs windows from at least 2 episodes, got {labels.size}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(batches):
        chosen = rng.choice(labels.size, size=b, replace=False)
        ids = torch.as_tensor([int(rng.choice(members[k])) for k in chosen], device=emb.device)
        z = emb[ids].float().transpose(0, 1).contiguous()  # (T, B, D)
        directions = torch.randn(z.shape[-1], num_proj, generator=gen)
        directions = directions.div_(directions.norm(dim=0)).to(emb.device)
        values.append(float(_sigreg(z, directions, knots)))
    return {
        "value": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "batches": batches,
        "batch_size": int(b),
        "num_proj": num_proj,
        "knots": int(knots),
    }


# ------------------------------------------------------------------------ everything
def run_probes(
    model: nn.Module,
    dataset: TwoRoomDataset | str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_frames: int = 20_000,
    alpha: float | None = None,
    fresh_episodes: int = 256,
    rollout_seed: int | None = None,
    policy: str = "expert",
    max_steps: int = 100,
    frameskip: int = 5,
    history_size: int = 3,
    sigreg_batch_size: int = 128,
    sigreg_batches: int = 16,
    batch_size: int = 256,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """All three probes of a LeWM ``model`` trained on ``dataset`` (a TwoRoomDataset or its folder).

    ``device``: where to run (the model is moved there in place; default: where it is).
    The model's train/eval flags are restored afterwards. ``seed`` seeds the probe's
    episode split, the alpha validation split and the SIGReg directions;
    ``rollout_seed`` (default ``FRESH_SEED_OFFSET + seed``) the fresh episodes, and must
    differ from the seed the dataset was generated with. Other arguments: see
    :func:`linear_probe`, :func:`fresh_windows`, :func:`one_step_mse` and
    :func:`sigreg_heldout`.

    Returns a JSON-serialisable dict: ``probe_r2`` {x, y}, ``one_step_mse``,
    ``sigreg_heldout`` (the headline numbers), the details ``linear_probe``, ``one_step``,
    ``sigreg``, ``fresh_rollouts`` {seed, episodes, policy, max_steps, rows, windows},
    ``seed``, ``device`` and ``seconds`` {linear_probe, fresh_rollouts, one_step, sigreg, total}.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a LeWM JEPA), got {type(model).__name__}")
    data = as_dataset(dataset)
    seed = _checks.integer(seed, "seed", 0, numpy=True)
    if rollout_seed is None:
        rollout_seed = FRESH_SEED_OFFSET + seed
    rollout_seed = _checks.integer(rollout_seed, "rollout_seed", 0, numpy=True)
    if data.source.get("kind") == "generated" and data.source.get("seed") == rollout_seed:
        raise ValueError(
            f"rollout_seed {rollout_seed} is the seed {data.path} was generated with; the fresh rollouts "
            "would repeat training episodes -- choose another rollout_seed"
        )
    width = action_width_of(model)
    if width is not None and width != 2 * frameskip:
        raise ValueError(
            f"the model's action encoder takes {width} numbers per step, but frameskip {frameskip} "
            f"x 2 = {2 * frameskip}"
        )
    if device is not None:
        model.to(torch.device(device))
    device = _model_device(model)

    total_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    probe = linear_probe(
        model,
        data,
        seed=seed,
        test_fraction=test_fraction,
        max_frames=max_frames,
        alpha=alpha,
        batch_size=batch_size,
        autocast=autocast,
    )
    sync()
    seconds["linear_probe"] = time.perf_counter() - start

    start = time.perf_counter()
    mean, std = action_stats(np.array(data.action))
    windows = fresh_windows(
        mean,
        std,
        episodes=fresh_episodes,
        seed=rollout_seed,
        policy=policy,
        max_steps=max_steps,
        frameskip=frameskip,
        num_frames=history_size + 1,
        layout=data.layout,
        device=device,
    )
    emb = encode_windows(model, windows, layout=data.layout, batch_size=batch_size, autocast=autocast)
    sync()
    seconds["fresh_rollouts"] = time.perf_counter() - start

    start = time.perf_counter()
    one_step = one_step_mse(model, emb, windows.action, history_size=history_size, autocast=autocast)
    sync()
    seconds["one_step"] = time.perf_counter() - start

    start = time.perf_counter()
    stat = sigreg_heldout(
        emb, windows.episode, batch_size=sigreg_batch_size, batches=sigreg_batches, seed=seed
    )
    sync()
    seconds["sigreg"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - total_start

    return {
        "probe_r2": dict(probe["r2"]),
        "one_step_mse": one_step["mse"],
        "sigreg_heldout": stat["value"],
        "linear_probe": probe,
        "one_step": one_step,
        "sigreg": stat,
        "fresh_rollouts": {
            "seed": rollout_seed,
            "episodes": windows.episodes,
            "policy": windows.policy,
            "max_steps": max_steps,
            "rows": int(windows.positions.shape[0]),
            "windows": len(windows),
        },
        "seed": seed,
        "device": str(device),
        "seconds": seconds,
    }
