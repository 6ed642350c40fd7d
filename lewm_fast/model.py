"""The public, drop-in LeWM model classes.

Same names, constructor arguments and parameter names as the published code, so
switching is an import change. ``JEPA`` adds input checks (bad input raises
``ValueError`` saying what was expected) on top of the reference semantics;
``ConditionalBlock`` (and so ``ARPredictor``) runs the fused AdaLN-Zero kernels on CUDA;
the ViT encoder (:mod:`lewm_fast.encoder`) computes query, key and value with one GEMM.
``Embedder`` and ``MLP`` are the reference classes.
"""

from __future__ import annotations

import torch

from . import _checks
from . import backend as _backend
from .adaln import adaln_modulate, autocast_dtype, gated_adaln_modulate, gated_residual
from .encoder import ViTModel
from .reference import jepa as _ref_jepa
from .reference import modules as _ref
from .reference.modules import MLP, Embedder
from .reference.vit import ViTConfig

__all__ = ["JEPA", "ARPredictor", "ConditionalBlock", "Embedder", "MLP", "vit_encoder"]


def vit_encoder(
    size: str = "tiny",
    patch_size: int = 14,
    image_size: int = 224,
    *,
    pretrained: bool = False,
    use_mask_token: bool = False,
    **overrides,
) -> ViTModel:
    """A ViT encoder like the published ``vit_hf(size, patch_size, image_size)``.

    ``forward(pixels (N, 3, H, W), interpolate_pos_encoding=True)`` returns an object whose
    ``last_hidden_state`` is (N, 1 + patches, hidden) like transformers' ``ViTModel``.
    ``overrides`` may set hidden_size, num_hidden_layers, num_attention_heads or
    intermediate_size. Weights are initialised as transformers does; LeWM trains the
    encoder from scratch, so no pretrained weights are bundled.
    """
    if pretrained:
        raise ValueError(
            "pretrained=True is not supported: LeWM trains its encoder from scratch; "
            "load a LeWM checkpoint with lewm_fast.load_pretrained instead"
        )
    if use_mask_token:
        raise ValueError("use_mask_token=True is not supported: LeWM's encoder has no mask token")
    return ViTModel(ViTConfig.from_size(size, patch_size=patch_size, image_size=image_size, **overrides))


class ConditionalBlock(_ref.ConditionalBlock):
    """AdaLN-Zero transformer block; same parameters and math as the published one.

    ``backend="auto" | "triton" | "torch"``: with Triton, each branch input
    (``norm1``/``norm2`` -> modulate -> the branch's affine LayerNorm) is one fused kernel
    and each gated residual ``x + gate * branch`` another (the functional forms of
    :mod:`lewm_fast.adaln`); "auto" uses them for CUDA tensors. ``$LEWM_FAST_BACKEND``
    overrides "auto". ``step_kernel`` (default True): whether :meth:`step` (planning) may run
    as one fused kernel; False keeps the fused pieces, for comparing the two.
    """

    step_kernel: bool = True

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float = 0.0,
        *,
        backend: str = "auto",
    ):
        super().__init__(dim, heads, dim_head, mlp_dim, dropout)
        self.backend = _backend.check_name(backend)

    def _branch_input(self, first, second, x, shift, scale, residual=None):
        """``second(modulate(first(x'), shift, scale))`` with x' = x, or x' = x + gate * y for
        ``residual = (gate, y)`` (then (x', input) is returned): one fused kernel, the input
        written in the dtype the branch's first GEMM reads (:func:`autocast_dtype`)."""
        kwargs = {
            "eps1": first.eps,
            "eps2": second.eps,
            "out_dtype": autocast_dtype(x),
            "backend": self.backend,
        }
        if residual is None:
            return adaln_modulate(x, shift, scale, second.weight, second.bias, **kwargs)
        return gated_adaln_modulate(x, *residual, shift, scale, second.weight, second.bias, **kwargs)

    def attn_input(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``attn.norm(modulate(norm1(x), shift, scale))`` for x (B, T, D): :func:`adaln_modulate`."""
        return self._branch_input(self.norm1, self.attn.norm, x, shift, scale)

    def mlp_input(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``mlp.net[0](modulate(norm2(x), shift, scale))`` for x (B, T, D): :func:`adaln_modulate`."""
        return self._branch_input(self.norm2, self.mlp.net[0], x, shift, scale)

    def gated(self, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The gated residual ``x + gate * y`` (all (B, T, D)): :func:`gated_residual`."""
        return gated_residual(x, gate, y, backend=self.backend)

    def gated_mlp_input(self, x, gate, y, shift, scale):
        """``x' = x + gate * y`` and ``mlp_input(x', shift, scale)`` (all (B, T, D)):
        :func:`gated_adaln_modulate`."""
        return self._branch_input(self.norm2, self.mlp.net[0], x, shift, scale, (gate, y))

    def gated_attn_input(self, x, gate, y, shift, scale):
        """``x' = x + gate * y`` and ``attn_input(x', shift, scale)`` (all (B, T, D)):
        :func:`gated_adaln_modulate`."""
        return self._branch_input(self.norm1, self.attn.norm, x, shift, scale, (gate, y))

    def step(self, x: torch.Tensor, mod: torch.Tensor, past: int, last_only: bool = False) -> torch.Tensor:
        """The block on new tokens x (N, t, D) at window positions past .. past+t-1 against
        ``attn.kv_cache`` (planning; see the reference :meth:`ConditionalBlock.step`), mod
        (N, t, 6 D) its ``adaLN_modulation`` output (any strides with a unit inner one).

        With Triton (CUDA tensors, ``backend`` "auto" or "triton"), the whole step --
        both AdaLN-Zero branch inputs, q/k/v, the cache write, attention over the cached and
        new positions, the output projection, the MLP and both gated residuals -- is one
        kernel (:func:`lewm_fast.kernels.block_step.block_step`) when the block is in eval
        mode without gradients and its Linear weights and the cache share one dtype (bf16
        planning on ``LowPrecisionWeights``, or float32); otherwise the fused pieces above.
        Returns (N, t, D), or (N, 1, D) with ``last_only``.
        """
        kernel = self._step_kernel(x)
        if kernel is None:
            if mod.shape[1] > 1:
                # one copy makes every shift/scale/gate chunk an (N * t, D) view for the
                # AdaLN kernels, which would otherwise copy each strided chunk themselves
                mod = mod.contiguous()
            return super().step(x, mod, past, last_only)
        attn, mlp = self.attn, self.mlp
        keys, values = _ref.kv_cache_of(attn).views(x.shape[0])
        params = (
            attn.to_qkv.weight, attn.to_out[0].weight, attn.to_out[0].bias,
            attn.norm.weight, attn.norm.bias, mlp.net[0].weight, mlp.net[0].bias,
            mlp.net[1].weight, mlp.net[1].bias, mlp.net[4].weight, mlp.net[4].bias,
            attn.heads, attn.dim_head, self.norm1.eps, attn.norm.eps, self.norm2.eps, mlp.net[0].eps,
        )  # fmt: skip
        t = x.shape[1]
        if last_only and t > 1:
            # the earlier tokens' keys/values alone (no MLP for outputs nothing reads), then
            # the last token against them: the reference's FLOPs, one launch more
            kernel.block_step(x[:, :-1], mod[:, :-1], keys, values, past, *params, True)
            return kernel.block_step(x[:, -1:], mod[:, -1:], keys, values, past + t - 1, *params)
        return kernel.block_step(x, mod, keys, values, past, *params)

    def _step_kernel(self, x: torch.Tensor):
        """``lewm_fast.kernels.block_step`` when :meth:`step` runs as one kernel for x, else None."""
        if not self.step_kernel or self.training:
            return None
        if _backend.resolve(self.backend, x, "block_step") == "torch":
            return None
        attn, mlp = self.attn, self.mlp
        out = attn.to_out
        if not (isinstance(out, torch.nn.Sequential) and isinstance(out[0], torch.nn.Linear)):
            return None  # heads == 1 and dim_head == dim: no output projection
        linears = (attn.to_qkv.weight, out[0].weight, mlp.net[1].weight, mlp.net[4].weight)
        cache = _ref.kv_cache_of(attn).kv
        dtype = linears[0].dtype
        if cache is None or cache.dtype != dtype or any(w.dtype != dtype for w in linears):
            return None  # e.g. autocast over float32 weights: the cache holds autocast's dtype
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return None  # the kernel has no backward
        from .kernels import block_step

        return block_step


class ARPredictor(_ref.ARPredictor):
    """Autoregressive action-conditioned predictor (published arguments, plus ``backend``
    for its blocks); ``forward(x (B, T, D), c (B, T, D))`` -> (B, T, D)."""

    block_class = ConditionalBlock

    def __init__(self, *, backend: str = "auto", **kwargs):
        super().__init__(**kwargs)
        backend = _backend.check_name(backend)
        for block in self.transformer.layers:
            block.backend = backend


_SAMPLE_PIXELS = ("B", "S", "T", "C", "H", "W")


class JEPA(_ref_jepa.JEPA):
    """LeWM world model: ``encoder``, ``predictor``, ``action_encoder``, ``projector``, ``pred_proj``.

    The encoder may be :func:`vit_encoder` or a transformers ``ViTModel``. Methods follow
    the published dict-based API (see :mod:`lewm_fast.reference.jepa` for the shapes):
    ``encode(info)``, ``predict(emb, act_emb)``, ``rollout(info, actions)``,
    ``criterion(info)``, ``get_cost(info, candidates)``.
    """

    # ---------------------------------------------------------------- checks
    def _check_info(self, info, dims: tuple[str, ...]) -> torch.Tensor:
        if not isinstance(info, dict) or "pixels" not in info:
            raise ValueError(f"info must be a dict holding 'pixels' of shape ({', '.join(dims)})")
        channels, patch = _ref_jepa.frame_spec_of(self)
        return _checks.pixels(info["pixels"], "info['pixels']", dims, channels, patch)

    # ------------------------------------------------------------ public API
    def encode(self, info: dict) -> dict:
        """``info["pixels"]`` (B, T, C, H, W) -> ``info["emb"]`` (B, T, D); ``info["action"]``
        (B, T, A), if present -> ``info["act_emb"]`` (B, T, D). Returns ``info``."""
        pixels = self._check_info(info, _checks.FRAMES)
        if "action" in info:
            action = _checks.actions(info["action"], "info['action']", ("B", "T", "A"), self.action_width)
            _checks.same_leading(pixels, "info['pixels']", action, "info['action']", 2)
        return super().encode(info)

    def predict(self, emb: torch.Tensor, act_emb: torch.Tensor) -> torch.Tensor:
        """Next-embedding predictions (B, T, D) for emb (B, T, D) and act_emb (B, T, D)."""
        _checks.tensor(emb, "emb", ("B", "T", "D"))
        _checks.tensor(act_emb, "act_emb", ("B", "T", "D"))
        _checks.same_leading(emb, "emb", act_emb, "act_emb", 2)
        frames = _ref_jepa.num_frames_of(self)
        if frames is not None and emb.shape[1] > frames:
            raise ValueError(f"predict takes at most num_frames = {frames} time steps, got {emb.shape[1]}")
        return super().predict(emb, act_emb)

    def rollout(self, info: dict, action_sequence: torch.Tensor, history_size: int | None = None) -> dict:
        """Roll out candidates (B, S, T, A) from ``info["pixels"]`` (B, S, H, C, H, W);
        writes ``info["predicted_emb"]`` (B, S, T + 1, D). Each predictor call sees the last
        ``history_size`` embeddings (default: the predictor's ``num_frames``, spec section 6)."""
        pixels = self._check_info(info, _SAMPLE_PIXELS)
        actions = _checks.actions(action_sequence, "action_sequence", ("B", "S", "T", "A"), self.action_width)
        _checks.same_leading(pixels, "info['pixels']", actions, "action_sequence", 2)
        if actions.shape[2] < pixels.shape[2]:
            raise ValueError(
                f"action_sequence has {actions.shape[2]} steps, fewer than the "
                f"{pixels.shape[2]} context frames of info['pixels']"
            )
        frames = _ref_jepa.num_frames_of(self)
        if history_size is not None and not 1 <= history_size <= (frames or history_size):
            raise ValueError(f"history_size must be in [1, {frames}], got {history_size}")
        return super().rollout(info, action_sequence, history_size)

    def get_cost(self, info: dict, action_candidates: torch.Tensor) -> torch.Tensor:
        """Cost (B, S) of candidates (B, S, T, A): squared distance of the last predicted
        embedding to the embedding of ``info["goal"]`` (B, S, 1, C, H, W)."""
        if not isinstance(info, dict) or "goal" not in info:
            raise ValueError("info must be a dict holding 'goal' frames of shape (B, S, 1, C, H, W)")
        channels, patch = _ref_jepa.frame_spec_of(self)
        goal = _checks.pixels(info["goal"], "info['goal']", _SAMPLE_PIXELS, channels, patch)
        pixels = self._check_info(info, _SAMPLE_PIXELS)
        _checks.same_leading(pixels, "info['pixels']", goal, "info['goal']", 2)
        return super().get_cost(info, action_candidates)
