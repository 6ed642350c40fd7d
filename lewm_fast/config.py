"""Model configuration: frozen dataclasses mirroring the published ``config.json``.

``LeWMConfig.preset("paper")`` is the published Two-Room model (spec section 1, 18,034,478
parameters). ``to_dict`` / ``from_dict`` read and write the release format of spec
section 7; ``from_model`` recovers the configuration of a built model.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from . import _checks
from .reference.vit import VIT_SIZES, ViTConfig

_ENCODER_OVERRIDES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def parse_value(value: Any) -> Any:
    """A ``--set key=value`` string as a Python literal where it parses (``"1e-4"``, ``"true"``,
    ``"none"``, ``"(0.9, 0.95)"``), else the text itself; non-strings pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return list(parsed) if isinstance(parsed, list) else parsed


def _check_positive(section: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) is not None:
            _checks.positive(getattr(obj, name), f"{section}.{name}")


def _check_rate(section: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
            raise ValueError(f"{section}.{name} must be a probability in [0, 1), got {value!r}")


@dataclass(frozen=True)
class EncoderConfig:
    """ViT encoder: a named size plus optional per-field overrides (spec: ViT-Tiny, patch 14, 224 px)."""

    size: str = "tiny"
    patch_size: int = 14
    image_size: int = 224
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None

    def __post_init__(self) -> None:
        if self.size not in VIT_SIZES:
            raise ValueError(f"encoder.size must be one of {sorted(VIT_SIZES)}, got {self.size!r}")
        _check_positive("encoder", self, ("patch_size", "image_size") + _ENCODER_OVERRIDES)
        self.vit_config()  # raises on inconsistent sizes

    def vit_config(self) -> ViTConfig:
        overrides = {k: getattr(self, k) for k in _ENCODER_OVERRIDES if getattr(self, k) is not None}
        return ViTConfig.from_size(
            self.size, patch_size=self.patch_size, image_size=self.image_size, **overrides
        )


@dataclass(frozen=True)
class PredictorConfig:
    """``ARPredictor`` keyword arguments."""

    num_frames: int = 3
    input_dim: int = 192
    hidden_dim: int = 192
    output_dim: int = 192
    depth: int = 6
    heads: int = 16
    mlp_dim: int = 2048
    dim_head: int = 64
    dropout: float = 0.1
    emb_dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_positive(
            "predictor",
            self,
            ("num_frames", "input_dim", "hidden_dim", "output_dim", "depth", "heads", "mlp_dim", "dim_head"),
        )
        _check_rate("predictor", self, ("dropout", "emb_dropout"))


@dataclass(frozen=True)
class EmbedderConfig:
    """``Embedder`` (action encoder) keyword arguments; input_dim = frameskip x action_dim."""

    input_dim: int = 10
    smoothed_dim: int = 10
    emb_dim: int = 192
    mlp_scale: int = 4

    def __post_init__(self) -> None:
        _check_positive("action_encoder", self, ("input_dim", "smoothed_dim", "emb_dim", "mlp_scale"))


@dataclass(frozen=True)
class MLPConfig:
    """``MLP`` with BatchNorm1d: ``projector`` and ``pred_proj``."""

    input_dim: int = 192
    hidden_dim: int = 2048
    output_dim: int = 192

    def __post_init__(self) -> None:
        _check_positive("projector/pred_proj", self, ("input_dim", "hidden_dim", "output_dim"))


_SECTIONS = {
    "encoder": EncoderConfig,
    "predictor": PredictorConfig,
    "action_encoder": EmbedderConfig,
    "projector": MLPConfig,
    "pred_proj": MLPConfig,
}

# Keys the published config.json may carry that do not change the architecture.
_INERT_KEYS = {"encoder": ("pretrained",), "projector": ("norm_fn",), "pred_proj": ("norm_fn",)}


@dataclass(frozen=True)
class LeWMConfig:
    """Architecture of a LeWM model; defaults are the published Two-Room model."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    action_encoder: EmbedderConfig = field(default_factory=EmbedderConfig)
    projector: MLPConfig = field(default_factory=MLPConfig)
    pred_proj: MLPConfig = field(default_factory=MLPConfig)

    def __post_init__(self) -> None:
        hidden = self.encoder.vit_config().hidden_size
        emb = self.projector.output_dim
        checks = [
            ("projector.input_dim", self.projector.input_dim, "the encoder hidden size", hidden),
            ("predictor.input_dim", self.predictor.input_dim, "projector.output_dim", emb),
            (
                "action_encoder.emb_dim",
                self.action_encoder.emb_dim,
                "predictor.input_dim",
                self.predictor.input_dim,
            ),
            (
                "pred_proj.input_dim",
                self.pred_proj.input_dim,
                "predictor.output_dim",
                self.predictor.output_dim,
            ),
            ("pred_proj.output_dim", self.pred_proj.output_dim, "projector.output_dim", emb),
        ]
        for key, value, other, expected in checks:
            if value != expected:
                raise ValueError(f"{key} = {value} must equal {other} = {expected}")

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> LeWMConfig:
        """A named configuration: ``"paper"`` is the published Two-Room LeWM; ``"tiny"`` and
        ``"small"`` are 2-layer, 56 px models for CPU runs and tests; ``"cpu"`` is the cpu
        pipeline's 3-layer, 56 px model (8 px patches) that learns Two-Room on a CPU."""
        if name not in PRESETS:
            raise ValueError(f"unknown LeWMConfig preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]

    def override(self, values: dict[str, Any]) -> LeWMConfig:
        """A copy with dotted-key overrides, e.g. ``{"predictor.depth": 2}``."""
        sections = {name: {} for name in _SECTIONS}
        for key, value in values.items():
            section, _, name = key.partition(".")
            if section not in _SECTIONS or name not in {f.name for f in fields(_SECTIONS[section])}:
                raise ValueError(f"unknown LeWMConfig key {key!r}")
            sections[section][name] = value
        return dataclasses.replace(
            self, **{s: dataclasses.replace(getattr(self, s), **v) for s, v in sections.items() if v}
        )

    # ---------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The ``config.json`` form: constructor arguments per part (encoder overrides only if set)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        out["encoder"] = {k: v for k, v in out["encoder"].items() if v is not None}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeWMConfig:
        """Parse a ``config.json`` dict. Hydra keys (``_target_``, ...) are ignored;
        unknown keys and missing parts raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"a LeWM config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(k for k in data if k not in _SECTIONS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown LeWM config part(s) {unknown}; expected {list(_SECTIONS)}")
        missing = [k for k in _SECTIONS if k not in data]
        if missing:
            raise ValueError(f"LeWM config is missing part(s) {missing}")
        parts = {}
        for section, kind in _SECTIONS.items():
            raw = data[section]
            if not isinstance(raw, dict):
                raise ValueError(f"config part {section!r} must be an object, got {raw!r}")
            known = {f.name for f in fields(kind)}
            kwargs = {}
            for key, value in raw.items():
                if key.startswith("_") or key in _INERT_KEYS.get(section, ()):
                    continue
                if section == "encoder" and key == "use_mask_token":
                    if value:
                        raise ValueError(
                            "encoder.use_mask_token=true is not supported (LeWM has no mask token)"
                        )
                    continue
                if key not in known:
                    raise ValueError(f"unknown config key {section}.{key}; expected one of {sorted(known)}")
                kwargs[key] = value
            parts[section] = kind(**kwargs)
        return cls(**parts)

    @classmethod
    def from_model(cls, model: nn.Module) -> LeWMConfig:
        """Recover the configuration of a built JEPA (lewm_fast, reference or published classes).

        The encoder may be a lewm_fast ViT or a transformers ``ViTModel``; the other parts
        must be the published ``ARPredictor`` / ``Embedder`` / ``MLP`` structure.
        """
        try:
            vit = model.encoder.config
            encoder = _encoder_config_from_vit(vit)
            pred = model.predictor
            block = pred.transformer.layers[0]
            heads = block.attn.heads
            out_proj = pred.transformer.output_proj
            predictor = PredictorConfig(
                num_frames=pred.pos_embedding.shape[1],
                input_dim=pred.pos_embedding.shape[2],
                hidden_dim=block.norm1.normalized_shape[0],
                output_dim=out_proj.out_features
                if isinstance(out_proj, nn.Linear)
                else block.norm1.normalized_shape[0],
                depth=len(pred.transformer.layers),
                heads=heads,
                mlp_dim=block.mlp.net[1].out_features,
                dim_head=block.attn.to_qkv.out_features // (3 * heads),
                dropout=float(block.attn.dropout),
                emb_dropout=float(pred.dropout.p),
            )
            act = model.action_encoder
            emb_dim = act.embed[2].out_features
            action_encoder = EmbedderConfig(
                input_dim=act.patch_embed.in_channels,
                smoothed_dim=act.patch_embed.out_channels,
                emb_dim=emb_dim,
                mlp_scale=act.embed[0].out_features // emb_dim,
            )
            projector, pred_proj = (
                MLPConfig(m.net[0].in_features, m.net[0].out_features, m.net[3].out_features)
                for m in (model.projector, model.pred_proj)
            )
        except (AttributeError, IndexError, TypeError) as exc:
            raise ValueError(
                "cannot infer a LeWMConfig from this model: it does not have the published "
                f"LeWM structure ({exc}); pass config= explicitly"
            ) from exc
        return cls(encoder, predictor, action_encoder, projector, pred_proj)

    # ------------------------------------------------------------------ build
    def build(self, *, reference: bool = False, backend: str = "auto") -> nn.Module:
        """Build the JEPA: lewm_fast public classes (their fused ops on ``backend``), or
        ``lewm_fast.reference`` ones with ``reference=True``."""
        if reference:
            from . import reference as ns

            encoder = ns.ViTModel(self.encoder.vit_config())
            predictor = ns.ARPredictor(**dataclasses.asdict(self.predictor))
        else:
            from . import model as ns

            encoder = ns.vit_encoder(**self.to_dict()["encoder"])
            predictor = ns.ARPredictor(**dataclasses.asdict(self.predictor), backend=backend)
        action_encoder = ns.Embedder(**dataclasses.asdict(self.action_encoder))
        projector, pred_proj = (
            ns.MLP(**dataclasses.asdict(c), norm_fn=nn.BatchNorm1d) for c in (self.projector, self.pred_proj)
        )
        return ns.JEPA(encoder, predictor, action_encoder, projector, pred_proj)


def _encoder_config_from_vit(vit: Any) -> EncoderConfig:
    """EncoderConfig of a lewm_fast ``ViTConfig`` or a transformers ``ViTConfig``."""

    def as_int(value: Any) -> int:
        return int(value[0] if isinstance(value, (tuple, list)) else value)

    channels = int(getattr(vit, "num_channels", 3))
    if channels != 3:
        raise ValueError(f"LeWM encoders take RGB frames; this encoder has num_channels={channels}")
    values = {k: int(getattr(vit, k)) for k in _ENCODER_OVERRIDES}
    size = next(
        (name for name, dims in VIT_SIZES.items() if dims == tuple(values[k] for k in _ENCODER_OVERRIDES)),
        "tiny",
    )
    base = dict(zip(_ENCODER_OVERRIDES, VIT_SIZES[size]))
    overrides = {k: v for k, v in values.items() if v != base[k]}
    return EncoderConfig(
        size=size, patch_size=as_int(vit.patch_size), image_size=as_int(vit.image_size), **overrides
    )


# Small models for CPU runs: a 2-layer ViT (hidden 48, 3 heads) on 56 px frames with 14 px
# patches and 2 predictor blocks. "tiny" is the one tests and CPU benchmarks use; "small"
# (wider heads and MLPs) is the smoke pipeline's.
_TINY = {
    "encoder.hidden_size": 48,
    "encoder.num_hidden_layers": 2,
    "encoder.intermediate_size": 96,
    "encoder.image_size": 56,
    "projector.input_dim": 48,
    "projector.hidden_dim": 64,
    "projector.output_dim": 32,
    "pred_proj.input_dim": 32,
    "pred_proj.hidden_dim": 64,
    "pred_proj.output_dim": 32,
    "predictor.input_dim": 32,
    "predictor.hidden_dim": 32,
    "predictor.output_dim": 32,
    "predictor.depth": 2,
    "predictor.heads": 4,
    "predictor.dim_head": 8,
    "predictor.mlp_dim": 64,
    "action_encoder.emb_dim": 32,
}
_SMALL = {
    **_TINY,
    "projector.hidden_dim": 256,
    "pred_proj.hidden_dim": 256,
    "predictor.dim_head": 16,
    "predictor.mlp_dim": 128,
}

# The cpu pipeline's model: 56 px frames in 8 px patches (49 tokens; the agent's dot ~2 px
# wide), a 3-layer width-96 ViT, the small predictor and 32-wide embedding. Chosen by the
# sweep in docs/cpu-preset.md.
_CPU = {
    **_SMALL,
    "encoder.image_size": 56,
    "encoder.patch_size": 8,
    "encoder.hidden_size": 96,
    "encoder.num_hidden_layers": 3,
    "encoder.intermediate_size": 384,
    "projector.input_dim": 96,
}

PRESETS: dict[str, LeWMConfig] = {
    "paper": LeWMConfig(),
    "tiny": LeWMConfig().override(_TINY),
    "small": LeWMConfig().override(_SMALL),
    "cpu": LeWMConfig().override(_CPU),
}
