"""Two-Room data path: frames rendered per second, episodes rolled out, training windows delivered.

Rows (all on ``report.device``):
- ``render``: ``lewm_fast.envs.render`` on a batch of positions against the "reference", a
  frame-at-a-time full-canvas float32 renderer written like the published environment;
- ``rollout``: noisy-expert episodes of 100 steps rolled out together;
- ``windows``: batches of training windows (B, 4, 3, 224, 224) from frames stored on disk
  ("stored") and from frames rendered on the device from positions ("rendered").
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lewm_fast.data import TrainingWindows, generate_dataset
from lewm_fast.data.generate import draw_episodes, rollout
from lewm_fast.envs import DEFAULT_LAYOUT, NoisyExpert, layout_image, render

from .harness import Report, time_fn


def _published_style_render(agent_xy: torch.Tensor) -> torch.Tensor:
    """One frame at a time over the whole canvas, as the published environment draws it."""
    layout = DEFAULT_LAYOUT
    s = layout.size
    grid = torch.arange(s, dtype=torch.float32, device=agent_xy.device)
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    color = torch.tensor(layout.agent_color, dtype=torch.float32, device=agent_xy.device)
    frames = []
    for x, y in agent_xy.tolist():
        img = layout_image(layout, agent_xy.device).to(torch.float32)
        dot = torch.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2.0 * layout.radius**2))
        a = (dot / dot.max())[..., None]
        frames.append((img * (1.0 - a) + color * a).to(torch.uint8))
    return torch.stack(frames)


def run(report: Report, quick: bool) -> None:
    device = report.device
    gen = torch.Generator().manual_seed(0)
    reps = 3 if quick else 20

    n = 32 if quick else 512
    xy = (21 + 182 * torch.rand(n, 2, generator=gen)).to(device)
    background = layout_image(DEFAULT_LAYOUT, device)
    for impl, fn in (
        ("reference", lambda: _published_style_render(xy)),
        ("lewm_fast", lambda: render(xy, background=background, check=False)),
    ):
        t = time_fn(fn, device, warmup=2, reps=reps)
        report.add("data", f"render N={n}", impl, "full", t, **{"frames/s": n / (t.median_ms / 1e3)})

    episodes = 64 if quick else 1024
    policy = NoisyExpert()
    starts, goals, noise = draw_episodes(0, range(episodes), policy, 100)
    starts, goals, noise = starts.to(device), goals.to(device), noise.to(device)
    t = time_fn(lambda: rollout(starts, goals, noise, policy), device, warmup=1, reps=3 if quick else 10)
    steps = episodes * 100
    report.add(
        "data",
        f"rollout {episodes} episodes",
        "lewm_fast",
        "full",
        t,
        **{"episodes/s": episodes / (t.median_ms / 1e3), "env steps/s": steps / (t.median_ms / 1e3)},
    )

    batch = 16 if quick else 128
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_dataset(
            Path(tmp) / "bench", episodes=6 if quick else 60, seed=0, frames=True, progress=False
        )
        ids = None
        for impl in ("stored", "rendered"):
            windows = TrainingWindows(data, source=impl, device=device)
            if ids is None:  # the same windows from both sources
                ids = torch.randint(len(windows), (batch,), generator=gen).to(device)
            t = time_fn(lambda w=windows, i=ids: w.batch(i, check=False), device, warmup=2, reps=reps)
            report.add(
                "data",
                f"windows B={batch}",
                impl,
                "full",
                t,
                **{"windows/s": batch / (t.median_ms / 1e3), "frames/s": 4 * batch / (t.median_ms / 1e3)},
            )
