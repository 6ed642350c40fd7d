"""The LeWM world model (JEPA) in plain PyTorch, with the published dict-based API.

Spec sections 2 and 6. ``encode`` / ``rollout`` / ``get_cost`` read and write an
``info`` dict the way the published planner expects:

- ``encode(info)``: ``info["pixels"]`` (B, T, C, H, W) -> ``info["emb"]`` (B, T, D);
  ``info["action"]`` (B, T, A), when present -> ``info["act_emb"]`` (B, T, D).
- ``rollout(info, actions (B, S, T, A))``: H = ``info["pixels"].size(2)`` context frames
  (``info`` values carry a sample axis: (B, S, H, ...)), then T - H + 1 autoregressive
  predictor calls, each on the last ``history_size`` embeddings -> ``info["predicted_emb"]``
  (B, S, H + T - H + 1, D).
- ``get_cost(info, candidates (B, S, T, A))`` -> (B, S): squared distance between the
  last predicted embedding and the embedding of ``info["goal"]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from .sigreg import SIGReg


def action_width_of(model) -> int | None:
    """Numbers per model action (frameskip x action_dim) ``model`` takes: the input channels of
    ``model.action_encoder.patch_embed``; None when that is not a Conv1d (not a LeWM model)."""
    patch_embed = getattr(getattr(model, "action_encoder", None), "patch_embed", None)
    return int(patch_embed.in_channels) if isinstance(patch_embed, nn.Conv1d) else None


@contextlib.contextmanager
def eval_mode(model) -> Iterator:
    """Run a block with ``model`` in eval mode and leave it exactly as it was found.

    Every submodule is put in eval mode (dropout off, BatchNorm on its running statistics);
    afterwards each submodule's ``training`` flag and each parameter's ``requires_grad``
    are restored to what they were before, whatever the block changed. Parameters and
    buffers are not touched (an eval-mode forward does not update BatchNorm statistics).
    Anything that is not an ``nn.Module`` passes through unchanged.
    """
    if not isinstance(model, nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def frame_spec_of(model) -> tuple[int, int]:
    """(channels, patch size) of the frames ``model``'s encoder takes, from its ViT config
    (``num_channels``, ``patch_size``); (3, 1) when the encoder has no such config."""
    config = getattr(getattr(model, "encoder", None), "config", None)
    channels = int(getattr(config, "num_channels", 3))
    patch = getattr(config, "patch_size", 1)
    return channels, int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def num_frames_of(model) -> int | None:
    """The predictor's context window ``num_frames`` (the length of its positional
    embedding); None when ``model`` has no such predictor."""
    pos = getattr(getattr(model, "predictor", None), "pos_embedding", None)
    return int(pos.shape[1]) if torch.is_tensor(pos) and pos.dim() == 3 else None


def window_of(model, history_size: int | None = None) -> int:
    """The planning window: ``history_size`` when given, else the predictor's ``num_frames``
    (spec section 6; stable-worldmodel takes it from ``predictor.num_frames``), else 3 (the
    published Two-Room value) for a model without a positional embedding to read."""
    if history_size is not None:
        return history_size
    frames = num_frames_of(model)
    return 3 if frames is None else frames


def device_of(model) -> torch.device | None:
    """Device of ``model``'s first parameter or buffer; None for a module without either or a
    non-module."""
    if isinstance(model, nn.Module):
        tensor = next(chain(model.parameters(), model.buffers()), None)
        if tensor is not None:
            return tensor.device
    return None


class JEPA(nn.Module):
    """LeWM: ``encoder`` (ViT, CLS token) -> ``projector`` gives frame embeddings; the
    ``predictor`` (AdaLN-Zero transformer conditioned on ``action_encoder(action)``) ->
    ``pred_proj`` predicts the next embedding. ``projector`` / ``pred_proj`` default to the
    identity. The dict-based ``encode`` / ``rollout`` / ``get_cost`` are the published
    planner's interface (module docstring); ``predict`` works on tensors.
    """

    def __init__(
        self,
        encoder: nn.Module,
        predictor: nn.Module,
        action_encoder: nn.Module,
        projector: nn.Module | None = None,
        pred_proj: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.action_encoder = action_encoder
        self.projector = projector or nn.Identity()
        self.pred_proj = pred_proj or nn.Identity()

    @property
    def action_width(self) -> int | None:
        """Numbers per model action, frameskip x action_dim (see :func:`action_width_of`)."""
        return action_width_of(self)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter."""
        return device_of(self)

    def encode(self, info: dict) -> dict:
        """Embed ``info["pixels"]`` (B, T, C, H, W) and, if present, ``info["action"]`` (B, T, A)."""
        pixels = info["pixels"].float()
        b, t = pixels.shape[:2]
        output = self.encoder(pixels.flatten(0, 1), interpolate_pos_encoding=True)
        cls = output.last_hidden_state[:, 0]  # (B*T, hidden) CLS token
        info["emb"] = self.projector(cls).view(b, t, -1)
        if "action" in info:
            info["act_emb"] = self.action_encoder(info["action"])
        return info

    def predict(self, emb: torch.Tensor, act_emb: torch.Tensor) -> torch.Tensor:
        """Next embeddings (B, T, D) from embeddings (B, T, D) and action embeddings (B, T, D)."""
        b, t = emb.shape[:2]
        preds = self.predictor(emb, act_emb)
        return self.pred_proj(preds.flatten(0, 1)).view(b, t, -1)

    def rollout(self, info: dict, action_sequence: torch.Tensor, history_size: int | None = None) -> dict:
        """Autoregressive rollout of every candidate; writes ``info["predicted_emb"]``.

        Each predictor call sees the last ``history_size`` embeddings (default: the
        predictor's ``num_frames``, spec section 6)."""
        history_size = window_of(self, history_size)
        h = info["pixels"].size(2)
        b, s, t = action_sequence.shape[:3]
        act_0, act_future = torch.split(action_sequence, [h, t - h], dim=2)
        info["action"] = act_0

        # encode the context once per env (sample 0), then share it across samples
        init = {k: v[:, 0] for k, v in info.items() if torch.is_tensor(v)}
        init = self.encode(init)
        emb = init["emb"].unsqueeze(1).expand(b, s, -1, -1)
        info["emb"] = emb

        emb = emb.flatten(0, 1).clone()  # (B*S, H, D)
        act = act_0.flatten(0, 1)  # (B*S, H, A)
        act_future = act_future.flatten(0, 1)  # (B*S, T - H, A)
        for step in range(t - h + 1):
            act_emb = self.action_encoder(act)
            pred = self.predict(emb[:, -history_size:], act_emb[:, -history_size:])[:, -1:]
            emb = torch.cat([emb, pred], dim=1)
            if step < t - h:
                act = torch.cat([act, act_future[:, step : step + 1]], dim=1)

        info["predicted_emb"] = emb.view(b, s, *emb.shape[1:])
        return info

    def criterion(self, info: dict) -> torch.Tensor:
        """Cost (B, S): sum over dims of (last predicted embedding - goal embedding)^2."""
        pred_emb = info["predicted_emb"]  # (B, S, T', D)
        goal_emb = info["goal_emb"][:, None, -1:, :]  # (B, 1, 1, D)
        return F.mse_loss(
            pred_emb[..., -1:, :], goal_emb.detach().expand_as(pred_emb[..., -1:, :]), reduction="none"
        ).sum(dim=(-2, -1))

    def get_cost(self, info: dict, action_candidates: torch.Tensor) -> torch.Tensor:
        """Cost (B, S) of candidates (B, S, T, A) for reaching ``info["goal"]`` from ``info["pixels"]``."""
        device = self.device
        for k in list(info):
            if torch.is_tensor(info[k]):
                info[k] = info[k].to(device)

        goal = {k: v[:, 0] for k, v in info.items() if torch.is_tensor(v)}
        goal["pixels"] = goal["goal"]
        for k in list(goal):
            if k.startswith("goal_"):
                goal[k[len("goal_") :]] = goal.pop(k)
        goal.pop("action", None)
        info["goal_emb"] = self.encode(goal)["emb"]
        return self.criterion(self.rollout(info, action_candidates))


def jepa_loss(
    model: JEPA, sigreg: SIGReg, batch: dict, lambd: float = 0.09, history_size: int | None = None
) -> dict:
    """Training loss on a window batch (spec section 2).

    batch: ``pixels`` (B, T, C, H, W) with T = history_size + 1 (default history_size:
    T - 1, the whole window), ``action`` (B, T, A); NaN actions (window edges) are replaced
    by 0. Returns ``loss``, ``pred_loss`` and ``sigreg_loss`` (graph attached).
    """
    if history_size is None:
        history_size = batch["pixels"].shape[1] - 1
    info = {"pixels": batch["pixels"], "action": torch.nan_to_num(batch["action"], 0.0)}
    info = model.encode(info)
    emb, act_emb = info["emb"], info["act_emb"]
    pred = model.predict(emb[:, :history_size], act_emb[:, :history_size])
    pred_loss = (pred - emb[:, 1 : history_size + 1]).pow(2).mean()
    sigreg_loss = sigreg(emb.transpose(0, 1))
    return {"loss": pred_loss + lambd * sigreg_loss, "pred_loss": pred_loss, "sigreg_loss": sigreg_loss}
