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
from .data.windows import ModelFrames, action_stats, as_dataset, window_rows, window_starts
from .envs.policies import make_policy
from .envs.two_room import DEFAULT_LAYOUT, TwoRoomLayout
from .reference.jepa import action_width_of, device_of, eval_mode, window_of
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
    model_frames = ModelFrames(layout, size, device)
    out = []
    with eval_mode(model):
        for i in range(0, positions.shape[0], batch_size):
            pixels = model_frames(positions[i : i + batch_size])[:, None]  # (n, 1, 3, S, S)
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


def _sample_rows(
    row_episode: np.ndarray,
    splits: tuple[np.ndarray, np.ndarray],
    caps: tuple[int, int],
    rng: np.random.Generator,
    where: object,
) -> tuple[np.ndarray, np.ndarray]:
    """The dataset rows of each episode split, at most ``cap`` of them drawn uniformly (sorted).

    ``row_episode`` (R,) is the episode of every row; raises ValueError (naming ``where``)
    for a split with fewer than 2 rows.
    """
    sampled = []
    for episodes, cap in zip(splits, caps):
        rows = np.flatnonzero(np.isin(row_episode, episodes))
        if rows.size > cap:
            rows = np.sort(rng.choice(rows, size=cap, replace=False))
        if rows.size < 2:
            raise ValueError(f"{where}: a probe split has {rows.size} frame(s); need at least 2")
        sampled.append(rows)
    return sampled[0], sampled[1]


def _fit_and_score(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    groups: np.ndarray,
    alpha: float | None,
    alphas: Sequence[float],
    seed: int,
) -> dict[str, Any]:
    """Fit the ridge probe on ``train`` (x (N, D), y (N, 2)) and score it on ``test``.

    alpha is ``alpha`` when given, else :func:`select_alpha` on the train rows grouped by
    ``groups`` (N,). Returns ``r2`` and ``rmse_px`` {x, y}, ``alpha`` and ``val_mse_by_alpha``.
    """
    (x_train, y_train), (x_test, y_test) = train, test
    scores: dict[str, float] = {}
    if alpha is None:
        alpha, scores = select_alpha(x_train, y_train, groups, alphas, seed=seed)
    pred = ridge_fit(x_train, y_train, alpha).predict(x_test)
    r2 = r2_score(y_test, pred)
    rmse = (pred - y_test).square().mean(0).sqrt()
    return {
        "r2": {c: float(v) for c, v in zip(COORDS, r2.tolist())},
        "rmse_px": {c: float(v) for c, v in zip(COORDS, rmse.tolist())},
        "alpha": float(alpha),
        "val_mse_by_alpha": scores,
    }


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
    given), frame and episode counts, ``seed`` and ``test_fraction``. Raises ValueError
    for a split with fewer than 2 frames.
    """
    data = as_dataset(dataset)
    seed = _checks.integer(seed, "seed", 0, numpy=True)
    max_frames = _checks.integer(max_frames, "max_frames", 4, numpy=True)
    train_eps, test_eps = split_episodes(data.num_episodes, test_fraction, seed)
    row_episode = np.repeat(np.arange(data.num_episodes), np.asarray(data.ep_len))
    cap_train = max(2, round(max_frames * (1.0 - test_fraction)))
    caps = (cap_train, max(2, max_frames - cap_train))
    rng = np.random.default_rng([seed, 1])
    train_rows, test_rows = _sample_rows(row_episode, (train_eps, test_eps), caps, rng, data.path)
    xy = torch.from_numpy(np.asarray(data.proprio)[np.concatenate([train_rows, test_rows])])  # a copy
    x = encode_positions(model, xy, layout=data.layout, batch_size=batch_size, autocast=autocast).cpu()
    y, n = xy.double(), train_rows.size
    fit = _fit_and_score((x[:n], y[:n]), (x[n:], y[n:]), row_episode[train_rows], alpha, alphas, seed)
    return {
        **fit,
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


def _episode_rows(
    positions: torch.Tensor, actions: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rolled-out episodes as dataset rows, episode after episode.

    positions (C, S + 1, 2), actions (C, S, 2) and lengths (C,) as
    :func:`lewm_fast.data.generate.rollout` returns them -> agent positions (R, 2), raw
    actions (R, 2) with NaN on each episode's last row (which takes no action), and the
    rows per episode (C,) = lengths + 1.
    """
    c, device = positions.shape[0], positions.device
    ep_len = lengths + 1
    keep = torch.arange(positions.shape[1], device=device)[None, :] < ep_len[:, None]  # (C, S + 1)
    raw = torch.cat([actions, torch.full((c, 1, 2), float("nan"), device=device)], dim=1)
    raw[torch.arange(c, device=device), lengths] = float("nan")
    return positions[keep], raw[keep], ep_len


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
    training dataset's statistics. Raises ValueError for statistics that are not (2,) with
    std > 0, or when no episode is long enough for one window.
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
    row_xy, row_action, ep_len = _episode_rows(*rollout(starts, goals, noise, actor, layout))
    row_action = (row_action - mean) / std  # z-scored, NaN kept

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
    history_size: int | None = None,
    batch_size: int = 1024,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """1-step predictor MSE: emb (W, T, D) frame embeddings, action (W, T, A) z-scored.

    The training ``pred_loss`` (:func:`lewm_fast.train.step.loss_head`, eval mode): pred =
    model.predict(emb[:, :H], action_encoder(action)[:, :H]) with H = ``history_size``
    (default: the predictor's ``num_frames``; NaN actions -> 0, as in training), target =
    emb[:, 1:H+1]; ``mse`` = mean over windows, positions and dims of (pred - target)^2.
    ``mse_by_position``[i] is the mean at position i, predicting frame i + 1 from frames
    0..i. Also returns ``windows``.
    """
    history_size = _checks.integer(window_of(model, history_size), "history_size", 1, numpy=True)
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
    with eval_mode(model):
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


def _one_window_per_episode(episode: np.ndarray, batch_size: int, batches: int, seed: int) -> list[list[int]]:
    """``batches`` seeded batches of window indices whose windows come from distinct episodes.

    ``episode`` (W,) names each window's episode. A batch draws B = min(batch_size, number
    of episodes) episodes without replacement, then one window of each. Raises ValueError
    for fewer than 2 episodes.
    """
    labels, inverse = np.unique(episode, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(labels.size)]
    b = min(batch_size, labels.size)
    if b < 2:
        raise ValueError(f"SIGReg needs windows from at least 2 episodes, got {labels.size}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        chosen = rng.choice(labels.size, size=b, replace=False)
        out.append([int(rng.choice(members[k])) for k in chosen])
    return out


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
    ``batch_size`` (the B used), ``num_proj`` and ``knots``. Raises ValueError for
    windows from fewer than 2 episodes.
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
    batch_ids = _one_window_per_episode(episode, batch_size, batches, seed)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for ids in batch_ids:
        z = emb[torch.as_tensor(ids, device=emb.device)].float().transpose(0, 1).contiguous()  # (T, B, D)
        directions = torch.randn(z.shape[-1], num_proj, generator=gen)
        directions = directions.div_(directions.norm(dim=0)).to(emb.device)
        values.append(float(_sigreg(z, directions, knots)))
    return {
        "value": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "batches": batches,
        "batch_size": len(batch_ids[0]),
        "num_proj": num_proj,
        "knots": int(knots),
    }


# ------------------------------------------------------------------------ everything
def _checked_inputs(
    model: nn.Module,
    dataset: TwoRoomDataset | str | os.PathLike,
    seed: int,
    rollout_seed: int | None,
) -> tuple[TwoRoomDataset, int, int]:
    """(dataset, seed, rollout seed) for :func:`run_probes`, or ValueError naming what is wrong."""
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
    return data, seed, rollout_seed


def _model_windows(
    model: nn.Module, data, frameskip: int | None, history_size: int | None
) -> tuple[int, int]:
    """(frameskip, history_size) of the probes' windows, read from the model where not given."""
    dims = int(np.asarray(data.action).shape[1])
    width = action_width_of(model)
    if frameskip is None:
        if width is None or width % dims:
            raise ValueError(
                f"cannot read frameskip from the model (action width {width}, dataset action dimension "
                f"{dims}); pass frameskip="
            )
        frameskip = width // dims
    frameskip = _checks.integer(frameskip, "frameskip", 1, numpy=True)
    if width is not None and width != dims * frameskip:
        raise ValueError(
            f"the model's action encoder takes {width} numbers per step, but frameskip {frameskip} "
            f"x {dims} = {dims * frameskip}"
        )
    return frameskip, window_of(model, history_size)


class _StepClock:
    """Wall-clock seconds per named step (``with clock("name"): ...``) and since it was made.

    A step's time includes the device work it queued (CUDA is synchronised at its end).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = time.perf_counter() - start

    def total(self) -> dict[str, float]:
        """The step times and ``total``, the seconds since the clock was made."""
        return {**self.seconds, "total": time.perf_counter() - self._start}


def _embedded_fresh_windows(
    model: nn.Module,
    data: TwoRoomDataset,
    rollout: dict[str, Any],
    frameskip: int,
    num_frames: int,
    **embedding: Any,
) -> tuple[FreshWindows, torch.Tensor]:
    """Fresh windows cut like ``data``'s and their embeddings (W, T, D) on the model's device.

    :func:`fresh_windows` with ``rollout`` (seed, episodes, policy, max_steps), actions
    z-scored with ``data``'s statistics, on its layout; then :func:`encode_windows` with
    ``embedding`` (batch_size, autocast).
    """
    windows = fresh_windows(
        *action_stats(np.array(data.action)),
        frameskip=frameskip,
        num_frames=num_frames,
        layout=data.layout,
        device=_model_device(model),
        **rollout,
    )
    return windows, encode_windows(model, windows, layout=data.layout, **embedding)


def _probes_result(
    probe: dict[str, Any],
    one_step: dict[str, Any],
    stat: dict[str, Any],
    windows: FreshWindows,
    max_steps: int,
    seed: int,
    clock: _StepClock,
) -> dict[str, Any]:
    """The dict :func:`run_probes` returns: headline numbers first, then the details."""
    return {
        "probe_r2": dict(probe["r2"]),
        "one_step_mse": one_step["mse"],
        "sigreg_heldout": stat["value"],
        "linear_probe": probe,
        "one_step": one_step,
        "sigreg": stat,
        "fresh_rollouts": {
            "seed": windows.seed,
            "episodes": windows.episodes,
            "policy": windows.policy,
            "max_steps": max_steps,
            "rows": int(windows.positions.shape[0]),
            "windows": len(windows),
        },
        "seed": seed,
        "device": str(clock.device),
        "seconds": clock.total(),
    }


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
    frameskip: int | None = None,
    history_size: int | None = None,
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
    :func:`sigreg_heldout`. ``frameskip`` defaults to the model's action width over the
    dataset's action dimension (5 for the published model), ``history_size`` to the
    predictor's ``num_frames`` (3). Raises ValueError for a model that is not an nn.Module,
    a ``rollout_seed`` equal to the dataset's, or an action encoder whose width is not the
    dataset's action dimension x ``frameskip``.

    Returns a JSON-serialisable dict: ``probe_r2`` {x, y}, ``one_step_mse``,
    ``sigreg_heldout`` (the headline numbers), the details ``linear_probe``, ``one_step``,
    ``sigreg``, ``fresh_rollouts`` {seed, episodes, policy, max_steps, rows, windows},
    ``seed``, ``device`` and ``seconds`` {linear_probe, fresh_rollouts, one_step, sigreg, total}.
    """
    data, seed, rollout_seed = _checked_inputs(model, dataset, seed, rollout_seed)
    frameskip, history_size = _model_windows(model, data, frameskip, history_size)
    if device is not None:
        model.to(torch.device(device))
    clock = _StepClock(_model_device(model))
    enc = {"batch_size": batch_size, "autocast": autocast}
    rollout = {"seed": rollout_seed, "episodes": fresh_episodes, "policy": policy, "max_steps": max_steps}
    with clock("linear_probe"):
        probe = linear_probe(
            model, data, seed=seed, test_fraction=test_fraction, max_frames=max_frames, alpha=alpha, **enc
        )
    with clock("fresh_rollouts"):
        windows, emb = _embedded_fresh_windows(model, data, rollout, frameskip, history_size + 1, **enc)
    with clock("one_step"):
        one_step = one_step_mse(model, emb, windows.action, history_size=history_size, autocast=autocast)
    with clock("sigreg"):
        sig = sigreg_heldout(
            emb, windows.episode, batch_size=sigreg_batch_size, batches=sigreg_batches, seed=seed
        )
    return _probes_result(probe, one_step, sig, windows, max_steps, seed, clock)
