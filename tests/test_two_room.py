"""Two-Room: rendering against a per-pixel implementation, dynamics at every collision branch,
the batched env, input validation, and CPU == CUDA bit equality."""

import math

import numpy as np
import pytest
import torch

from lewm_fast.envs import DEFAULT_LAYOUT, TwoRoom, TwoRoomLayout, distance, layout_image, render, step
from lewm_fast.envs.policies import NoisyExpert
from lewm_fast.envs.two_room import episode_generator, exp_neg, sample_start_goal, sqrt_rn

F32 = np.float32


def per_pixel_frame(ax: float, ay: float) -> np.ndarray:
    """Spec section 4 written out pixel by pixel: float64 Gaussian, float32 blend, truncation."""
    ax, ay = float(F32(ax)), float(F32(ay))  # positions are float32 state
    image = np.empty((224, 224, 3), dtype=np.uint8)
    gauss = [
        [math.exp(-((x - ax) ** 2 + (y - ay) ** 2) / (2 * 7.0**2)) for x in range(224)] for y in range(224)
    ]
    peak = max(max(row) for row in gauss)
    red = (F32(255), F32(0), F32(0))
    one = F32(1)
    for y in range(224):
        for x in range(224):
            wall = (107 <= x <= 117 and not 35 <= y <= 63) or x in range(10, 14) or x in range(210, 214)
            wall = wall or y in range(10, 14) or y in range(210, 214)
            base = F32(0) if wall else F32(255)
            a = F32(gauss[y][x] / peak)
            for c in range(3):
                image[y, x, c] = int(base * (one - a) + red[c] * a)
    return image


def _positions(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random positions on the canvas, biased towards walls, borders, the door and corners."""
    anchors = torch.tensor(
        [
            [112.0, 49.0],
            [100.0, 35.0],
            [124.0, 63.0],
            [12.0, 12.0],
            [211.0, 211.0],
            [0.0, 223.0],
            [105.0, 150.0],
        ]
    )
    near = anchors[torch.randint(len(anchors), (n,), generator=gen)] + 6 * torch.randn(n, 2, generator=gen)
    return near.clamp(0, 223)


def test_exp_neg_is_within_one_ulp():
    gen = torch.Generator().manual_seed(1)
    t = torch.cat(
        [torch.rand(20000, generator=gen, dtype=torch.float64) * 40, torch.tensor([0.0, 1e-300, 40.0])]
    )
    got = exp_neg(t).numpy()
    want = np.array([math.exp(-v) for v in t.tolist()])
    assert (np.abs(got - want) <= np.spacing(want)).all()
    assert got[-3] == 1.0
    with pytest.raises(ValueError, match="float64"):
        exp_neg(t.float())


def _sqrt_inputs() -> torch.Tensor:
    """float32 squares over many binades, binade edges, 0, subnormals, the largest float, inf."""
    gen = torch.Generator().manual_seed(2)
    mantissa = 1 + torch.rand(50_000, generator=gen)
    exponent = torch.randint(-140, 127, (50_000,), generator=gen).float()
    q = torch.ldexp(mantissa, exponent).float()
    edges = torch.tensor([0.0, 1e-45, 1e-40, 1.0, 2.0, 4.0, 256.0, 255.99998, 3.4028235e38, math.inf])
    near = torch.nextafter(edges[3:9], torch.zeros(6))
    return torch.cat([q, edges, near, torch.rand(50_000, generator=gen) * 100_000])


def test_sqrt_rn_is_correctly_rounded(faithful_sqrt):
    """Equal to the IEEE sqrt (numpy's sqrtps) everywhere, even over a torch.sqrt off by an ulp."""
    q = _sqrt_inputs()
    want = np.sqrt(q.numpy())
    assert np.array_equal(sqrt_rn(q).numpy(), want)
    assert not np.array_equal(torch.sqrt(q).numpy(), want)  # the fixture's sqrt is faithful only
    with pytest.raises(ValueError, match="float32"):
        sqrt_rn(q.double())


def test_distance_and_policy_do_not_depend_on_the_sqrt(faithful_sqrt):
    """distance and the expert's actions use sqrt_rn: the same bits whatever torch.sqrt rounds to
    (CUDA's sqrt is correctly rounded, the CPU's MKL one is not)."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(20_000, 2, generator=gen) * 223, _positions(20_000, gen)
    d = (a - b).numpy()
    want = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])  # float32 products and sum, IEEE root
    assert np.array_equal(distance(a, b).numpy(), want)
    policy, noise = NoisyExpert(), torch.zeros(20_000, 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "sqrt", faithful_sqrt)  # the fixture returns the real torch.sqrt
        exact = policy(a, b, noise)
    assert torch.equal(policy(a, b, noise), exact)


def test_layout_image_matches_the_published_scene():
    img = layout_image().numpy()
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    black, white = np.zeros(3), np.full(3, 255)
    for col in (107, 112, 117):
        assert (img[14:35, col] == black).all() and (img[64:210, col] == black).all()
        assert (img[35:64, col] == white).all()  # the door
    for col in (106, 118):
        assert (img[35:64, col] == white).all() and (img[100, col] == white).all()
    for k in (10, 13, 210, 213):
        assert (img[k, :] == black).all() and (img[:, k] == black).all()
    for k in (9, 14, 209, 214):
        assert (img[k, 50] == white).all() and (img[50, k] == white).all()


def test_render_matches_per_pixel_implementation():
    gen = torch.Generator().manual_seed(7)
    xy = torch.cat(
        [
            _positions(4, gen),
            torch.rand(2, 2, generator=gen) * 223,
            torch.tensor([[112.0, 49.0], [0.0, 0.0], [223.0, 100.5]]),
        ]
    )
    frames = render(xy)
    assert frames.shape == (len(xy), 224, 224, 3) and frames.dtype == torch.uint8
    for i, (x, y) in enumerate(xy.tolist()):
        want = per_pixel_frame(x, y)
        got = frames[i].numpy()
        bad = np.argwhere(got != want)
        assert bad.size == 0, f"agent at ({x}, {y}): {len(bad)} bytes differ, first at {bad[:3].tolist()}"


def test_render_dot_shape():
    xy = torch.tensor([[60.0, 150.0], [60.25, 150.5]])
    frames = render(xy).numpy().astype(int)
    assert frames[0, 150, 60].tolist() == [255, 0, 0]  # peak: alpha exactly 1
    assert frames[1, 150, 60].tolist() == [255, 0, 0] or frames[1, 151, 60].tolist() == [255, 0, 0]
    row = frames[0, 150, :, 1]  # green falls off symmetrically around the centre
    assert (row[60 - 20 : 60] == row[61 : 60 + 21][::-1]).all()
    assert row[60] < row[55] < row[50] < row[45] < 255
    assert frames[0, 150 - 47, 60].tolist() == [255, 255, 255]  # beyond the dot's reach
    # the goal image is the agent drawn at the goal
    env = TwoRoom(2)
    env.reset(agent_xy=xy.flip(0), goal_xy=xy)
    assert torch.equal(env.render_goal(), render(xy)) and torch.equal(env.render(), render(xy.flip(0)))


def _vectorised_frame(layout: TwoRoomLayout, ax: float, ay: float) -> np.ndarray:
    """The same formula for any layout, whole canvas at once (numpy float64 exp)."""
    grid = np.arange(layout.size, dtype=np.float64)
    ax, ay = float(F32(ax)), float(F32(ay))
    g = np.exp(-((grid[None, :] - ax) ** 2 + (grid[:, None] - ay) ** 2) / (2 * layout.radius**2))
    a = (g / g.max()).astype(F32)[..., None]
    base = layout_image(layout).numpy().astype(F32)
    return (base * (F32(1) - a) + np.array(layout.agent_color, F32) * a).astype(np.uint8)


LAYOUTS = [  # (id, layout): other radii (crop sizes, whole-canvas crop) and colours
    ("r3-colours", TwoRoomLayout(radius=3.0, agent_color=(10, 200, 30), background=(250, 240, 230))),
    ("r20-whole-canvas", TwoRoomLayout(radius=20.0, wall_color=(90, 90, 90), door_color=(200, 255, 200))),
    (
        "small-canvas",
        TwoRoomLayout(
            size=64,
            border=4,
            border_thickness=2,
            wall_center=32,
            wall_thickness=4,
            door_center=20,
            door_half=6,
            radius=2.5,
            spawn_low=4.0,
            spawn_high=59.0,
        ),
    ),
]


@pytest.mark.parametrize("layout", [c[1] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_render_other_layouts(layout):
    gen = torch.Generator().manual_seed(17)
    xy = torch.rand(12, 2, generator=gen) * (layout.size - 1)
    frames = render(xy, layout)
    assert frames.shape == (12, layout.size, layout.size, 3)
    for i, (x, y) in enumerate(xy.tolist()):
        assert np.array_equal(frames[i].numpy(), _vectorised_frame(layout, x, y)), (x, y)
    assert torch.equal(frames[5], render(xy[5:6], layout)[0])  # independent of the batch
    with pytest.raises(ValueError, match="background"):
        render(xy, layout, background=frames[0, :10])


CASES = [  # (id, start, action, expected) -- every branch of spec section 4's dynamics
    ("free-move", (50.0, 50.0), (0.5, -0.25), (52.5, 48.75)),
    ("action-clipped", (50.0, 150.0), (3.0, -7.0), (55.0, 145.0)),
    ("clamp-low", (22.0, 23.0), (-1.0, -1.0), (21.0, 21.0)),
    ("clamp-high", (202.0, 200.0), (1.0, 1.0), (203.0, 203.0)),
    ("left-hits-wall", (98.0, 150.0), (1.0, 0.0), (99.5, 150.0)),
    ("left-through-door", (98.0, 49.0), (1.0, 0.0), (103.0, 49.0)),
    ("left-door-top-edge", (97.0, 33.25), (1.0, 0.0), (102.0, 33.25)),
    ("left-door-bottom-edge", (97.0, 64.75), (1.0, 0.0), (102.0, 64.75)),
    ("left-just-below-door", (97.0, 65.0), (1.0, 0.0), (99.5, 65.0)),
    ("left-just-above-door", (97.0, 33.0), (1.0, 0.0), (99.5, 33.0)),
    ("left-stops-at-band-edge", (95.0, 150.0), (1.0, 0.0), (100.0, 150.0)),
    ("right-hits-wall", (126.0, 150.0), (-1.0, 0.0), (124.5, 150.0)),
    ("right-through-door", (126.0, 49.0), (-1.0, 0.0), (121.0, 49.0)),
    ("right-stops-at-band-edge", (129.0, 150.0), (-1.0, 0.0), (124.0, 150.0)),
    ("in-door-leaves-downwards-left", (110.0, 62.0), (0.0, 1.0), (99.5, 67.0)),
    ("in-door-leaves-downwards-right", (114.0, 62.0), (0.0, 1.0), (124.5, 67.0)),
    ("x-112-counts-as-right", (112.0, 62.0), (0.0, 1.0), (124.5, 67.0)),
    ("crosses-in-door", (111.0, 49.0), (1.0, 0.2), (116.0, 50.0)),
    ("clamp-then-wall", (98.0, 209.0), (1.0, 1.0), (99.5, 203.0)),
    ("left-room-far-side-free", (20.0, 100.0), (-0.4, 0.5), (21.0, 102.5)),
]


@pytest.mark.parametrize("start, action, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_step_branches(start, action, expected):
    got = step(torch.tensor([start]), torch.tensor([action]))
    assert got.dtype == torch.float32
    assert got[0].tolist() == list(expected)


def test_step_batched_equals_single_rows():
    starts = torch.tensor([c[1] for c in CASES])
    actions = torch.tensor([c[2] for c in CASES])
    assert step(starts, actions).tolist() == [list(c[3]) for c in CASES]


def test_step_random_walk_respects_walls():
    gen = torch.Generator().manual_seed(3)
    p = torch.stack([sample_start_goal(episode_generator(3, i))[0] for i in range(256)])
    for _ in range(60):
        q = step(p, 2 * torch.rand(256, 2, generator=gen) - 1)
        assert ((q >= 21) & (q <= 203)).all()
        crossed = (p[:, 0] < 112) != (q[:, 0] < 112)
        assert (q[crossed, 1] - 49).abs().le(15.75).all()  # sides change only through the door
        in_band = (q[:, 0] > 100) & (q[:, 0] < 124)
        assert (q[in_band, 1] - 49).abs().le(15.75).all()
        p = q


BAD_POSITIONS = [
    ("nan", torch.tensor([[50.0, float("nan")]]), "finite positions"),
    ("inf", torch.tensor([[float("inf"), 50.0]]), "finite positions"),
    ("off-canvas", torch.tensor([[50.0, 224.5]]), r"\[0, 223\]; row 0"),
    ("negative", torch.tensor([[50.0, 60.0], [-0.5, 3.0]]), "row 1"),
    ("shape", torch.tensor([50.0, 60.0]), "2 dimensions"),
    ("columns", torch.zeros(3, 3), r"shape \(N, 2\)"),
    ("integer", torch.tensor([[50, 60]]), "floating-point"),
]


@pytest.mark.parametrize("xy, match", [c[1:] for c in BAD_POSITIONS], ids=[c[0] for c in BAD_POSITIONS])
def test_bad_positions_are_rejected(xy, match):
    with pytest.raises(ValueError, match=match):
        render(xy)
    with pytest.raises(ValueError, match=match):
        step(xy, torch.zeros_like(xy, dtype=torch.float32))


def test_bad_actions_are_rejected():
    xy = torch.tensor([[50.0, 60.0], [70.0, 80.0]])
    with pytest.raises(ValueError, match="must be finite.*row 1"):
        step(xy, torch.tensor([[0.1, 0.2], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="must be finite"):
        step(xy, torch.tensor([[0.1, float("-inf")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        step(xy, torch.zeros(3, 2))
    env = TwoRoom(2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="must be finite"):
        env.step(torch.tensor([[0.0, 0.0], [float("nan"), 1.0]]))


def test_layout_validation():
    assert DEFAULT_LAYOUT.band == (100.0, 124.0) and DEFAULT_LAYOUT.door_range == (33.25, 64.75)
    assert DEFAULT_LAYOUT.clamp_range == (21.0, 203.0)
    assert TwoRoomLayout.from_dict(DEFAULT_LAYOUT.to_dict()) == DEFAULT_LAYOUT
    with pytest.raises(ValueError, match="radius"):
        TwoRoomLayout(radius=-1.0)
    with pytest.raises(ValueError, match="agent_color"):
        TwoRoomLayout(agent_color=(256, 0, 0))
    with pytest.raises(ValueError, match="at least 0.5"):
        TwoRoomLayout(radius=0.25)
    with pytest.raises(ValueError, match="unknown TwoRoomLayout fields"):
        TwoRoomLayout.from_dict({"walls": 2})


def test_reset_sampling_follows_spec():
    env = TwoRoom(512)
    state = env.reset(seed=11)
    agent, goal = state["proprio"], state["goal"]
    for xy in (agent, goal):
        assert ((xy >= 14) & (xy <= 209)).all()
    assert not ((agent[:, 0] >= 100) & (agent[:, 0] <= 124)).any()
    assert ((goal[:, 0] >= 100) & (goal[:, 0] <= 124)).any()  # goals are not constrained
    assert agent.std(0).min() > 40 and goal.std(0).min() > 40  # spread over the canvas
    again = TwoRoom(3).reset(seed=11)
    assert torch.equal(again["proprio"], agent[:3]) and torch.equal(again["goal"], goal[:3])
    other = TwoRoom(3).reset(seed=12)
    assert not torch.equal(other["proprio"], agent[:3])


def test_env_step_success_and_distance():
    env = TwoRoom(3)
    env.reset(
        agent_xy=torch.tensor([[50.0, 50.0], [150.0, 150.0], [60.0, 100.0]]),
        goal_xy=torch.tensor([[70.0, 50.0], [150.0, 190.0], [60.0, 100.0]]),
    )
    assert env.success().tolist() == [False, False, True]
    out = env.step(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert out["proprio"].tolist() == [[55.0, 50.0], [150.0, 155.0], [60.0, 100.0]]
    assert out["distance"].tolist() == [15.0, 35.0, 0.0]
    assert out["success"].tolist() == [True, False, True]
    assert env.steps == 1
    assert torch.equal(distance(env.agent_xy, env.goal_xy), env.distance())
    with pytest.raises(RuntimeError, match="reset"):
        TwoRoom(1).step(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="num_envs"):
        TwoRoom(0)
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        env.reset(agent_xy=torch.zeros(2, 2), goal_xy=torch.zeros(2, 2))


@pytest.mark.gpu
@pytest.mark.smoke
def test_cpu_and_cuda_are_bit_identical():
    gen = torch.Generator().manual_seed(5)
    xy = torch.cat([_positions(300, gen), torch.rand(200, 2, generator=gen) * 223])
    assert torch.equal(render(xy), render(xy.cuda()).cpu())
    t = torch.rand(100_000, generator=gen, dtype=torch.float64) * 40
    assert torch.equal(exp_neg(t), exp_neg(t.cuda()).cpu())
    actions = 3 * torch.randn(500, 2, generator=gen)
    p_cpu, p_gpu = xy, xy.cuda()
    for _ in range(50):
        p_cpu, p_gpu = step(p_cpu, actions), step(p_gpu, actions.cuda())
        actions = actions.roll(1, 0)
    assert torch.equal(p_cpu, p_gpu.cpu())
    env_cpu, env_gpu = TwoRoom(64), TwoRoom(64, device="cuda")
    env_cpu.reset(seed=2)
    env_gpu.reset(seed=2)
    assert torch.equal(env_cpu.render(), env_gpu.render().cpu())
    assert torch.equal(env_cpu.distance(), env_gpu.distance().cpu())
    q = _sqrt_inputs()
    assert torch.equal(sqrt_rn(q), sqrt_rn(q.cuda()).cpu())
    goal, noise = xy.flip(0), torch.randn(500, 2, generator=gen)
    assert torch.equal(distance(xy, goal), distance(xy.cuda(), goal.cuda()).cpu())
    expert = NoisyExpert()
    assert torch.equal(expert(xy, goal, noise), expert(xy.cuda(), goal.cuda(), noise.cuda()).cpu())
