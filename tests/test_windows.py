"""Training windows (spec section 5): indexing, actions, normalisation, split, stored == rendered."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lewm_fast.data import (
    ModelFrames,
    TrainingWindows,
    generate_dataset,
    normalize_frames,
    window_rows,
    window_starts,
)
from lewm_fast.envs import DEFAULT_LAYOUT, render

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows")
    return generate_dataset(root / "d", episodes=10, seed=13, frames=True, progress=False)


@pytest.fixture(scope="module")
def windows(data):
    return TrainingWindows(data)


def _nan_equal(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_window_index(data, windows):
    lengths = data.ep_len
    assert len(windows) == int(np.maximum(lengths - 19, 0).sum())
    starts = windows.starts.numpy()
    episode = data.episode_idx[starts]
    assert (data.episode_idx[starts + 19] == episode).all()  # a window never crosses episodes
    last = data.ep_offset + lengths - 1
    ends = starts + 19
    assert np.isin(last[lengths >= 20], ends).all()  # the last window of an episode ends on its last row
    assert (np.diff(starts)[np.diff(episode) == 0] == 1).all()


def test_window_starts_and_rows_by_hand():
    """Episodes of 3, 0, 5 and 4 rows, windows of 4 rows: 0 + 0 + 2 + 1 windows."""
    starts, episode = window_starts(np.array([3, 0, 5, 4]), 4)
    assert starts.tolist() == [3, 4, 8] and episode.tolist() == [2, 2, 3]
    starts, episode = window_starts(torch.tensor([5, 4]), 4, ep_offset=torch.tensor([10, 20]))
    assert starts.tolist() == [10, 11, 20] and episode.tolist() == [0, 0, 1]
    assert window_starts(np.array([2, 3]), 4)[0].numel() == 0
    frames, actions = window_rows(torch.tensor([10, 20]), 2, 3)
    assert frames.tolist() == [[10, 13], [20, 23]]
    assert actions.tolist() == [list(range(10, 16)), list(range(20, 26))]


def test_split_is_random_split_with_seed_3072(windows):
    n = len(windows)
    train, val = windows.train_ids, windows.val_ids
    assert len(train) + len(val) == n and abs(len(val) - 0.1 * n) <= 1
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(n))
    a, b = torch.utils.data.random_split(range(n), [0.9, 0.1], generator=torch.Generator().manual_seed(3072))
    assert train.tolist() == list(a.indices) and val.tolist() == list(b.indices)
    other = TrainingWindows(windows.dataset, split_seed=1)
    assert not torch.equal(other.train_ids, train)


def test_batch_shapes_and_contents(data, windows):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(len(windows), (6,), generator=gen)
    batch = windows.batch(ids)
    assert batch["pixels"].shape == (6, 4, 3, 224, 224) and batch["pixels"].dtype == torch.float32
    assert batch["action"].shape == (6, 4, 10) and batch["proprio"].shape == (6, 4, 2)
    assert batch["goal"].shape == (6, 2) and torch.equal(batch["ids"], ids)
    starts = windows.starts[ids].numpy()
    # frames t, t+5, t+10, t+15 with ImageNet normalisation, channels first
    rows = starts[:, None] + 5 * np.arange(4)
    frames = render(torch.from_numpy(data.proprio[rows.reshape(-1)].copy()))
    back = (batch["pixels"].reshape(-1, 3, 224, 224) * STD + MEAN) * 255
    assert (back - frames.permute(0, 3, 1, 2).float()).abs().max() < 1e-3
    assert torch.equal(batch["proprio"].reshape(-1, 2), torch.from_numpy(data.proprio[rows.reshape(-1)]))
    # actions: 5 raw actions per frame, concatenated, z-scored with NaN rows excluded
    raw = data.action.astype(np.float64)
    valid = raw[~np.isnan(raw).any(axis=1)]
    mean, std = valid.mean(axis=0), valid.std(axis=0, ddof=0)
    want = ((raw[starts[:, None] + np.arange(20)] - mean) / std).reshape(6, 4, 10)
    got = batch["action"].double().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-5, atol=1e-5)
    block = raw[starts[0] + 5 : starts[0] + 10]  # frame 1 of window 0: raw actions t+5 .. t+9
    np.testing.assert_allclose(got[0, 1], ((block - mean) / std).reshape(10), rtol=1e-5)
    assert torch.equal(windows.action_mean, torch.from_numpy(mean.astype(np.float32)))


def test_nan_edges_only_at_episode_ends(data, windows):
    all_actions = windows.actions(torch.arange(len(windows)))
    nan = torch.isnan(all_actions)
    ends = windows.starts + 19
    last = torch.from_numpy(data.ep_offset + data.ep_len - 1)
    at_end = torch.isin(ends, last)
    assert torch.equal(nan.any(dim=(1, 2)), at_end) and at_end.sum() > 0
    assert nan[at_end][:, 3, 8:].all() and not nan[at_end][:, :, :8].any() and not nan[at_end][:, :3].any()


def test_stored_and_rendered_sources_are_identical(data, windows):
    stored = TrainingWindows(data, source="stored")
    ids = torch.cat([windows.val_ids[:5], torch.tensor([0, len(windows) - 1])])
    a, b = windows.batch(ids), stored.batch(ids)
    assert a.keys() == b.keys()
    for key in a:
        assert _nan_equal(a[key].float(), b[key].float()), key


def test_resize_to_model_image_size(data, windows):
    small = TrainingWindows(data, image_size=112)
    ids = torch.tensor([3, 1, 4])
    got = small.batch(ids)["pixels"]
    full = windows.batch(ids)["pixels"].reshape(-1, 3, 224, 224)
    want = F.interpolate(full, size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
    # rendered straight to model frames (ModelFrames): the resize's own filter, float32 rounding apart
    assert got.shape == (3, 4, 3, 112, 112)
    torch.testing.assert_close(got.reshape(-1, 3, 112, 112), want, rtol=0, atol=1e-5)
    stored = TrainingWindows(data, source="stored", image_size=112).batch(ids)["pixels"]
    assert torch.equal(stored.reshape(-1, 3, 112, 112), want)  # the uint8 path: normalise, then resize


# corners, the door's centre, both faces of the wall
EDGES = [[21, 21], [203, 203], [21, 203], [203, 21], [112, 49], [99.5, 60], [124.5, 30]]


@pytest.mark.parametrize("size", [224, 112, 64, 56, 33])
def test_model_frames_equal_render_then_normalize(size):
    """ModelFrames(layout, S)(xy) == normalize_frames(render(xy), S): bit-identical at 224, within
    float32 rounding after a resize; edges, corners, the wall and the door included."""
    gen = torch.Generator().manual_seed(size)
    xy = torch.cat([torch.rand(40, 2, generator=gen) * 182 + 21, torch.tensor(EDGES, dtype=torch.float32)])
    got = ModelFrames(DEFAULT_LAYOUT, size)(xy)
    want = normalize_frames(render(xy), size)
    assert got.shape == want.shape == (47, 3, size, size) and got.dtype == torch.float32
    if size == 224:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert ModelFrames(DEFAULT_LAYOUT, size)(xy[:0]).shape == (0, 3, size, size)
    with pytest.raises(ValueError, match="image_size"):
        ModelFrames(DEFAULT_LAYOUT, 0)


def test_normalize_frames():
    frames = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    out = normalize_frames(frames)
    assert out.shape == (2, 3, 5, 7)
    want = (frames.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize_frames(frames.float())


def test_batches_iterate_a_shuffled_epoch(windows):
    gen = torch.Generator().manual_seed(2)
    seen = [b["ids"] for b in windows.batches("val", batch_size=8, generator=gen)]
    assert all(len(ids) == 8 for ids in seen) and len(seen) == len(windows.val_ids) // 8
    flat = torch.cat(seen)
    assert len(set(flat.tolist())) == len(flat) and set(flat.tolist()) <= set(windows.val_ids.tolist())
    assert flat.tolist() != sorted(flat.tolist())
    every = torch.cat([b["ids"] for b in windows.batches("val", 8, shuffle=False, drop_last=False)])
    assert torch.equal(every, windows.val_ids)


def test_errors(data, tmp_path, windows):
    short = generate_dataset(tmp_path / "short", episodes=3, max_steps=10, progress=False)
    with pytest.raises(ValueError, match="20 rows"):
        TrainingWindows(short)
    no_frames = generate_dataset(tmp_path / "nf", episodes=3, progress=False)
    with pytest.raises(ValueError, match="stores no frames"):
        TrainingWindows(no_frames, source="stored")
    with pytest.raises(ValueError, match="window ids"):
        windows.batch(torch.tensor([len(windows)]))
    with pytest.raises(ValueError, match="source"):
        TrainingWindows(data, source="disk")
    with pytest.raises(ValueError, match="split"):
        next(windows.batches("test"))


@pytest.mark.gpu
def test_cuda_batches_equal_cpu_batches(data, windows):
    ids = torch.cat([windows.train_ids[:6], torch.tensor([len(windows) - 1])])
    for source in ("rendered", "stored"):
        gpu = TrainingWindows(data, source=source, device="cuda")
        assert torch.equal(gpu.train_ids.cpu(), windows.train_ids)
        a, b = windows.batch(ids), gpu.batch(ids.cuda())
        for key in a:
            assert _nan_equal(a[key].float(), b[key].float().cpu()), (source, key)


def test_action_stats_are_the_published_scaler_statistics():
    """Mean and population std (StandardScaler's) over the rows without NaN."""
    from lewm_fast.data import action_stats

    gen = np.random.default_rng(0)
    action = gen.normal(0.3, 2.0, size=(9, 2)).astype(np.float32)
    action[[2, 8]] = np.nan  # episode-final rows
    mean, std = action_stats(action)
    valid = np.delete(action, [2, 8], axis=0).astype(np.float64)
    np.testing.assert_allclose(mean, valid.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, np.sqrt(((valid - valid.mean(axis=0)) ** 2).sum(axis=0) / 7), rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        action_stats(action[1:3])  # one row left
    with pytest.raises(ValueError, match="zero variance"):
        action_stats(np.ones((4, 2), dtype=np.float32))


@pytest.fixture(scope="module")
def cheap(data):
    """The windows of ``data`` with blank 8x8 frames: batches cost nothing to build."""
    return TrainingWindows(
        data, source=lambda rows: torch.zeros((rows.shape[0], 8, 8, 3), dtype=torch.uint8), image_size=8
    )


def _ids(batches):
    return [b["ids"] for b in batches]


def test_batches_seed_gives_a_fixed_permutation_per_seed(cheap):
    """seed=s shuffles with torch.randperm from a generator on the device seeded with s."""
    perm = torch.randperm(len(cheap.train_ids), generator=torch.Generator().manual_seed(7))
    want = cheap.train_ids[perm][: len(perm) // 8 * 8].view(-1, 8)
    got = torch.stack(_ids(cheap.batches("train", 8, seed=7)))
    assert torch.equal(got, want)
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(torch.stack(_ids(cheap.batches("train", 8, generator=gen))), want)
    other = torch.stack(_ids(cheap.batches("train", 8, seed=8)))
    assert not torch.equal(other, want)
    assert len(set(other.flatten().tolist())) == other.numel() and set(other.flatten().tolist()) <= set(
        cheap.train_ids.tolist()
    )


def test_batches_start_resumes_the_epoch_exactly(cheap):
    whole = _ids(cheap.batches("train", 8, seed=3))
    for start in (1, 5, len(whole) - 1):
        rest = _ids(cheap.batches("train", 8, seed=3, start=start))
        assert len(rest) == len(whole) - start
        assert all(torch.equal(a, b) for a, b in zip(rest, whole[start:]))
    assert _ids(cheap.batches("train", 8, seed=3, start=len(whole))) == []


@pytest.mark.parametrize("world_size", [2, 4])
def test_batches_rank_slices_are_disjoint_and_cover_each_global_batch(cheap, world_size):
    whole = _ids(cheap.batches("train", 8, seed=5, start=2))
    shares = [
        _ids(cheap.batches("train", 8, seed=5, start=2, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert all(len(s) == len(whole) for s in shares)
    for i, batch in enumerate(whole):
        parts = [s[i] for s in shares]
        assert all(len(p) == 8 // world_size for p in parts)
        assert torch.equal(torch.cat(parts), batch)  # rank r holds the r-th contiguous slice
    flat = torch.cat([torch.cat(s) for s in shares]).tolist()
    assert len(set(flat)) == len(flat)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param({"batch_size": 0}, "batch_size must be a positive integer", id="batch-size"),
        pytest.param({"batch_size": 6, "world_size": 4}, "divisible by world_size", id="indivisible"),
        pytest.param({"rank": 2, "world_size": 2}, "0 <= rank < world_size", id="rank"),
        pytest.param({"start": -1}, "start must be an integer >= 0", id="start"),
        pytest.param({"seed": 1, "generator": torch.Generator()}, "not both", id="seed-and-generator"),
        pytest.param({"world_size": 2, "drop_last": False}, "drop_last=False", id="drop-last"),
    ],
)
def test_batches_refuses_bad_arguments(cheap, kwargs, match):
    kwargs = {"batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        next(cheap.batches("train", **kwargs))
