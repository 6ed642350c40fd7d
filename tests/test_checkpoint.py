"""Release-format checkpoints: round trips in both key layouts, published configs, clear errors."""

import json

import pytest
import torch
from helpers import randomize_, small_config

import lewm_fast
from lewm_fast.checkpoint import convert_encoder_keys, encoder_key_layout
from lewm_fast.testing import assert_close

# The spec's per-layer encoder key names (section 1), layer 0.
KEYS_4X = [
    "encoder.encoder.layer.0.attention.attention.query.weight",
    "encoder.encoder.layer.0.attention.attention.key.bias",
    "encoder.encoder.layer.0.attention.attention.value.weight",
    "encoder.encoder.layer.0.attention.output.dense.weight",
    "encoder.encoder.layer.0.intermediate.dense.bias",
    "encoder.encoder.layer.0.output.dense.weight",
    "encoder.encoder.layer.0.layernorm_before.weight",
    "encoder.encoder.layer.0.layernorm_after.bias",
]
KEYS_5X = [
    "encoder.layers.0.attention.q_proj.weight",
    "encoder.layers.0.attention.k_proj.bias",
    "encoder.layers.0.attention.v_proj.weight",
    "encoder.layers.0.attention.o_proj.weight",
    "encoder.layers.0.mlp.fc1.bias",
    "encoder.layers.0.mlp.fc2.weight",
    "encoder.layers.0.layernorm_before.weight",
    "encoder.layers.0.layernorm_after.bias",
]
SHARED = [
    "encoder.embeddings.cls_token",
    "encoder.embeddings.position_embeddings",
    "encoder.embeddings.patch_embeddings.projection.weight",
    "encoder.layernorm.weight",
]


@pytest.fixture
def model():
    m = randomize_(small_config().build())
    m.train()
    with torch.no_grad():  # move the BatchNorm running statistics away from their init
        m.encode({"pixels": torch.randn(4, 2, 3, 56, 56)})
    return m.eval()


def _outputs(model):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 1, 3, 56, 56)
    cand = torch.randn(2, 3, 5, 10)
    with torch.no_grad():
        return model.get_cost({"pixels": pixels, "goal": pixels.flip(0)}, cand)


def test_key_conversion_matches_spec_names():
    state = {k: torch.randn(2) for k in KEYS_4X + SHARED}
    five = convert_encoder_keys(state, to="5.x")
    assert set(five) == set(KEYS_5X + SHARED)
    assert encoder_key_layout(five) == "5.x" and encoder_key_layout(state) == "4.x"
    back = convert_encoder_keys(five, to="4.x")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
def test_round_trip(model, tmp_path, layout):
    folder = lewm_fast.save_pretrained(model, tmp_path / "ckpt", key_layout=layout)
    saved = torch.load(folder / "weights.pt", weights_only=True)
    assert encoder_key_layout(saved) == layout
    config = json.loads((folder / "config.json").read_text())
    assert set(config) == {"encoder", "predictor", "action_encoder", "projector", "pred_proj"}

    loaded = lewm_fast.load_pretrained(folder)
    assert isinstance(loaded, lewm_fast.JEPA) and not loaded.training
    assert loaded.checkpoint_key_layout == layout
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert_close(_outputs(loaded), _outputs(model), "fp32_elementwise", "cost after reload")

    # written back in the layout it was read from
    again = lewm_fast.save_pretrained(loaded, tmp_path / "again")
    assert encoder_key_layout(torch.load(again / "weights.pt", weights_only=True)) == layout


def test_loads_published_style_config_with_hydra_targets(model, tmp_path):
    folder = tmp_path / "published"
    folder.mkdir()
    config = lewm_fast.LeWMConfig.from_model(model).to_dict()
    config["_target_"] = "stable_worldmodel.wm.lewm.LeWM"
    config["encoder"].update(
        _target_="stable_pretraining.backbone.utils.vit_hf", pretrained=False, use_mask_token=False
    )
    for part in ("projector", "pred_proj"):
        config[part]["norm_fn"] = {"_target_": "torch.nn.BatchNorm1d", "_partial_": True}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(convert_encoder_keys(model.state_dict(), to="4.x"), folder / "weights.pt")
    loaded = lewm_fast.load_pretrained(folder)
    assert_close(_outputs(loaded), _outputs(model), "fp32_elementwise")


def test_reference_load(model, tmp_path):
    folder = lewm_fast.save_pretrained(model, tmp_path / "ckpt")
    loaded = lewm_fast.load_pretrained(folder, reference=True)
    assert type(loaded) is lewm_fast.reference.JEPA
    assert_close(_outputs(loaded), _outputs(model), "fp32_elementwise")


def _corrupt(folder, edit):
    state = torch.load(folder / "weights.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "weights.pt")


def test_missing_unexpected_and_mismatched_keys_are_named(model, tmp_path):
    folder = lewm_fast.save_pretrained(model, tmp_path / "ckpt", key_layout="4.x")

    _corrupt(folder, lambda s: s.pop("predictor.pos_embedding"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): predictor.pos_embedding"):
        lewm_fast.load_pretrained(folder)

    _corrupt(
        folder,
        lambda s: s.update(
            {"predictor.pos_embedding": torch.randn(1, 3, 32), "encoder.extra.weight": torch.randn(3)}
        ),
    )
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): encoder.extra.weight"):
        lewm_fast.load_pretrained(folder)

    def wrong_shape(s):
        s.pop("encoder.extra.weight")
        s["projector.net.0.weight"] = torch.randn(64, 47)

    _corrupt(folder, wrong_shape)
    with pytest.raises(
        ValueError, match=r"projector.net.0.weight: checkpoint \(64, 47\) vs model \(64, 48\)"
    ):
        lewm_fast.load_pretrained(folder)


def test_unreadable_files_name_the_path(model, tmp_path):
    folder = lewm_fast.save_pretrained(model, tmp_path / "ckpt")
    weights = folder / "weights.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match=f"cannot read checkpoint weights {weights}"):
        lewm_fast.load_pretrained(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="weights.pt"):
        lewm_fast.load_pretrained(folder)

    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        lewm_fast.load_pretrained(folder)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "encoder": {},
                "predictor": {"depth": 2, "bogus": 1},
                "action_encoder": {},
                "projector": {},
                "pred_proj": {},
            }
        )
    )
    with pytest.raises(ValueError, match="predictor.bogus"):
        lewm_fast.load_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        lewm_fast.load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        lewm_fast.load_pretrained(tmp_path / "nowhere")


def test_interrupted_save_leaves_previous_checkpoint(model, tmp_path, monkeypatch):
    folder = lewm_fast.save_pretrained(model, tmp_path / "ckpt")
    before = (folder / "weights.pt").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        lewm_fast.save_pretrained(randomize_(small_config().build(), seed=1), folder)
    with pytest.raises(KeyboardInterrupt):
        lewm_fast.save_pretrained(model, tmp_path / "fresh")
    monkeypatch.undo()

    assert (folder / "weights.pt").read_bytes() == before
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    lewm_fast.load_pretrained(folder)


def test_refuses_to_replace_unrelated_folder(model, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a LeWM checkpoint"):
        lewm_fast.save_pretrained(model, tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "keep me"


def test_paper_checkpoint_round_trip(tmp_path):
    model = lewm_fast.LeWMConfig.preset("paper").build()
    folder = lewm_fast.save_pretrained(model, tmp_path / "paper")
    config = json.loads((folder / "config.json").read_text())
    assert config["encoder"] == {"size": "tiny", "patch_size": 14, "image_size": 224}
    assert config["projector"] == {"input_dim": 192, "hidden_dim": 2048, "output_dim": 192}
    loaded = lewm_fast.load_pretrained(folder)
    assert sum(p.numel() for p in loaded.parameters()) == 18_034_478
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert set(KEYS_4X) <= set(state)
