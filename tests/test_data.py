"""Dataset generation, the on-disk format, atomic writes, corrupt files, HDF5 import/export."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lewm_fast.data import TwoRoomDataset, export_hdf5, generate_dataset, import_hdf5
from lewm_fast.data.dataset import DatasetWriter
from lewm_fast.envs import NoisyExpert, distance, render, step
from lewm_fast.envs.two_room import TwoRoomLayout, episode_generator, sample_start_goal

COLUMNS = ("episode_idx", "step_idx", "proprio", "goal", "action", "ep_len", "ep_offset")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """40 expert episodes, frames rendered from state."""
    root = tmp_path_factory.mktemp("data")
    return generate_dataset(root / "small", episodes=40, seed=5, progress=False)


@pytest.fixture(scope="module")
def framed(tmp_path_factory):
    """6 expert episodes with frames stored in shards of 100."""
    root = tmp_path_factory.mktemp("framed")
    return generate_dataset(
        root / "framed", episodes=6, seed=8, frames=True, shard_frames=100, progress=False
    )


def _same(a, b):
    for name in COLUMNS:
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        if x.shape != y.shape or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            return False
    return True


def test_generation_is_deterministic_by_seed(tmp_path, small):
    again = generate_dataset(tmp_path / "a", episodes=40, seed=5, batch_episodes=7, progress=False)
    assert _same(small, again)
    other = generate_dataset(tmp_path / "b", episodes=40, seed=6, progress=False)
    assert not np.array_equal(other.proprio[:50], small.proprio[:50])
    prefix = generate_dataset(tmp_path / "c", episodes=10, seed=5, progress=False)
    n = int(prefix.num_rows)
    assert np.array_equal(prefix.proprio, small.proprio[:n]) and prefix.source["seed"] == 5


def test_generation_does_not_depend_on_the_sqrt(tmp_path, small, faithful_sqrt):
    """Episodes roll out alike under a torch.sqrt off by an ulp, as under CUDA's exact one."""
    data = generate_dataset(tmp_path / "d", episodes=10, seed=5, progress=False)
    n = int(data.num_rows)
    assert np.array_equal(data.proprio, small.proprio[:n])
    assert np.array_equal(data.action, small.action[:n], equal_nan=True)


def test_episodes_replay_through_step_and_end_at_success(small):
    assert small.num_episodes == 40 and not small.has_frames
    proprio, action, goal = (
        torch.from_numpy(np.array(getattr(small, k))) for k in ("proprio", "action", "goal")
    )
    lengths = small.ep_len
    last = small.ep_offset + lengths - 1
    assert torch.isnan(action[last]).all()
    inner = np.setdiff1d(np.arange(small.num_rows), last)
    assert torch.isfinite(action[inner]).all() and action[inner].abs().max() <= 1
    # every stored transition is exactly one step of the dynamics
    assert torch.equal(step(proprio[inner], action[inner]), proprio[inner + 1])
    dist = distance(proprio, goal)
    for e in range(small.num_episodes):
        rows = slice(int(small.ep_offset[e]) + 1, int(last[e]))
        assert (dist[rows] >= 16).all()  # no earlier success
        assert dist[last[e]] < 16 or lengths[e] == 101
    assert (lengths < 101).sum() > 10 and (lengths == 101).sum() > 0
    # episode 3 starts where its seeded stream says
    start, target = sample_start_goal(episode_generator(5, 3))
    row = int(small.ep_offset[3])
    assert proprio[row].tolist() == start.tolist() and goal[row].tolist() == target.tolist()
    # and its first action is the expert's with that stream's noise
    gen = episode_generator(5, 3)
    sample_start_goal(gen)
    noise = NoisyExpert().draw(100, gen)
    want = NoisyExpert()(proprio[row : row + 1], goal[row : row + 1], noise[:1])
    assert torch.equal(action[row : row + 1], want)


def test_stored_frames_are_rendered_state(framed, small):
    rows = np.array([0, 99, 100, 101, framed.num_rows - 1])
    frames = framed.read_frames(rows)
    assert frames.shape == (5, 224, 224, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, render(torch.from_numpy(framed.proprio[rows].copy())).numpy())
    shards = sorted(p.name for p in (framed.path / "pixels").iterdir())
    assert len(shards) == -(-framed.num_rows // 100) and shards[0] == "shard_00000.npy"
    with pytest.raises(ValueError, match="stores no frames"):
        small.read_frames([0])


def test_random_policy_dataset(tmp_path):
    data = generate_dataset(
        tmp_path / "r", episodes=12, policy="random", seed=1, max_steps=30, progress=False
    )
    assert data.source["policy"] == "random" and data.ep_len.max() <= 31
    valid = ~np.isnan(data.action).any(axis=1)
    assert data.action[valid].min() >= -1 and data.action[valid].max() < 1


def test_no_overwrite_without_force(tmp_path, small):
    target = tmp_path / "d"
    generate_dataset(target, episodes=3, seed=1, progress=False)
    with pytest.raises(FileExistsError, match="force"):
        generate_dataset(target, episodes=3, seed=2, progress=False)
    assert TwoRoomDataset.open(target).source["seed"] == 1
    generate_dataset(target, episodes=4, seed=2, progress=False, force=True)
    assert TwoRoomDataset.open(target).num_episodes == 4
    (tmp_path / "file").write_text("precious")
    with pytest.raises(FileExistsError, match="not a lewm_fast dataset"):
        generate_dataset(tmp_path / "file", episodes=2, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "file"]  # no temporary folders left


def test_interrupted_write_leaves_nothing_loadable(tmp_path, monkeypatch):
    import lewm_fast.data.generate as gen

    calls = []

    def failing_rollout(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    real = gen.rollout
    monkeypatch.setattr(gen, "rollout", failing_rollout)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "x", episodes=20, batch_episodes=10, frames=True, progress=False)
    assert list(tmp_path.iterdir()) == []
    # a hard kill skips the cleanup: the half-written temporary folder is not a dataset
    writer = DatasetWriter(tmp_path / "y")
    writer.add_frames(np.zeros((3, 224, 224, 3), np.uint8))
    with pytest.raises(FileNotFoundError):
        TwoRoomDataset.open(tmp_path / "y")
    with pytest.raises(ValueError, match="meta.json is missing"):
        TwoRoomDataset.open(writer.tmp)


def _copy(small, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(small.path, target)
    return target


def _rewrite(path, name, array):
    np.save(path / f"{name}.npy", array)


CORRUPTIONS = [  # (id, damage(folder, dataset), expected message pieces)
    (
        "truncated-column",
        lambda p, d: _truncate(p / "proprio.npy", 100),
        ["proprio.npy", "'proprio'", "cannot be read"],
    ),
    ("garbage-header", lambda p, d: (p / "action.npy").write_bytes(b"not numpy"), ["action.npy", "'action'"]),
    ("missing-column", lambda p, d: (p / "step_idx.npy").unlink(), ["step_idx.npy", "'step_idx'", "missing"]),
    (
        "wrong-width",
        lambda p, d: _rewrite(p, "goal", np.zeros((d.num_rows, 3), np.float32)),
        ["goal.npy", "'goal'", "shape (rows, 2)"],
    ),
    (
        "wrong-rows",
        lambda p, d: _rewrite(p, "action", np.zeros((5, 2), np.float32)),
        ["action.npy", "'action'", "expected"],
    ),
    (
        "wrong-dtype",
        lambda p, d: _rewrite(p, "episode_idx", d.episode_idx.astype(np.float32)),
        ["episode_idx.npy", "dtype int32"],
    ),
    (
        "nan-position",
        lambda p, d: _poke(p, "proprio", 7, [np.nan, 3.0]),
        ["proprio.npy", "'proprio'", "row 7"],
    ),
    ("off-canvas", lambda p, d: _poke(p, "goal", 2, [230.0, 3.0]), ["goal.npy", "'goal'", "row 2"]),
    (
        "action-out-of-range",
        lambda p, d: _poke(p, "action", 4, [1.5, 0.0]),
        ["action.npy", "'action'", "[-1, 1]", "row 4"],
    ),
    ("half-nan-action", lambda p, d: _poke(p, "action", 4, [np.nan, 0.0]), ["action.npy", "row 4"]),
    ("bad-offsets", lambda p, d: _poke(p, "ep_offset", 2, 5), ["ep_offset.npy", "'ep_offset'", "episode 2"]),
    ("bad-step-idx", lambda p, d: _poke(p, "step_idx", 3, 9), ["step_idx.npy", "'step_idx'", "row 3"]),
    ("truncated-meta", lambda p, d: _truncate(p / "meta.json", 40), ["meta.json", "cannot read"]),
    (
        "truncated-shard",
        lambda p, d: _truncate(p / "pixels" / "shard_00001.npy", 100_000),
        ["shard_00001.npy", "'pixels'"],
    ),
    (
        "missing-shard",
        lambda p, d: (p / "pixels" / "shard_00002.npy").unlink(),
        ["shard_00002.npy", "'pixels'"],
    ),
]


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _poke(path, name, index, value):
    array = np.load(path / f"{name}.npy")
    array[index] = value
    np.save(path / f"{name}.npy", array)


@pytest.mark.parametrize("damage, pieces", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_datasets_raise_naming_file_and_column(framed, tmp_path, damage, pieces):
    folder = _copy(framed, tmp_path)
    TwoRoomDataset.open(folder)  # intact copy opens
    damage(folder, framed)
    with pytest.raises(ValueError) as info:
        TwoRoomDataset.open(folder)
    message = str(info.value)
    for piece in pieces:
        assert piece in message, message


def test_unknown_format_version(small, tmp_path):
    folder = _copy(small, tmp_path)  # no frames: a small copy
    meta = json.loads((folder / "meta.json").read_text())
    meta["version"] = 99
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99"):
        TwoRoomDataset.open(folder)


@pytest.fixture
def h5py():
    return pytest.importorskip("h5py")


def test_hdf5_round_trip(framed, tmp_path, h5py):
    small = framed
    path = export_hdf5(small, tmp_path / "two_room.h5")
    with h5py.File(path, "r") as f:
        assert {
            "pixels",
            "action",
            "proprio",
            "episode_idx",
            "step_idx",
            "ep_len",
            "ep_offset",
            "goal",
        } <= set(f)
        assert f["pixels"].shape == (small.num_rows, 224, 224, 3) and f["pixels"].dtype == np.uint8
    dropped = import_hdf5(path, tmp_path / "dropped")
    assert _same(dropped, small) and not dropped.has_frames
    assert dropped.source["verify"]["mismatched_bytes"] == 0
    dynamics = dropped.source["dynamics"]
    assert dynamics["transitions"] == small.num_rows - small.num_episodes
    assert dynamics["mismatched"] == 0 and dynamics["first_row"] is None and dynamics["max_error_px"] == 0
    kept = import_hdf5(path, tmp_path / "kept", pixels="keep", shard_frames=150)
    assert _same(kept, small) and kept.has_frames
    rows = np.arange(0, small.num_rows, 37)
    assert np.array_equal(kept.read_frames(rows), small.read_frames(rows))
    with pytest.raises(FileExistsError):
        export_hdf5(small, path)
    with pytest.raises(FileExistsError):
        import_hdf5(path, tmp_path / "kept")


def test_hdf5_published_variants(framed, tmp_path, h5py):
    """ep_idx instead of episode_idx, channels-first pixels, no goal column, rendered pixels."""
    small = framed
    path = tmp_path / "published.h5"
    with h5py.File(path, "w") as f:
        f["ep_idx"] = small.episode_idx.astype(np.int64)
        for name in ("step_idx", "ep_len", "ep_offset"):
            f[name] = np.asarray(getattr(small, name)).astype(np.int64)
        f["proprio"] = small.proprio.astype(np.float64)
        f["action"] = small.action.astype(np.float64)
        f["pixels"] = small.read_frames(np.arange(small.num_rows)).transpose(0, 3, 1, 2)
    data = import_hdf5(path, tmp_path / "out", pixels="keep")
    assert data.goal is None and np.array_equal(data.proprio, small.proprio)
    assert np.array_equal(data.read_frames([5, 77]), small.read_frames([5, 77]))
    rendered = export_hdf5(TwoRoomDataset.open(tmp_path / "out"), tmp_path / "again.h5", compression=None)
    again = import_hdf5(rendered, tmp_path / "again")
    assert again.source["verify"]["max_abs_diff"] == 0


def test_hdf5_errors_name_file_and_column(framed, tmp_path, h5py):
    small = framed
    good = export_hdf5(small, tmp_path / "good.h5", pixels=False)

    def variant(name, edit):
        path = tmp_path / name
        shutil.copy(good, path)
        with h5py.File(path, "r+") as f:
            edit(f)
        return path

    def replace(f, key, value):
        del f[key]
        f[key] = value

    cases = [
        (
            variant("w.h5", lambda f: replace(f, "proprio", np.zeros((small.num_rows, 3)))),
            ["w.h5", "'proprio'", "(rows, 2)"],
        ),
        (variant("m.h5", lambda f: f.__delitem__("ep_len")), ["m.h5", "'ep_len'", "missing"]),
        (variant("e.h5", lambda f: f.__delitem__("episode_idx")), ["e.h5", "'episode_idx' or 'ep_idx'"]),
        (
            variant("t.h5", lambda f: replace(f, "step_idx", np.zeros(small.num_rows))),
            ["t.h5", "'step_idx'", "integers"],
        ),
        (
            variant(
                "p.h5",
                lambda f: f.create_dataset("pixels", data=np.zeros((small.num_rows, 8, 8, 3), np.uint8)),
            ),
            ["p.h5", "'pixels'"],
        ),
        (
            variant(
                "x.h5",
                lambda f: f.create_dataset("pixels", data=255 - small.read_frames(np.arange(small.num_rows))),
            ),
            ["x.h5", "'pixels'", "does not match"],
        ),
    ]
    for path, pieces in cases:
        with pytest.raises(ValueError) as info:
            import_hdf5(path, tmp_path / "never")
        for piece in pieces:
            assert piece in str(info.value), str(info.value)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.h5"):
        import_hdf5(truncated, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_core_imports_without_optional_extras():
    code = (
        "import sys; sys.modules['gymnasium'] = None; sys.modules['h5py'] = None\n"
        "import lewm_fast, lewm_fast.envs, lewm_fast.data\n"
        "try:\n"
        "    lewm_fast.data.import_hdf5('x.h5', 'out')\n"
        "except ImportError as exc:\n"
        "    assert 'lewm-fast[hdf5]' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('import_hdf5 ran without h5py')\n"
        "try:\n"
        "    import lewm_fast.envs.gym\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
def test_generation_is_identical_on_cpu_and_cuda(tmp_path, small):
    gpu = generate_dataset(tmp_path / "gpu", episodes=40, seed=5, device="cuda", frames=True, progress=False)
    assert _same(gpu, small)
    rows = np.arange(0, gpu.num_rows, 11)
    assert np.array_equal(gpu.read_frames(rows), render(torch.from_numpy(small.proprio[rows].copy())).numpy())


def test_hdf5_layout_from_file(tmp_path, h5py):
    layout = TwoRoomLayout(speed=4.0)
    data = generate_dataset(tmp_path / "slow", episodes=3, seed=2, layout=layout, progress=False)
    path = export_hdf5(data, tmp_path / "slow.h5", pixels=False)
    back = import_hdf5(path, tmp_path / "back")
    assert back.layout == layout and back.source["layout_from"] == "file"
    given = import_hdf5(path, tmp_path / "given", layout=layout)
    assert given.source["layout_from"] == "argument"
    with h5py.File(path, "r+") as f:
        del f.attrs["layout"]
    with pytest.raises(
        ValueError, match=r"slow\.h5: column 'action'.*the published layout \(the file records none"
    ):
        import_hdf5(path, tmp_path / "plain")
    plain = import_hdf5(path, tmp_path / "plain", on_bad_dynamics="record")
    assert plain.layout == TwoRoomLayout() and plain.source["layout_from"] == "default"
    assert plain.source["dynamics"]["fraction"] > 0.5
    with h5py.File(path, "r+") as f:
        f.attrs["layout"] = json.dumps({"speed": 4.0, "doors": 2})
    with pytest.raises(ValueError, match=r"slow\.h5: attribute 'layout'.*doors"):
        import_hdf5(path, tmp_path / "never")


def _with_action(good, path, action, h5py):
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        f["action"][...] = action
    return path


def _disagrees(data, row, action):
    """The transition of ``row`` under ``action`` misses the next stored position by more than 1e-3 px."""
    p = torch.from_numpy(np.array(data.proprio[row : row + 2]))
    moved = step(p[:1], torch.from_numpy(np.array(action[row : row + 1])))
    return bool((moved - p[1:]).abs().max() > 1e-3)


def test_hdf5_shifted_action_is_refused(small, tmp_path, h5py):
    good = export_hdf5(small, tmp_path / "good.h5", pixels=False)
    action = np.array(small.action)
    late = np.vstack([np.full((1, 2), np.nan, np.float32), action[:-1]])  # the action that led to the row
    with pytest.raises(ValueError) as info:
        import_hdf5(_with_action(good, tmp_path / "late.h5", late, h5py), tmp_path / "never")
    for piece in ("late.h5", "column 'action'", "first bad row 0 (episode 0, step 0)", "action[0] is NaN"):
        assert piece in str(info.value), str(info.value)

    k = int(small.ep_offset[5]) + 5  # from row k + 1 on, every row holds the previous row's action
    shifted = action.copy()
    shifted[k + 1 :] = action[k:-1]
    assert int(small.ep_len[5]) > 7 and _disagrees(small, k + 1, shifted)
    path = _with_action(good, tmp_path / "shifted.h5", shifted, h5py)
    with pytest.raises(ValueError) as info:
        import_hdf5(path, tmp_path / "never")
    for piece in (
        "shifted.h5",
        "column 'action'",
        f"first bad row {k + 1} (episode 5, step 6)",
        f"proprio[{k + 2}]",
    ):
        assert piece in str(info.value), str(info.value)
    assert not (tmp_path / "never").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    kept = import_hdf5(path, tmp_path / "kept", on_bad_dynamics="record")
    dynamics = json.loads((tmp_path / "kept" / "meta.json").read_text())["source"]["dynamics"]
    inner = np.setdiff1d(np.arange(small.num_rows), small.ep_offset + small.ep_len - 1)
    p = torch.from_numpy(np.array(small.proprio))
    a = torch.from_numpy(shifted[inner])
    nan = torch.isnan(a).any(dim=1)
    miss = (step(p[inner], torch.nan_to_num(a)) - p[inner + 1]).abs().amax(dim=1) > 1e-3
    want = int((nan | miss).sum())
    assert dynamics["mismatched"] == want and dynamics["first_row"] == k + 1
    assert dynamics["transitions"] == inner.size and dynamics["fraction"] == pytest.approx(want / inner.size)
    assert dynamics["fraction"] > 0.01 and _same(kept, TwoRoomDataset.open(tmp_path / "kept"))
    assert np.array_equal(kept.action, shifted, equal_nan=True)


def test_hdf5_few_bad_transitions_import_with_their_count(small, tmp_path, h5py):
    good = export_hdf5(small, tmp_path / "good.h5", pixels=False)
    action = np.array(small.action)
    rows = [int(small.ep_offset[e]) + 2 for e in (4, 9, 30)]
    action[rows] = -action[rows]
    assert all(small.ep_len[e] > 3 for e in (4, 9, 30)) and all(_disagrees(small, r, action) for r in rows)
    assert len(rows) < 0.01 * (small.num_rows - small.num_episodes)
    data = import_hdf5(_with_action(good, tmp_path / "few.h5", action, h5py), tmp_path / "few")
    dynamics = data.source["dynamics"]
    assert dynamics["mismatched"] == 3 and dynamics["first_row"] == rows[0]
    assert dynamics["max_error_px"] > 1e-3 and dynamics["tolerance_px"] == 1e-3
    with pytest.raises(ValueError, match="on_bad_dynamics must be"):
        import_hdf5(good, tmp_path / "x", on_bad_dynamics="ignore")


def test_hdf5_pixel_differences_are_counted(framed, tmp_path, h5py):
    """One grey level off on one pixel per frame (two channels): counted as 1 pixel, 2 bytes per frame."""
    path = export_hdf5(framed, tmp_path / "off.h5", compression=None)
    with h5py.File(path, "r+") as f:
        f["pixels"][:, 100, 50, 1:] ^= np.uint8(1)
    data = import_hdf5(path, tmp_path / "off", verify_frames=10)
    verify = data.source["verify"]
    assert verify["frames"] == 10 and verify["max_abs_diff"] == 1
    assert verify["mismatched_pixels"] == 10 and verify["mismatched_bytes"] == 20
    assert verify["mismatched_pixel_fraction"] == pytest.approx(1 / 224**2)
