"""LeWMConfig: presets, overrides, config.json round trips and clear errors."""

import dataclasses

import pytest
from helpers import small_config

import lewm_fast
from lewm_fast import LeWMConfig


def test_paper_preset_is_the_spec_model():
    cfg = LeWMConfig.preset("paper")
    assert cfg.encoder.vit_config().hidden_size == 192 and cfg.encoder.patch_size == 14
    assert cfg.predictor == lewm_fast.config.PredictorConfig(
        num_frames=3,
        input_dim=192,
        hidden_dim=192,
        output_dim=192,
        depth=6,
        heads=16,
        mlp_dim=2048,
        dim_head=64,
        dropout=0.1,
        emb_dropout=0.0,
    )
    assert cfg.action_encoder.input_dim == 10 and cfg.action_encoder.emb_dim == 192
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.predictor.depth = 2


def test_dict_round_trip_and_from_model():
    cfg = small_config()
    assert LeWMConfig.from_dict(cfg.to_dict()) == cfg
    assert LeWMConfig.from_model(cfg.build()) == cfg
    assert LeWMConfig.from_model(cfg.build(reference=True)) == cfg
    paper = LeWMConfig.preset("paper")
    assert LeWMConfig.from_model(paper.build()) == paper


@pytest.mark.parametrize(
    "values,match",
    [
        ({"predictor.depth": 0}, "predictor.depth must be a positive integer"),
        ({"predictor.dropout": 1.5}, "predictor.dropout must be a probability"),
        ({"encoder.size": "huge"}, "encoder.size must be one of"),
        ({"encoder.num_attention_heads": 5}, "divisible by num_attention_heads"),
        ({"predictor.input_dim": 64}, "predictor.input_dim = 64 must equal projector.output_dim"),
        ({"predictor.nope": 1}, "unknown LeWMConfig key 'predictor.nope'"),
        ({"decoder.depth": 1}, "unknown LeWMConfig key 'decoder.depth'"),
    ],
    ids=["depth", "dropout", "size", "heads", "dims", "key", "part"],
)
def test_bad_values_name_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        LeWMConfig.preset("paper").override(values)


def test_from_dict_errors():
    data = LeWMConfig.preset("paper").to_dict()
    with pytest.raises(ValueError, match="missing part"):
        LeWMConfig.from_dict({k: v for k, v in data.items() if k != "predictor"})
    with pytest.raises(ValueError, match="unknown LeWM config part"):
        LeWMConfig.from_dict({**data, "decoder": {}})
    with pytest.raises(ValueError, match="use_mask_token"):
        LeWMConfig.from_dict({**data, "encoder": {**data["encoder"], "use_mask_token": True}})
    with pytest.raises(ValueError, match="unknown LeWMConfig preset"):
        LeWMConfig.preset("huge")
