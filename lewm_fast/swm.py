"""stable-worldmodel models on lewm_fast's modules: accelerate in place, or convert.

stable-worldmodel (``pip install lewm-fast[swm]``) builds LeWM as
``stable_worldmodel.wm.lewm.LeWM`` around a transformers ViT, its predictor from
``stable_worldmodel.wm.lewm.module`` blocks, and trains it with
``stable_worldmodel.wm.loss.SIGReg``. Three entry points, in the manner of Liger-Kernel's
``apply_liger_kernel_to_*``::

    model = swm.wm.utils.load_pretrained(...)   # a published LeWM object
    lewm_fast.accelerate(model)                 # same object, fused predictor blocks
    lewm_fast.accelerate_sigreg()               # swm.wm.loss.SIGReg is lewm_fast.SIGReg from now on
    jepa = lewm_fast.from_published(model)      # a lewm_fast.JEPA on the same tensors

Nothing is copied: the new modules hold the published model's own parameter and buffer
tensors (``load_state_dict(assign=True)`` of its ``state_dict(keep_vars=True)``), so an
optimizer step or a checkpoint load on either model is seen by the other. The published
classes are recognised by their module path; this module imports stable_worldmodel only in
:func:`accelerate_sigreg`, so lewm_fast works without it.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from . import backend as _backend
from .model import JEPA, ARPredictor, ConditionalBlock
from .sigreg import SIGReg

__all__ = ["accelerate", "accelerate_sigreg", "from_published", "is_published_lewm"]

_PUBLISHED_PACKAGE = "stable_worldmodel."
_LOSS_MODULES = ("stable_worldmodel.wm.loss", "stable_worldmodel.wm")


def is_published_lewm(model) -> bool:
    """True for a stable-worldmodel LeWM (``stable_worldmodel.wm.lewm.LeWM`` or a subclass
    defined in stable_worldmodel): an ``nn.Module`` from that package with ``encoder``,
    ``predictor`` and ``action_encoder``. Does not import stable_worldmodel."""
    return (
        isinstance(model, nn.Module)
        and any(cls.__module__.startswith(_PUBLISHED_PACKAGE) for cls in type(model).__mro__)
        and all(hasattr(model, part) for part in ("encoder", "predictor", "action_encoder"))
    )


def _shared(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` (built on the meta device) holding ``old``'s parameter and buffer tensors
    themselves, in ``old``'s training mode. ValueError if the structures differ."""
    try:
        new.load_state_dict(old.state_dict(keep_vars=True), strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{type(old).__name__} does not have the published LeWM structure: {exc}") from None
    left = [name for name, t in chain(new.named_parameters(), new.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{type(old).__name__}: no published tensor for {left}")
    return new.train(old.training)


def _block_sizes(block: nn.Module) -> dict:
    """The ConditionalBlock arguments of a published block (whose attention keeps no
    ``dim_head``: it is ``to_qkv``'s width over 3 x heads)."""
    try:
        attn, mlp = block.attn, block.mlp
        dim = int(block.norm1.normalized_shape[0])
        heads = int(attn.heads)
        inner = attn.to_qkv.out_features // 3
        return {
            "dim": dim,
            "heads": heads,
            "dim_head": inner // heads,
            "mlp_dim": int(mlp.net[1].out_features),
            "dropout": float(attn.dropout),
        }
    except (AttributeError, IndexError, TypeError) as exc:
        raise ValueError(
            f"{type(block).__name__} is not a published LeWM ConditionalBlock (attn.heads, attn.to_qkv, "
            f"attn.dropout, norm1, mlp.net): {exc}"
        ) from None


def _fast_block(block: nn.Module, backend: str) -> ConditionalBlock:
    """A lewm_fast ConditionalBlock on ``block``'s tensors (``block`` itself if it is one)."""
    if isinstance(block, ConditionalBlock):
        block.backend = backend
        return block
    sizes = _block_sizes(block)
    with torch.device("meta"):
        new = ConditionalBlock(**sizes, backend=backend)
    return _shared(new, block)


def _layers(model) -> nn.ModuleList:
    try:
        layers = model.predictor.transformer.layers
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__} has no predictor.transformer.layers: not a LeWM world model"
        ) from None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"predictor.transformer.layers must be a ModuleList, got {type(layers).__name__}")
    return layers


def accelerate(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Swap the predictor blocks of a published LeWM for lewm_fast's fused ones, in place.

    ``model.predictor.transformer.layers[i]`` (stable-worldmodel's ``ConditionalBlock``)
    becomes a :class:`lewm_fast.ConditionalBlock` holding the same parameter tensors (no
    copy; ``state_dict`` keys and values unchanged), in the same training mode; its AdaLN-Zero
    steps run the fused kernels on CUDA (``backend`` as in :class:`lewm_fast.ConditionalBlock`).
    Outputs, costs, losses and gradients equal the unpatched model's (spec section 9
    tolerances). Returns ``model`` itself; blocks that already are lewm_fast's are kept
    (their backend set). ValueError for a model without a published predictor.
    """
    backend = _backend.check_name(backend)
    layers = _layers(model)
    for i, block in enumerate(layers):
        layers[i] = _fast_block(block, backend)
    return model


def from_published(model: nn.Module, *, backend: str = "auto") -> JEPA:
    """A :class:`lewm_fast.JEPA` on a published LeWM's tensors (the model is not changed).

    The predictor becomes a :class:`lewm_fast.ARPredictor` with lewm_fast blocks holding
    the published parameter tensors; the encoder (a transformers ``ViTModel``, which
    ``lewm_fast.JEPA`` takes as is), action encoder and projectors are the published
    modules themselves. So the JEPA shares every tensor with ``model`` (no copy; use
    ``copy.deepcopy`` first for an independent one), has the published ``state_dict``
    keys, plans on lewm_fast's fast path and saves with :func:`lewm_fast.save_pretrained`.
    ValueError for a model without the published parts.
    """
    backend = _backend.check_name(backend)
    missing = [p for p in ("encoder", "predictor", "action_encoder") if not hasattr(model, p)]
    if missing:
        raise ValueError(f"{type(model).__name__} is not a LeWM world model: it has no {missing}")
    predictor = model.predictor
    if not isinstance(predictor, ARPredictor):
        predictor = _fast_predictor(predictor, backend)
    jepa = JEPA(
        model.encoder,
        predictor,
        model.action_encoder,
        getattr(model, "projector", None),
        getattr(model, "pred_proj", None),
    )
    jepa.training = model.training  # the root's flag only: the shared parts keep theirs
    return jepa


def _fast_predictor(predictor: nn.Module, backend: str) -> ARPredictor:
    """A lewm_fast ARPredictor on a published ``Predictor``'s tensors."""
    layers = getattr(getattr(predictor, "transformer", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(predictor).__name__} has no predictor blocks (transformer.layers)")
    sizes = _block_sizes(layers[0])
    try:
        pos = predictor.pos_embedding
        args = {
            "num_frames": int(pos.shape[1]),
            "input_dim": int(pos.shape[2]),
            "hidden_dim": int(predictor.transformer.norm.normalized_shape[0]),
            "output_dim": int(getattr(predictor, "output_dim", None) or _output_dim(predictor, pos)),
            "depth": len(layers),
            "heads": sizes["heads"],
            "mlp_dim": sizes["mlp_dim"],
            "dim_head": sizes["dim_head"],
            "dropout": sizes["dropout"],
            "emb_dropout": float(predictor.dropout.p),
        }
    except (AttributeError, IndexError, TypeError) as exc:
        raise ValueError(f"{type(predictor).__name__} is not a published LeWM Predictor: {exc}") from None
    with torch.device("meta"):
        new = ARPredictor(**args, backend=backend)
    return _shared(new, predictor)


def _output_dim(predictor: nn.Module, pos: torch.Tensor) -> int:
    proj = predictor.transformer.output_proj
    return int(proj.out_features) if isinstance(proj, nn.Linear) else int(pos.shape[2])


def accelerate_sigreg(*, backend: str = "auto") -> type[SIGReg]:
    """Make ``stable_worldmodel.wm.loss.SIGReg`` (and its re-export ``stable_worldmodel.wm.SIGReg``)
    lewm_fast's :class:`~lewm_fast.SIGReg`, as Liger-Kernel's ``apply_liger_kernel_to_*`` do.

    Same constructor (``knots=17, num_proj=1024``), buffers and statistic; it draws its
    projection matrix from the global generator like the published one (spec section 3),
    so a seeded run gives the same loss; on CUDA it runs the fused kernel. Call it before
    the training script builds its SIGReg: a name imported earlier (``from
    stable_worldmodel.wm.loss import SIGReg``) keeps the published class. ``backend``
    other than "auto" gives a subclass with that default. Returns the class installed.
    ImportError without stable-worldmodel.
    """
    import importlib

    backend = _backend.check_name(backend)
    cls = SIGReg
    if backend != "auto":
        cls = type("SIGReg", (SIGReg,), {"__init__": _sigreg_init(backend), "__module__": __name__})
    for name in _LOSS_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "SIGReg"):
            module.SIGReg = cls
    return cls


def _sigreg_init(backend: str):
    def __init__(self, knots: int = 17, num_proj: int = 1024, **kwargs):
        kwargs.setdefault("backend", backend)
        SIGReg.__init__(self, knots, num_proj, **kwargs)

    return __init__
