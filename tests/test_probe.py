"""Probes (lewm_fast.probe): the ridge probe on synthetic data, fresh windows against the
training windows, the 1-step MSE against the training loss, SIGReg of held-out embeddings,
and run_probes end to end on a small random model."""

import json
import types

import numpy as np
import pytest
import torch
from helpers import randomize_, small_config
from torch import nn

from lewm_fast import probe
from lewm_fast.data import IMAGENET_MEAN, IMAGENET_STD, TrainingWindows, generate_dataset
from lewm_fast.reference import jepa_loss


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(
        tmp_path_factory.mktemp("probe") / "data", episodes=10, seed=5, max_steps=50, progress=False
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(small_config().build(), seed=3)


# ------------------------------------------------------------------ ridge on synthetic data
def _linear_data(n, d, k, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.1, 10.0, d)  # features of mixed scale
    w = torch.randn(d, k, generator=gen)
    y = x @ w + torch.tensor([3.0, -7.0][:k]) + noise * torch.randn(n, k, generator=gen)
    return x, y


def test_ridge_recovers_a_known_linear_map():
    x, y = _linear_data(3000, 24, 2, noise=1e-3, seed=0)
    fit = probe.ridge_fit(x[:2000], y[:2000], alpha=1e-6)
    r2 = probe.r2_score(y[2000:], fit.predict(x[2000:]))
    assert r2.shape == (2,) and bool((r2 > 0.9999).all()), r2


def test_ridge_on_noise_gives_no_fit():
    x, _ = _linear_data(3000, 24, 2, noise=0.0, seed=1)
    y = torch.randn(3000, 2, generator=torch.Generator().manual_seed(2))
    fit = probe.ridge_fit(x[:2000], y[:2000], alpha=1e-3)
    r2 = probe.r2_score(y[2000:], fit.predict(x[2000:]))
    assert bool((r2.abs() < 0.05).all()), r2


def test_ridge_bias_and_strength():
    x, y = _linear_data(500, 8, 2, noise=0.1, seed=3)
    weak, strong = probe.ridge_fit(x, y, 1e-6), probe.ridge_fit(x, y, 1e6)
    assert weak.weight.norm() > 100 * strong.weight.norm()
    # a huge penalty leaves the bias: the prediction is the mean of y
    assert torch.allclose(strong.predict(x), y.double().mean(0).expand(500, 2), atol=1e-2)


def test_r2_score_definition():
    y = torch.tensor([[1.0, 2.0], [2.0, 2.0], [4.0, 2.0]])
    assert probe.r2_score(y, y)[0] == 1.0
    assert probe.r2_score(y, y.mean(0).expand(3, 2))[0] == pytest.approx(0.0)
    assert torch.isnan(probe.r2_score(y, y)[1])  # constant column
    assert probe.r2_score(y, -y)[0] < 0


def test_select_alpha_validates_on_held_out_groups():
    x, y = _linear_data(600, 12, 2, noise=1e-3, seed=4)
    groups = np.repeat(np.arange(30), 20)
    alpha, scores = probe.select_alpha(x, y, groups, seed=0)
    assert list(scores) == [repr(a) for a in sorted(probe.DEFAULT_ALPHAS)]
    assert alpha <= 1e-3 and scores[repr(alpha)] == min(scores.values())
    with pytest.raises(ValueError, match="at least 2 episodes"):
        probe.select_alpha(x, y, np.zeros(600))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: probe.ridge_fit(torch.randn(5, 2), torch.randn(5, 1), 0.0), "alpha"),
        (lambda: probe.ridge_fit(torch.randn(5, 2), torch.randn(4, 1), 1.0), "rows"),
        (lambda: probe.ridge_fit(torch.full((5, 2), float("nan")), torch.randn(5, 1), 1.0), "NaN"),
        (lambda: probe.ridge_fit(torch.randn(5), torch.randn(5, 1), 1.0), r"\(N, D\)"),
        (lambda: probe.r2_score(torch.randn(5, 2), torch.randn(5, 3)), "columns"),
        (lambda: probe.split_episodes(1, 0.2, 0), "num_episodes"),
        (lambda: probe.split_episodes(10, 1.0, 0), "test_fraction"),
    ],
    ids=["alpha-zero", "row-mismatch", "nan", "1-d", "columns", "one-episode", "fraction"],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_split_episodes_is_a_seeded_partition():
    train, test = probe.split_episodes(50, 0.2, seed=7)
    assert len(test) == 10 and np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(50))
    assert np.array_equal(probe.split_episodes(50, 0.2, seed=7)[1], test)
    assert not np.array_equal(probe.split_episodes(50, 0.2, seed=8)[1], test)


class _DotCentroid(nn.Module):
    """A fake model whose embedding is the centroid of the red dot (+ 6 noise features).

    The red-minus-green intensity of a Two-Room frame is the dot's alpha everywhere (on white
    and on black), so the centroid is (nearly) the agent position: a linear probe must find it.
    """

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.encoder = types.SimpleNamespace(config=types.SimpleNamespace(image_size=224))

    def encode(self, info):
        px = info["pixels"][:, 0]  # (N, 3, S, S)
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        rgb = px * std[:, None, None] + mean[:, None, None]
        a = (rgb[:, 0] - rgb[:, 1]).clamp(min=0)  # (N, S, S)
        grid = torch.arange(a.shape[-1], dtype=torch.float32)
        total = a.sum(dim=(1, 2))
        cx = (a * grid).sum(dim=(1, 2)) / total
        cy = (a * grid[:, None]).sum(dim=(1, 2)) / total
        noise = torch.randn(px.shape[0], 6, generator=torch.Generator().manual_seed(px.shape[0]))
        info["emb"] = (torch.cat([torch.stack([cx, cy], 1), noise], 1) * self.scale)[:, None]
        return info


def test_linear_probe_finds_the_position_in_a_linear_embedding(dataset):
    out = probe.linear_probe(_DotCentroid(), dataset, seed=0, max_frames=300)
    assert out["r2"]["x"] > 0.999 and out["r2"]["y"] > 0.999, out
    assert out["rmse_px"]["x"] < 1.0 and out["train_frames"] + out["test_frames"] == 300
    assert out["train_episodes"] == 8 and out["test_episodes"] == 2


# ------------------------------------------------------------------ fresh rollouts
def test_fresh_windows_equal_training_windows_of_the_same_episodes(dataset):
    """Fresh episodes under seed s are the episodes generate_dataset(seed=s) writes; their
    windows must be the training windows (same frame rows, same z-scored actions)."""
    windows = TrainingWindows(dataset, image_size=56)
    fresh = probe.fresh_windows(windows.action_mean, windows.action_std, episodes=10, seed=5, max_steps=50)
    assert len(fresh) == len(windows)
    ids = torch.arange(len(windows))
    proprio = torch.from_numpy(np.array(dataset.proprio))[windows.frame_rows(ids)]
    actions = windows.actions(ids)
    assert torch.equal(fresh.positions[fresh.frame_rows], proprio)
    assert torch.equal(torch.isnan(fresh.action), torch.isnan(actions))
    assert torch.allclose(fresh.action.nan_to_num(), actions.nan_to_num(), atol=1e-6)
    starts = windows.starts.numpy()
    assert np.array_equal(fresh.episode.numpy(), np.asarray(dataset.episode_idx)[starts])


def test_one_step_mse_is_the_training_pred_loss_in_eval_mode(dataset, model):
    windows = TrainingWindows(dataset, image_size=56)
    fresh = probe.fresh_windows(windows.action_mean, windows.action_std, episodes=10, seed=5, max_steps=50)
    ids = torch.arange(0, len(windows), 7)  # a spread-out subset keeps the rendering cheap
    emb = probe.encode_windows(model, fresh)[ids]
    out = probe.one_step_mse(model, emb, fresh.action[ids], batch_size=16)
    model.eval()
    with torch.no_grad():
        expected = jepa_loss(model, lambda z: z.sum(), windows.batch(ids))
    model.train()
    assert out["mse"] == pytest.approx(float(expected["pred_loss"]), rel=1e-5)
    assert len(out["mse_by_position"]) == 3 and out["windows"] == len(ids)
    assert np.mean(out["mse_by_position"]) == pytest.approx(out["mse"])


def test_one_step_mse_refuses_a_history_longer_than_the_predictor(model):
    frames = model.predictor.num_frames
    emb = torch.randn(2, frames + 2, model.predictor.pos_embedding.shape[-1])
    action = torch.randn(2, frames + 2, model.action_width)
    with pytest.raises(ValueError, match=f"at most num_frames = {frames}"):
        probe.one_step_mse(model, emb, action, history_size=frames + 1)


def test_fresh_windows_errors():
    with pytest.raises(ValueError, match="rows a window needs"):
        probe.fresh_windows(torch.zeros(2), torch.ones(2), episodes=2, max_steps=5)
    with pytest.raises(ValueError, match="std > 0"):
        probe.fresh_windows(torch.zeros(2), torch.zeros(2), episodes=2)


# ------------------------------------------------------------------ SIGReg
def test_sigreg_heldout_separates_gaussian_from_collapsed():
    gen = torch.Generator().manual_seed(0)
    gaussian = torch.randn(400, 4, 16, generator=gen)
    collapsed = 0.01 * torch.randn(400, 4, 16, generator=gen) + 3.0
    episode = np.arange(400) // 2  # 200 episodes, 2 windows each
    g = probe.sigreg_heldout(gaussian, episode, batches=4, num_proj=64)
    c = probe.sigreg_heldout(collapsed, episode, batches=4, num_proj=64)
    assert g["batch_size"] == 128 and g["batches"] == 4
    assert g["value"] < 2.0 < 20 * g["value"] < c["value"], (g, c)
    small = probe.sigreg_heldout(gaussian[:10], episode[:10], batches=2, num_proj=8)
    assert small["batch_size"] == 5  # one window per episode
    with pytest.raises(ValueError, match="at least 2 episodes"):
        probe.sigreg_heldout(gaussian[:2], np.zeros(2), num_proj=8)


# ------------------------------------------------------------------ run_probes
def test_run_probes_on_a_small_random_model(dataset, model):
    model.train()
    out = probe.run_probes(
        model, dataset, seed=1, max_frames=200, fresh_episodes=6, max_steps=40, sigreg_batches=2
    )
    assert model.training and all(m.training for m in model.modules())  # flags restored
    json.dumps(out, allow_nan=False)  # plain, finite numbers
    assert set(out["probe_r2"]) == {"x", "y"} and all(v <= 1.0 for v in out["probe_r2"].values())
    assert out["one_step_mse"] > 0 and out["sigreg_heldout"] > 0
    assert out["fresh_rollouts"]["seed"] == probe.FRESH_SEED_OFFSET + 1
    assert out["fresh_rollouts"]["windows"] == out["one_step"]["windows"]
    assert set(out["seconds"]) == {"linear_probe", "fresh_rollouts", "one_step", "sigreg", "total"}
    again = probe.run_probes(
        model, dataset, seed=1, max_frames=200, fresh_episodes=6, max_steps=40, sigreg_batches=2
    )
    assert {k: again[k] for k in ("probe_r2", "one_step_mse", "sigreg_heldout")} == {
        k: out[k] for k in ("probe_r2", "one_step_mse", "sigreg_heldout")
    }


def test_run_probes_refuses_training_episodes_and_bad_models(dataset, model):
    with pytest.raises(ValueError, match="generated with"):
        probe.run_probes(model, dataset, rollout_seed=5)
    with pytest.raises(ValueError, match="frameskip"):
        probe.run_probes(model, dataset, frameskip=4)
    with pytest.raises(ValueError, match="nn.Module"):
        probe.run_probes(object(), dataset)


# ------------------------------------------------------------------ CLI
def test_cli_probe_writes_json(tmp_path, dataset, model, capsys):
    from lewm_fast import cli, save_pretrained

    save_pretrained(model, tmp_path / "ckpt")
    out = tmp_path / "probe.json"
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--dataset", str(dataset.path), "--device", "cpu"]
    args += ["--out", str(out), "--max-frames", "100", "--fresh-episodes", "4", "--seed", "2"]
    assert cli.main(["probe", *args]) == 0
    result = json.loads(out.read_text())
    assert set(result["probe_r2"]) == {"x", "y"} and result["one_step_mse"] > 0
    assert result["checkpoint"] == str(tmp_path / "ckpt") and result["fresh_rollouts"]["seed"] == 1_000_002
    assert "linear probe R^2" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="lewm-fast probe: .*generated with"):
        cli.main(["probe", *args, "--rollout-seed", "5"])
    with pytest.raises(SystemExit, match="checkpoint folder not found"):
        cli.main(["probe", "--checkpoint", str(tmp_path / "nope"), "--dataset", str(dataset.path)])


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
def test_run_probes_on_cuda_matches_cpu(dataset, model):
    """Frames are bit-identical on both devices and the fresh episodes too; the numbers agree
    up to float32 (and fused-kernel) rounding. TF32 is off: cuDNN's default TF32 patch
    convolution rounds its inputs to 10-bit mantissas (~5e-4), the size of the tolerances."""
    kwargs = {"seed": 0, "max_frames": 200, "fresh_episodes": 6, "max_steps": 40, "sigreg_batches": 2}
    cpu = probe.run_probes(model.cpu(), dataset, device="cpu", **kwargs)
    gpu = probe.run_probes(model, dataset, device="cuda", **kwargs)
    model.cpu()
    assert gpu["device"].startswith("cuda")
    assert gpu["fresh_rollouts"] == cpu["fresh_rollouts"]
    assert gpu["one_step_mse"] == pytest.approx(cpu["one_step_mse"], rel=1e-3)
    assert gpu["sigreg_heldout"] == pytest.approx(cpu["sigreg_heldout"], rel=1e-3)
    for c in ("x", "y"):
        assert gpu["probe_r2"][c] == pytest.approx(cpu["probe_r2"][c], abs=1e-3)
