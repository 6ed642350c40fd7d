"""Episodes as pictures (lewm_fast.report.write_episode_pictures and the report's Episodes
section): the grid PNG and the step-by-step GIF drawn from an evaluation's episodes.npz,
which episodes are shown, the markdown that embeds them, and a missing library or file."""

import json
import sys

import numpy as np
from PIL import Image

from lewm_fast import report as rp
from lewm_fast._io import write_npz_atomic
from lewm_fast.envs import DEFAULT_LAYOUT
from lewm_fast.plan.evaluation import EPISODES_FORMAT

STEPS = 50
SUCCESS_STEP = 10


def _episodes_file(path, success, steps=STEPS, near=()):
    """An episodes.npz as evaluate writes it: episode b walks in a straight line from
    (40 + 2b, 150) towards its goal 60 px to the right (10 px for b in ``near``); a
    successful one stops at SUCCESS_STEP, a failed one ends 40 px short of 60."""
    n = len(success)
    start = np.stack([40.0 + 2 * np.arange(n), np.full(n, 150.0)], axis=1).astype(np.float32)
    goal = start + np.array([60.0, 0.0], np.float32)
    goal[list(near), 0] = start[list(near), 0] + 10.0
    t = np.arange(steps + 1, dtype=np.float32)
    xy = np.empty((n, steps + 1, 2), np.float32)
    for b, ok in enumerate(success):
        dx = np.minimum(t, SUCCESS_STEP) * 5.0 if ok else t * 20.0 / steps
        xy[b] = start[b] + np.stack([dx, np.zeros_like(dx)], axis=1)
    write_npz_atomic(
        path,
        {
            "format": np.array(EPISODES_FORMAT),
            "version": np.array(1),
            "layout": np.array(json.dumps(DEFAULT_LAYOUT.to_dict())),
            "row": np.arange(n, dtype=np.int64) * 7,
            "episode_idx": np.arange(n, dtype=np.int64),
            "start_xy": start,
            "goal_xy": goal,
            "xy": xy,
            "success": np.array(success, bool),
            "steps_to_success": np.where(success, SUCCESS_STEP, -1).astype(np.int64),
            "plan_actions": np.ones((n, 25, 2), np.float32),
            "plan_xy": xy[:, :26],
            "plan_cost": np.ones(n, np.float32),
            "steps_per_plan": np.array(25),
            "budget": np.array(steps),
        },
    )
    return path


def _near(pixel, rgb, tol=40):
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, rgb))


def _frames(path):
    with Image.open(path) as gif:
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB")))
        return frames, gif.info


# ------------------------------------------------------------------ which episodes


def test_pick_episodes_gives_failures_at_least_half_and_shows_both_outcomes():
    success = [True] * 10 + [False] + [True] * 10 + [False, False]  # failures 10, 21, 22
    assert rp.pick_episodes(success, 5) == [0, 1, 10, 21, 22]  # every failure, then successes
    assert rp.pick_episodes(success, 2) == [0, 10]  # one of each, the first in order
    assert rp.pick_episodes(success, 100) == list(range(23))
    assert rp.pick_episodes([True, True], 1) == [0]
    half = [b % 2 == 0 for b in range(50)]  # 25 of each: 13 failures, 12 successes
    assert rp.pick_episodes(half, 25) == sorted(list(range(1, 26, 2)) + list(range(0, 24, 2)))
    mostly_failed = [False] * 30 + [True] * 2  # the successes are shown, the failures fill up
    assert rp.pick_episodes(mostly_failed, 25) == list(range(23)) + [30, 31]
    assert rp.pick_episodes([False] * 3, 4) == [0, 1, 2]


# ------------------------------------------------------------------ the pictures


def test_grid_and_animation_are_written_from_the_episodes(tmp_path):
    success = [True] * 12 + [False] + [True] * 14 + [False] * 3  # 30 episodes, 4 failed
    facts_file = _episodes_file(tmp_path / "episodes.npz", success)
    written, skipped, facts = rp.write_episode_pictures(facts_file, tmp_path / "plots")
    assert written == {"grid": "episodes.png", "animation": "episodes.gif"} and skipped == {}
    assert facts["episodes"] == 30 and facts["successes"] == 26 and facts["env_steps"] == STEPS
    assert facts["start_within_success"] == 0
    assert facts["grid_episodes"] == list(range(22)) + [27, 28, 29]  # 4 failures, the first 21 successes
    assert facts["grid_words"] == "all 4 failed episodes and the first 21 of 26 successful episodes"
    assert facts["animated_episodes"] == [0, 1, 12, 27]  # 2 failures and 2 successes
    assert facts["animated_words"] == (
        "the first 2 of 4 failed episodes and the first 2 of 26 successful episodes"
    )

    with Image.open(tmp_path / "plots" / "episodes.png") as png:
        # 5 x 5 panels of 208 env px (+ 24 px title bands, 10 px gaps) at 1.1 px per env px,
        # 0.2 in of side margins, 0.9 in for the heading and the legend, 100 dpi
        assert png.format == "PNG" and png.size == (1208, 1410)
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    red = np.all(pixels == rp._RED, axis=1).sum()
    green = np.all(pixels == rp._GREEN, axis=1).sum()
    assert red > 1000 and green > 1000  # frames of 4 failed and 20 successful panels

    frames, info = _frames(tmp_path / "plots" / "episodes.gif")
    assert len(frames) == STEPS + 1 and info.get("loop") == 0
    s = DEFAULT_LAYOUT.size
    pw, ph = s + 2 * rp._GIF_BORDER, s + 2 * rp._GIF_BORDER + rp._GIF_LABEL
    assert frames[0].shape == (2 * ph + rp._GIF_GAP, 2 * pw + rp._GIF_GAP, 3)
    ep = np.load(facts_file)
    top = ph + rp._GIF_GAP  # episode 12 is the third panel: second row, first column
    for k in (0, STEPS // 2, STEPS):  # the red agent dot sits where the recorded path says
        x, y = ep["xy"][12, k]  # (3 px below its centre: the blue trail runs through it)
        dot = frames[k][top + int(y) + 3 + rp._GIF_LABEL + rp._GIF_BORDER, int(x) + rp._GIF_BORDER]
        assert _near(dot, (255, 0, 0)), (k, dot)
    failed, passed = (top + rp._GIF_LABEL + 1, 1), (rp._GIF_LABEL + 1, 1)  # inside the panels' frames
    assert _near(frames[0][failed], rp._GREY) and _near(frames[-1][failed], rp._RED)
    assert _near(frames[0][passed], rp._GREY) and _near(frames[-1][passed], rp._GREEN)


def test_a_successful_episode_turns_green_at_its_step(tmp_path):
    path = _episodes_file(tmp_path / "e.npz", [True, True])
    written, _, facts = rp.write_episode_pictures(path, tmp_path, grid=2, animated=1)
    assert facts["animated_episodes"] == [0] and facts["grid_words"] == "all 2 successful episodes"
    frames, _ = _frames(tmp_path / written["animation"])
    s = DEFAULT_LAYOUT.size
    assert frames[0].shape == (s + 2 * rp._GIF_BORDER + rp._GIF_LABEL, s + 2 * rp._GIF_BORDER, 3)
    corner = (rp._GIF_LABEL + 1, 1)
    assert _near(frames[SUCCESS_STEP - 1][corner], rp._GREY)
    assert all(_near(f[corner], rp._GREEN) for f in frames[SUCCESS_STEP:])
    with Image.open(tmp_path / written["grid"]) as png:
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    assert not np.all(pixels == rp._RED, axis=1).any()  # no failure frame when all succeeded


# ------------------------------------------------------------------ in the report


def test_report_embeds_the_pictures_with_a_caption(tmp_path):
    _episodes_file(tmp_path / "episodes.npz", [True, False, True], near=[2])
    out = rp.write_report(tmp_path, {}, stages_seconds=None, device_info="cpu", preset="p")
    part = out["episodes"]
    assert part["pictures"] == {"grid": "plots/episodes.png", "animation": "plots/episodes.gif"}
    assert part["successes"] == 2 and part["episodes"] == 3 and part["skipped"] == {}
    assert part["start_within_success"] == 1 and part["success_distance"] == 16.0
    assert json.loads((tmp_path / "report.json").read_text())["episodes"] == part
    md = (tmp_path / "report.md").read_text()
    assert "## Episodes" in md and "2 of 3 evaluated episodes reached the goal" in md
    assert "1 of the 3 start within the 16 px success radius of their goal" in md
    assert "![evaluated episodes](plots/episodes.png)" in md
    assert "![evaluated episodes, step by step](plots/episodes.gif)" in md
    assert "not what the model predicted" in md  # the caption says what the orange band is
    for file in part["pictures"].values():
        assert (tmp_path / file).is_file()
    assert not list((tmp_path / "plots").glob(".*tmp*"))


def test_report_names_a_missing_or_foreign_episodes_file(tmp_path):
    out = rp.write_report(tmp_path, {}, stages_seconds=None, device_info="cpu", preset="p")
    assert "episodes.npz not found" in out["episodes"]["missing"] and out["episodes"]["pictures"] == {}
    assert "No episode pictures:" in (tmp_path / "report.md").read_text()
    np.savez(tmp_path / "other.npz", xy=np.zeros(2))
    out = rp.write_report(
        tmp_path, {}, stages_seconds=None, device_info="cpu", preset="p", episodes=tmp_path / "other.npz"
    )
    assert "not an evaluation episodes file" in out["episodes"]["missing"]
    assert not (tmp_path / "plots" / "episodes.png").exists()


def _without(monkeypatch, *packages):
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)


def test_without_matplotlib_the_grid_is_skipped_and_the_animation_kept(tmp_path, monkeypatch):
    _episodes_file(tmp_path / "episodes.npz", [True, False])
    _without(monkeypatch, "matplotlib")
    out = rp.write_report(tmp_path, {}, stages_seconds=None, device_info="cpu", preset="p")
    part = out["episodes"]
    assert part["pictures"] == {"animation": "plots/episodes.gif"}
    assert "matplotlib is not installed" in part["skipped"]["grid"]
    md = (tmp_path / "report.md").read_text()
    assert "- episodes grid: skipped (matplotlib is not installed" in md
    assert "episodes.png" not in md and "![evaluated episodes, step by step](plots/episodes.gif)" in md


def test_without_pillow_or_matplotlib_the_report_is_still_written(tmp_path, monkeypatch):
    _episodes_file(tmp_path / "episodes.npz", [True, False])
    _without(monkeypatch, "matplotlib", "PIL")
    out = rp.write_report(tmp_path, {}, stages_seconds=None, device_info="cpu", preset="p")
    assert out["episodes"]["pictures"] == {} and set(out["episodes"]["skipped"]) == {"grid", "animation"}
    assert "Pillow is not installed" in out["episodes"]["skipped"]["animation"]
    md = (tmp_path / "report.md").read_text()
    assert "- episodes animation: skipped (Pillow is not installed" in md
    assert not (tmp_path / "plots").exists() or not list((tmp_path / "plots").iterdir())
