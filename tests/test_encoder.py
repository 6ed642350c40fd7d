"""lewm_fast's ViT encoder against transformers' ViTModel with the same weights."""

import pytest
import torch
from helpers import randomize_, small_config

import lewm_fast
from lewm_fast.checkpoint import convert_encoder_keys, encoder_key_layout
from lewm_fast.testing import assert_close

transformers = pytest.importorskip("transformers")


def _hf_vit(layers=12, image_size=224, patch_size=14):
    config = transformers.ViTConfig(
        hidden_size=192,
        num_hidden_layers=layers,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        qkv_bias=True,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def _pair(layers=12):
    hf = randomize_(_hf_vit(layers))
    ours = lewm_fast.vit_encoder("tiny", 14, 224, num_hidden_layers=layers).eval()
    ours.load_state_dict(convert_encoder_keys(hf.state_dict(), to="5.x", prefix=""))
    return hf, ours


CASES = [  # (id, batch, height, width)
    ("224px-B2", 2, 224, 224),
    ("112px-interp-B1", 1, 112, 112),
    ("126x98-interp-B3", 3, 126, 98),
]


@pytest.mark.parametrize("b,h,w", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cls_token_matches_transformers(b, h, w):
    hf, ours = _pair()
    pixels = torch.randn(b, 3, h, w)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        got = ours(pixels, interpolate_pos_encoding=True).last_hidden_state
    assert got.shape == expected.shape
    assert_close(got[:, 0], expected[:, 0], "fp32_elementwise", "CLS token")
    assert_close(got, expected, "fp32_gemm", "all tokens")


def test_cls_gradients_match_transformers():
    hf, ours = _pair(layers=2)
    pixels = torch.randn(2, 3, 224, 224)
    for model in (hf, ours):
        model(pixels, interpolate_pos_encoding=True).last_hidden_state[:, 0].pow(2).sum().backward()
    grads_hf = convert_encoder_keys({n: p.grad for n, p in hf.named_parameters()}, to="5.x", prefix="")
    for name, p in ours.named_parameters():
        assert_close(p.grad, grads_hf[name], "fp32_gemm", f"grad {name}")


def test_key_names_follow_the_installed_transformers():
    hf_keys = set(_hf_vit(layers=2).state_dict())
    ours = lewm_fast.vit_encoder(num_hidden_layers=2).state_dict()
    layout = encoder_key_layout(hf_keys, prefix="")
    assert layout in ("4.x", "5.x")
    assert set(convert_encoder_keys(ours, to=layout, prefix="")) == hf_keys


def test_jepa_accepts_a_transformers_encoder():
    config = small_config(
        encoder__hidden_size=192,
        encoder__num_hidden_layers=2,
        encoder__intermediate_size=768,
        encoder__image_size=224,
        projector__input_dim=192,
    )
    ours = randomize_(config.build()).eval()
    hf = _hf_vit(layers=2)
    hf.load_state_dict(
        convert_encoder_keys(
            ours.encoder.state_dict(), to=encoder_key_layout(hf.state_dict(), prefix=""), prefix=""
        )
    )
    with_hf = lewm_fast.JEPA(hf, ours.predictor, ours.action_encoder, ours.projector, ours.pred_proj).eval()
    pixels = torch.randn(1, 2, 1, 3, 224, 224)
    goal = torch.randn(1, 2, 1, 3, 224, 224)
    cand = torch.randn(1, 2, 5, 10)
    with torch.no_grad():
        info = {"pixels": pixels[:, 0], "action": cand[:, 0, :1].expand(1, 1, 10)}
        assert_close(with_hf.encode(dict(info))["emb"], ours.encode(dict(info))["emb"], "fp32_gemm")
        assert_close(
            with_hf.get_cost({"pixels": pixels, "goal": goal}, cand),
            ours.get_cost({"pixels": pixels, "goal": goal}, cand),
            "fp32_gemm",
        )
    assert lewm_fast.LeWMConfig.from_model(with_hf) == lewm_fast.LeWMConfig.from_model(ours)
