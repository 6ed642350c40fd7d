"""The planning cost of a LeWM JEPA for all envs and candidates at once (spec section 6).

Same numbers as ``JEPA.get_cost`` (the published path), computed with only the work the
cost needs:

- start and goal frames are encoded once per plan (one encoder call for both), and only
  the last goal frame (the only one the cost reads);
- the action encoder, the conditioning projection and every block's AdaLN modulation run
  once per candidate set over all ``horizon`` actions (they act per time step, so one pass
  equals the published per-step recomputation);
- while the predictor's context window still grows from position 0, earlier positions'
  inputs, position embeddings and hidden states do not change, and causal attention
  keeps them independent of later tokens, so their per-layer keys/values stay in the
  predictor's key/value caches (``block.attn.kv_cache``, static storage reserved once per
  shape by ``setup_caches``) and only the new position is computed;
- only the last position feeds the cost: the final block computes its attention output
  and MLP for that position only, and ``transformer.norm``/``output_proj``/``pred_proj``
  run on it alone.

The rollout calls the model's own blocks (``block.step``: the block on new tokens against
its cache), so the fused kernels of ``lewm_fast.ConditionalBlock`` run here too; nothing
here re-implements attention. Needs eval mode (dropout off, BatchNorm on running
statistics); nothing here synchronises with the host, and the caches keep their storage,
so it can be CUDA-graph captured.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..reference.jepa import JEPA as _ReferenceJEPA
from ..reference.jepa import frame_spec_of
from ..reference.modules import setup_caches

__all__ = [
    "PlanningCost",
    "LowPrecisionWeights",
    "supports_fast_cost",
    "fast_cost_unsupported_reason",
    "planning_cost",
]


def fast_cost_unsupported_reason(model) -> str | None:
    """Why the fast cost cannot run ``model`` (None when it can)."""
    if not isinstance(model, _ReferenceJEPA):
        return f"{type(model).__name__} is not a LeWM JEPA (lewm_fast.JEPA or lewm_fast.reference.JEPA)"
    try:
        transformer = model.predictor.transformer
        block = transformer.layers[0]
        checks = {
            "predictor.pos_embedding": torch.is_tensor(model.predictor.pos_embedding),
            "attn.to_qkv (Linear)": isinstance(block.attn.to_qkv, nn.Linear),
            "attn.heads / attn.dim_head": isinstance(block.attn.heads, int)
            and isinstance(block.attn.dim_head, int),
            "adaLN_modulation, step, attn.attend_cached": all(
                callable(getattr(m, name, None))
                for m, name in (
                    (block, "adaLN_modulation"),
                    (block, "step"),
                    (block.attn, "attend_cached"),
                )
            ),
            "transformer input_proj, cond_proj, output_proj, norm": all(
                callable(m)
                for m in (
                    transformer.input_proj,
                    transformer.cond_proj,
                    transformer.output_proj,
                    transformer.norm,
                )
            ),
        }
    except (AttributeError, IndexError, TypeError) as exc:
        return f"the predictor lacks the published ConditionalBlock structure ({exc})"
    missing = [name for name, ok in checks.items() if not ok]
    return f"the predictor lacks {missing}" if missing else None


def supports_fast_cost(model) -> bool:
    """True if ``model`` has the LeWM JEPA structure the fast cost reads (lewm_fast or reference)."""
    return fast_cost_unsupported_reason(model) is None


def _modulations(blocks: list, cond: torch.Tensor) -> list[torch.Tensor]:
    """Every block's ``adaLN_modulation(cond)``; the published ``SiLU -> Linear`` shares one
    SiLU of ``cond`` across blocks (the same values, one kernel instead of one per block)."""
    shared = all(
        isinstance(b.adaLN_modulation, nn.Sequential)
        and len(b.adaLN_modulation) == 2
        and isinstance(b.adaLN_modulation[0], nn.SiLU)
        for b in blocks
    )
    if not shared:
        return [block.adaLN_modulation(cond) for block in blocks]
    act = F.silu(cond)
    return [block.adaLN_modulation[1](act) for block in blocks]


class PlanningCost:
    """Fast planning cost of a LeWM JEPA (eval mode). See the module docstring.

    ``encode(pixels (B, H, C, h, w), goal (B, G, C, h, w))`` -> (emb (B, H, D), goal_emb (B, D));
    ``rollout_cost(emb, goal_emb, candidates (B, S, T, A))`` -> costs (B, S), with T >= H.
    """

    def __init__(self, model: nn.Module, history_size: int | None = None):
        reason = fast_cost_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"PlanningCost needs a LeWM JEPA with the published structure: {reason}")
        frames = model.predictor.pos_embedding.shape[1]
        if history_size is None:
            history_size = frames  # the predictor's num_frames, as the reference rollout (spec section 6)
        if isinstance(history_size, bool) or not isinstance(history_size, int):
            raise ValueError(f"history_size must be an int or None, got {history_size!r}")
        if not 1 <= history_size <= frames:
            raise ValueError(f"history_size must be in [1, num_frames = {frames}], got {history_size}")
        self.model = model
        self.history_size = history_size

    def bytes_per_row(self, horizon: int, dtype: torch.dtype = torch.float32) -> int:
        """Estimated peak bytes of :meth:`rollout_cost` per candidate row (env x sample).

        Counts what is alive at once: every block's AdaLN modulation for all ``horizon``
        steps, every block's key/value cache (``num_frames`` positions), and
        the largest per-block temporaries (q/k/v, attention output, the MLP hidden layer
        before and after GELU) and ``pred_proj``'s hidden layer, in ``dtype`` (the autocast
        dtype, or float32), plus float32 embeddings. An estimate for sizing batches, not a
        measurement.
        """
        e = dtype.itemsize
        blocks = list(self.model.predictor.transformer.layers)
        block = blocks[0]

        def widest(module: nn.Module) -> int:
            return max((m.out_features for m in module.modules() if isinstance(m, nn.Linear)), default=0)

        dim = block.attn.to_qkv.in_features
        inner = block.attn.heads * block.attn.dim_head
        window = self.history_size
        mods = len(blocks) * horizon * widest(block.adaLN_modulation)
        kv = len(blocks) * 2 * self.model.predictor.pos_embedding.shape[1] * inner
        temporaries = window * (3 * inner + 2 * inner + 2 * widest(block.mlp) + 4 * dim)
        head = 2 * widest(self.model.pred_proj) if isinstance(self.model.pred_proj, nn.Module) else 0
        float32 = 4 * (2 * horizon * dim + 2 * window * dim)
        return int(e * (mods + kv + temporaries + head + 2 * horizon * dim) + float32)

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames (N, C, h, w) -> embeddings (N, D): encoder CLS token, then projector."""
        out = self.model.encoder(pixels.float(), interpolate_pos_encoding=True)
        return self.model.projector(out.last_hidden_state[:, 0])

    def encode(self, pixels: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context frames (B, H, C, h, w) and goal frames (B, G, C, h, w) -> (B, H, D), (B, D).

        Only the last goal frame is encoded (the cost compares with it alone).
        """
        b, h = pixels.shape[:2]
        context, last_goal = pixels.flatten(0, 1), goal[:, -1]
        if context.shape[1:] == last_goal.shape[1:]:
            emb = self.encode_frames(torch.cat([context, last_goal]))
            return emb[: b * h].view(b, h, -1), emb[b * h :]
        return self.encode_frames(context).view(b, h, -1), self.encode_frames(last_goal)

    def rollout_cost(
        self, emb: torch.Tensor, goal_emb: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """Costs (B, S) of candidates (B, S, T, A) from context embeddings emb (B, H, D).

        Cost = sum over D of (last predicted embedding - goal_emb)^2, in float32.
        """
        model = self.model
        predictor = model.predictor
        transformer = predictor.transformer
        blocks = list(transformer.layers)
        b, s, horizon, width = candidates.shape
        n, context = b * s, emb.shape[1]

        # Per-time-step work, once for every candidate and action: (N, T, D) each.
        act_emb = model.action_encoder(candidates.reshape(n, horizon, width))
        cond = transformer.cond_proj(act_emb)
        mods = _modulations(blocks, cond)  # (N, T, 6D) each

        embs = list(emb.unsqueeze(1).expand(b, s, *emb.shape[1:]).reshape(n, context, -1).unbind(1))
        setup_caches(predictor, n, mods[0].dtype, emb.device)  # keys/values in to_qkv's dtype
        cached = 0  # positions 0 .. cached-1 of the current window are in the blocks' caches
        for step in range(horizon - context + 1):
            end = context + step
            start = max(0, end - self.history_size)
            # a window still growing from 0 adds one token after cached, unchanged ones; a
            # shifted window moves every position embedding, so it is computed afresh
            first = end - 1 if start == 0 and cached == end - 1 else start
            x = torch.stack(embs[first:end], dim=1) + predictor.pos_embedding[:, first - start : end - start]
            x = transformer.input_proj(predictor.dropout(x))
            for i, block in enumerate(blocks):
                x = block.step(x, mods[i][:, first:end], first - start, last_only=i == len(blocks) - 1)
            cached = end - start
            out = transformer.output_proj(transformer.norm(x[:, -1]))  # (N, D)
            embs.append(model.pred_proj(out))
        last = embs[-1].view(b, s, -1).float()
        return (last - goal_emb.float().unsqueeze(1)).square().sum(dim=-1)

    def __call__(self, pixels: torch.Tensor, goal: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Costs (B, S) of candidates (B, S, T, A) from frames (B, H, C, h, w) to goal (B, G, C, h, w)."""
        emb, goal_emb = self.encode(pixels, goal)
        return self.rollout_cost(emb, goal_emb, candidates)


class LowPrecisionWeights:
    """A copy of a model whose Linear/Conv weights and biases are already in ``dtype``.

    Under ``torch.autocast(dtype=...)`` every ``F.linear`` / ``conv`` casts its float32
    weight and bias to ``dtype`` at each call: in a CEM plan that is more cast kernels than
    compute kernels. Autocast computes with exactly these rounded values, so running the
    copy under the same autocast gives the same results without the casts. Everything else
    (LayerNorm/BatchNorm parameters and statistics, embeddings) stays as in the model.

    ``sync()`` refreshes the copy in place when the model's tensors changed in place
    (optimizer steps, ``load_state_dict``: their version counters move), keeping the copy's
    storage, so a CUDA graph captured on the copy stays valid; it rebuilds the copy when the
    model's tensors were replaced (``.to(device)``, a new shape). Returns the copy.
    """

    CAST = (nn.Linear, nn.Conv1d, nn.Conv2d)

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"LowPrecisionWeights needs torch.bfloat16 or torch.float16, got {dtype!r}")
        self.model = model
        self.dtype = dtype
        self.copy: nn.Module | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._layout: tuple = ()
        self._versions: tuple = ()

    def _tensors(self, module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    def _build(self) -> None:
        clone = copy.deepcopy(self.model)
        for module in clone.modules():
            if isinstance(module, self.CAST):
                for name in ("weight", "bias"):
                    param = getattr(module, name, None)
                    if param is not None:
                        param.data = param.data.to(self.dtype)
        clone.requires_grad_(False)
        self.copy = clone
        self._pairs = list(zip(self._tensors(self.model), self._tensors(clone)))

    @torch.no_grad()
    def sync(self) -> nn.Module:
        tensors = self._tensors(self.model)
        layout = tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.device) for t in tensors)
        versions = tuple(t._version for t in tensors)
        if self.copy is None or layout != self._layout:
            self._build()
        elif versions != self._versions:
            for live, low in self._pairs:
                low.copy_(live)
        self.copy.train(self.model.training)
        self._layout, self._versions = layout, versions
        return self.copy


@torch.no_grad()
def planning_cost(
    model: nn.Module, info_dict: dict, candidates: torch.Tensor, history_size: int | None = None
) -> torch.Tensor:
    """The planning cost (B, S) with the fast path: the numbers of ``model.get_cost``.

    info_dict: ``pixels`` (B, H, C, h, w) context frames and ``goal`` (B, G, C, h, w) goal
    frames, one entry per env (``get_cost`` takes them repeated per sample, (B, S, ...));
    candidates (B, S, T, A) with T >= H. The predictor sees the last ``history_size``
    embeddings (default: its ``num_frames``). The model must be in eval mode. ValueError for
    frames of another layout or channel count, or holding NaN/inf or unnormalised values
    (spec section 5), and for candidates that do not fit.
    """
    if not isinstance(info_dict, dict) or "pixels" not in info_dict or "goal" not in info_dict:
        raise ValueError("info_dict must be a dict with 'pixels' (B, H, C, h, w) and 'goal' (B, G, C, h, w)")
    channels, patch = frame_spec_of(model)
    pixels = _checks.pixels(info_dict["pixels"], "info_dict['pixels']", _checks.FRAMES, channels, patch)
    goal = _checks.pixels(info_dict["goal"], "info_dict['goal']", _checks.FRAMES, channels, patch)
    if not torch.is_tensor(candidates) or candidates.dim() != 4:
        got = tuple(candidates.shape) if torch.is_tensor(candidates) else type(candidates).__name__
        raise ValueError(f"candidates must be a (B, S, T, A) tensor, got {got}")
    if not pixels.shape[0] == goal.shape[0] == candidates.shape[0]:
        raise ValueError(
            f"pixels {tuple(pixels.shape)}, goal {tuple(goal.shape)} and candidates "
            f"{tuple(candidates.shape)} must share the env axis B"
        )
    if candidates.shape[2] < pixels.shape[1]:
        raise ValueError(
            f"candidates have {candidates.shape[2]} steps, fewer than the {pixels.shape[1]} context frames"
        )
    if model.training:
        raise ValueError("planning_cost needs the model in eval mode (call model.eval())")
    cost = PlanningCost(model, history_size)
    width = model.action_width
    if candidates.shape[3] != width:
        raise ValueError(
            f"candidates must have {width} numbers per model action (frameskip x action_dim), "
            f"got {candidates.shape[3]}"
        )
    return cost(pixels, goal, candidates)
