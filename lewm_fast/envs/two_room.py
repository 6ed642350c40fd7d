"""The Two-Room environment of the published LeWM experiments (spec section 4), batched.

Pure functions of state, vectorised over N environments, on CPU or CUDA::

    frames = render(agent_xy)          # (N, 2) float32 -> (N, 224, 224, 3) uint8
    agent_xy = step(agent_xy, action)  # (N, 2), (N, 2) -> (N, 2)

and :class:`TwoRoom`, a batched environment built on them (seeded reset, step, render,
success flags, distance to goal). Every number comes from one frozen
:class:`TwoRoomLayout` whose defaults are the published layout.

Bit-exactness. Both functions give identical bits on CPU and CUDA because they use only
operations IEEE 754 rounds exactly (+, -, *, /, comparisons, floor, clamps) as
separate eager kernels, so no fused multiply-add and no device math library enters.
Divisors are tensors on the device, never Python scalars: CUDA computes ``x / scalar``
as ``x * (1 / scalar)``, which can differ from the CPU's true division in the last bit. The
one transcendental, the Gaussian ``exp``, is therefore not ``torch.exp`` (whose float32
and float64 results can differ by an ulp between the CPU's SLEEF and CUDA's libdevice) but
:func:`exp_neg`: Cody-Waite range reduction and a degree-13 Taylor polynomial in float64,
within 1 ulp of the exact value, bit-identical on both devices. Nor is ``torch.sqrt``
device-exact: CUDA's is correctly rounded, but on the CPU it runs through MKL's vector
math, which is only faithful (on an AVX2 machine about 15% of random float32 roots come
out an ulp off). Distances (:func:`distance`, success, the expert policy's unit vectors) use
:func:`sqrt_rn` instead, which is correctly rounded on both. The Gaussian is
separable, exp(-(dx^2 + dy^2) / 2r^2) = exp(-dx^2 / 2r^2) * exp(-dy^2 / 2r^2), and its
maximum over the grid is the product of the per-axis maxima, so ``render`` evaluates
``exp_neg`` on the 2 x 224 axis distances only; the per-pixel alpha is the float64 product
of the two normalised factors rounded once to float32. That value is the float32 of the
exact alpha in all but ~1e-8 of pixels (and then one float32 ulp away), so the uint8
frame equals that of a straightforward per-pixel float64 implementation unless a blend
lands within an ulp of an integer.

Alpha below 2**-32 leaves every uint8 unchanged: 1 - a rounds to 1 in float32 and
colour * a < 2**-24 is under half an ulp of any nonzero integer (and truncates to 0 on
0). So only pixels within ``r * sqrt(64 ln 2)`` (46.6 px at r = 7) of the agent can
change, and ``render`` blends a square crop of that reach around each agent instead of
the whole canvas. Per-axis arguments are capped at 40 (exp(-40) < 2**-57), which keeps
every intermediate a normal number and changes only alphas far below 2**-32.

Do not wrap these functions in ``torch.compile``: a fused kernel may contract ``a * b + c``
into an FMA and lose the CPU/CUDA equality.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from .. import _checks

__all__ = [
    "TwoRoomLayout",
    "DEFAULT_LAYOUT",
    "render",
    "dot_crop",
    "step",
    "distance",
    "layout_image",
    "exp_neg",
    "sqrt_rn",
    "norm_xy",
    "episode_generator",
    "sample_start_goal",
    "check_positions",
    "TwoRoom",
]

Color = tuple[int, int, int]


@dataclass(frozen=True)
class TwoRoomLayout:
    """Geometry, dynamics and colours of Two-Room; the defaults are the published layout.

    Canvas ``size`` x ``size``; pixel (row y, column x) has centre (x, y). Black border
    lines ``border_thickness`` px thick end at ``border`` px from each edge (columns and
    rows 10..13 and 210..213). A vertical wall of ``wall_thickness`` px centred on column
    ``wall_center`` (columns 107..117) with one door on rows ``door_center +- door_half``
    (35..63). The agent is a Gaussian dot of radius ``radius``; it moves ``speed`` px per
    unit action and is clamped to [border + radius, size - border - radius] = [21, 203].
    Crossing the wall band [wall_center - wall_thickness // 2 - radius, ... + radius] =
    [100, 124] outside the door (|y - door_center| <= door_half + door_margin) snaps x to
    ``wall_push`` px outside the band (99.5 or 124.5). Reset draws positions uniformly in
    [spawn_low, spawn_high]^2. Success is a distance below ``success_distance``.
    """

    size: int = 224
    border: int = 14
    border_thickness: int = 4
    wall_center: int = 112
    wall_thickness: int = 10
    door_center: int = 49
    door_half: int = 14
    door_margin: float = 1.75
    radius: float = 7.0
    speed: float = 5.0
    wall_push: float = 0.5
    success_distance: float = 16.0
    spawn_low: float = 14.0
    spawn_high: float = 209.0
    background: Color = (255, 255, 255)
    wall_color: Color = (0, 0, 0)
    door_color: Color = (255, 255, 255)
    agent_color: Color = (255, 0, 0)

    def __post_init__(self) -> None:
        for name in ("size", "border", "border_thickness", "wall_center", "wall_thickness"):
            _checks.positive(getattr(self, name), f"TwoRoomLayout.{name}")
        for name in ("door_center", "door_half"):
            _checks.integer(getattr(self, name), f"TwoRoomLayout.{name}", 0)
        for name in ("radius", "speed", "success_distance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"TwoRoomLayout.{name} must be a positive number, got {value!r}")
        if self.radius < 0.5:  # keeps the per-axis exp argument of the nearest pixel far below its cap
            raise ValueError(f"TwoRoomLayout.radius must be at least 0.5 px, got {self.radius!r}")
        for name in ("door_margin", "wall_push"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"TwoRoomLayout.{name} must be a non-negative number, got {value!r}")
        if self.border_thickness > self.border:
            raise ValueError(
                f"TwoRoomLayout.border_thickness ({self.border_thickness}) must not exceed "
                f"border ({self.border})"
            )
        if not self.clamp_low < self.clamp_high:
            raise ValueError(f"TwoRoomLayout: no room for the agent, clamp range {self.clamp_range}")
        if not 0 <= self.spawn_low < self.spawn_high <= self.size - 1:
            raise ValueError(
                f"TwoRoomLayout: spawn range [{self.spawn_low}, {self.spawn_high}] must lie on the canvas "
                f"[0, {self.size - 1}]"
            )
        for name in ("background", "wall_color", "door_color", "agent_color"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or len(value) != 3
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
            ):
                raise ValueError(
                    f"TwoRoomLayout.{name} must be an RGB tuple of 3 ints in [0, 255], got {value!r}"
                )

    # Derived numbers, all exact in float32.
    @property
    def clamp_low(self) -> float:
        return self.border + self.radius

    @property
    def clamp_high(self) -> float:
        return self.size - self.border - self.radius

    @property
    def clamp_range(self) -> tuple[float, float]:
        return (self.clamp_low, self.clamp_high)

    @property
    def band(self) -> tuple[float, float]:
        """x range the agent's centre may not enter outside the door: [100, 124] by default."""
        half = self.wall_thickness // 2
        return (self.wall_center - half - self.radius, self.wall_center + half + self.radius)

    @property
    def door_range(self) -> tuple[float, float]:
        """y range that counts as inside the door for collisions: [33.25, 64.75] by default."""
        reach = self.door_half + self.door_margin
        return (self.door_center - reach, self.door_center + reach)

    @property
    def door_xy(self) -> tuple[float, float]:
        """Centre of the door, (112, 49) by default."""
        return (float(self.wall_center), float(self.door_center))

    @property
    def dot_reach(self) -> int:
        """Pixels farther than this from the agent keep alpha < 2**-32 (unchanged frame bytes)."""
        return math.ceil(self.radius * math.sqrt(64 * math.log(2))) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TwoRoomLayout:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TwoRoomLayout fields {unknown}; expected a subset of {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


DEFAULT_LAYOUT = TwoRoomLayout()


# ---------------------------------------------------------------------------------------
# Device-independent exp.

_INV_LN2 = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # trailing zero bits: n * _LN2_HI is exact for n < 2**20
_LN2_LO = 1.90821492927058770002e-10
_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(14))
_EXP_ARG_MAX = 40.0


def exp_neg(t: torch.Tensor) -> torch.Tensor:
    """exp(-t) for float64 ``t`` in [0, 700], bit-identical on CPU and CUDA (within 1 ulp of exact).

    exp(-t) = 2**-n * exp(-r) with n = floor(t / ln 2 + 1/2), r = t - n ln 2 (Cody-Waite,
    |r| <= ln(2) / 2) and exp(-r) by a degree-13 Taylor polynomial (truncation < 0.05 ulp)
    in Horner form; 2**-n is assembled from its exponent bits. Only +, -, *, floor and
    integer shifts are used, each a separate IEEE-rounded kernel, so the result does not
    depend on the device.
    """
    if not torch.is_tensor(t) or t.dtype != torch.float64:
        raise ValueError(f"exp_neg expects a float64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    n = torch.floor(t * _INV_LN2 + 0.5)
    u = n * _LN2_HI - t + n * _LN2_LO  # = -r
    p = torch.full_like(u, _TAYLOR[13])
    for c in _TAYLOR[12::-1]:
        p = p * u + c
    scale = ((1023 - n.to(torch.int64)) << 52).view(torch.float64)  # 2**-n from its exponent bits, exact
    return p * scale


def sqrt_rn(q: torch.Tensor) -> torch.Tensor:
    """sqrt(q) of float32 ``q``, correctly rounded (round to nearest) and bit-identical on CPU and CUDA.

    ``torch.sqrt`` is not enough: the CPU's goes through MKL's vector math (float32 and
    float64 alike), which is within an ulp but not correctly rounded; CUDA's is. So take
    s = float32(sqrt(float64 q)), within one float32 ulp of the true root on either device,
    and move it to its neighbour when q lies beyond the square of the midpoint between
    them: those midpoints have at most 25 significant bits, so their float64 squares and
    the comparisons are exact, and no float32 ``q`` equals one (no ties to break).
    Only float64 +, *, comparisons and ``nextafter`` decide the result, never the sqrt.
    """
    if not torch.is_tensor(q) or q.dtype != torch.float32:
        raise ValueError(f"sqrt_rn expects a float32 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    q64 = q.to(torch.float64)
    s = torch.sqrt(q64).to(torch.float32)
    up = torch.nextafter(s, torch.full_like(s, math.inf))
    down = torch.nextafter(s, torch.zeros_like(s))
    s64 = s.to(torch.float64)
    hi = (s64 + up.to(torch.float64)) * 0.5  # exact: the midpoint of two adjacent float32
    lo = (s64 + down.to(torch.float64)) * 0.5
    return torch.where(q64 > hi * hi, up, torch.where(q64 < lo * lo, down, s))


# ---------------------------------------------------------------------------------------
# Input checks.


def check_positions(xy, name: str, layout: TwoRoomLayout = DEFAULT_LAYOUT) -> torch.Tensor:
    """``xy`` must be a finite floating (N, 2) tensor on the canvas [0, size - 1]^2; returns float32.

    One device sync. Raises ValueError naming the first offending row.
    """
    xy = _checks.tensor(xy, name, ("N", "2"))
    if xy.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) holding (x, y) per row, got {_checks.shape(xy)}")
    if not xy.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of (x, y) pixel positions, got {xy.dtype}")
    xy = xy.to(torch.float32)
    hi = layout.size - 1
    bad = ~(torch.isfinite(xy) & (xy >= 0) & (xy <= hi)).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} must hold finite positions on the {layout.size}x{layout.size} canvas, x and y in "
            f"[0, {hi}]; row {row} is {xy[row].tolist()} ({int(bad.sum())} bad row(s) in all)"
        )
    return xy


def _check_actions(action, name: str, n: int) -> torch.Tensor:
    action = _checks.tensor(action, name, ("N", "2"))
    if action.shape != (n, 2):
        raise ValueError(
            f"{name} must have shape ({n}, 2), one (dx, dy) per environment, got {_checks.shape(action)}"
        )
    if not action.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {action.dtype}")
    action = action.to(torch.float32)
    bad = ~torch.isfinite(action).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} must be finite (values outside [-1, 1] are clipped, NaN/inf are not); "
            f"row {row} is {action[row].tolist()}"
        )
    return action


# ---------------------------------------------------------------------------------------
# Rendering.


def layout_image(layout: TwoRoomLayout = DEFAULT_LAYOUT, device: str | torch.device = "cpu") -> torch.Tensor:
    """The empty scene, uint8 (size, size, 3): background, then the door, then walls and borders."""
    s = layout.size
    coord = torch.arange(s, device=device)
    img = torch.empty(s, s, 3, dtype=torch.uint8, device=device)
    img[:] = torch.tensor(layout.background, dtype=torch.uint8, device=device)
    half = layout.wall_thickness // 2
    stripe = (coord >= layout.wall_center - half) & (coord <= layout.wall_center + half)  # columns
    door = (coord >= layout.door_center - layout.door_half) & (coord <= layout.door_center + layout.door_half)
    img[door[:, None] & stripe[None, :]] = torch.tensor(layout.door_color, dtype=torch.uint8, device=device)
    lo, t = layout.border, layout.border_thickness
    line = ((coord >= lo - t) & (coord < lo)) | ((coord >= s - lo) & (coord < s - lo + t))
    wall = (~door[:, None] & stripe[None, :]) | line[:, None] | line[None, :]
    img[wall] = torch.tensor(layout.wall_color, dtype=torch.uint8, device=device)
    return img


def _axis_alpha(center: torch.Tensor, coords: torch.Tensor, radius: float) -> torch.Tensor:
    """Normalised 1-D Gaussian factors exp(-d^2 / 2r^2) / max, float64 (..., K), for coords (..., K).

    ``center`` (...) is the agent coordinate per row. The maximum over the crop is the
    maximum over the whole axis: the nearest pixel is always inside the crop.
    """
    d = coords.to(torch.float64) - center.to(torch.float64)[..., None]
    # The divisor lives on the device: CUDA turns division by a Python (CPU) scalar into a
    # multiplication by its rounded reciprocal, which the CPU does not.
    arg = torch.clamp(d * d / d.new_tensor(2.0 * radius * radius), max=_EXP_ARG_MAX)
    e = exp_neg(arg)
    return e / e.amax(dim=-1, keepdim=True)


def render(
    agent_xy: torch.Tensor,
    layout: TwoRoomLayout = DEFAULT_LAYOUT,
    *,
    background: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Frames of the agent at ``agent_xy``: (N, 2) float (x, y) -> uint8 (N, size, size, 3).

    out = uint8_trunc(img * (1 - a) + colour * a) per channel in float32, with
    a(x, y) = exp(-((x - ax)^2 + (y - ay)^2) / 2r^2) / max over the pixel grid, drawn over
    :func:`layout_image` (pass it as ``background`` to reuse one). Runs on the device of
    ``agent_xy``; the bits are the same on CPU and CUDA (see the module docstring). The
    goal image is ``render(goal_xy)``. ``check=False`` skips the input validation (and its
    device sync) for trusted positions.
    """
    if check:
        agent_xy = check_positions(agent_xy, "agent_xy", layout)
    else:
        agent_xy = agent_xy.to(torch.float32)
    device = agent_xy.device
    n, s = agent_xy.shape[0], layout.size
    if background is None:
        background = layout_image(layout, device)
    elif check and (
        background.dtype != torch.uint8 or background.shape != (s, s, 3) or background.device != device
    ):
        raise ValueError(
            f"background must be uint8 ({s}, {s}, 3) on {device} (see layout_image), got "
            f"{background.dtype} {_checks.shape(background)} on {background.device}"
        )
    frames = background.expand(n, s, s, 3).clone()
    if n == 0:
        return frames
    rows, cols, crop = dot_crop(agent_xy, layout, background)
    # flat indices: one index_copy_ is far cheaper than a three-tensor index_put on the CPU
    pixel = crop_pixels(rows, cols, s) + torch.arange(n, device=device)[:, None, None] * (s * s)
    frames.view(-1, 3).index_copy_(0, pixel.view(-1), crop.view(-1, 3))
    return frames


def crop_pixels(rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """Flat canvas indices row * size + col (N, K, K) int64 of the crops ``rows``, ``cols`` (N, K)."""
    return rows[:, :, None] * size + cols[:, None, :]


def dot_crop(
    agent_xy: torch.Tensor, layout: TwoRoomLayout, background: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The part of each frame the agent's dot changes: a K x K crop of the canvas.

    agent_xy (N, 2) float32 trusted positions; background the uint8 (size, size, 3) scene.
    Returns ``rows`` and ``cols`` (N, K) int64, the crop's canvas rows and columns
    (clamped to the canvas, no duplicates), and ``crop`` uint8 (N, K, K, 3), the frame's
    pixels there; every pixel outside the crop is the background's. :func:`render` pastes
    the crop into the background.
    """
    device, s = agent_xy.device, layout.size
    # A K x K crop holds every pixel the dot can change; clamped to the canvas, no duplicates.
    reach = layout.dot_reach
    k = min(2 * reach + 2, s)
    offs = torch.arange(k, device=device)
    start = torch.clamp(torch.floor(agent_xy).long() - reach, 0, s - k)  # (N, 2)
    coords = start[:, :, None] + offs  # (N, 2, K): crop columns, crop rows
    cols, rows = coords[:, 0], coords[:, 1]
    factors = _axis_alpha(agent_xy, coords, layout.radius)  # (N, 2, K) float64, one exp_neg call
    alpha = (factors[:, 1, :, None] * factors[:, 0, None, :]).to(torch.float32)[..., None]  # (N, K, K, 1)
    pixel = crop_pixels(rows, cols, s).view(-1)
    img = background.reshape(-1, 3).index_select(0, pixel).view(-1, k, k, 3).to(torch.float32)  # (N, K, K, 3)
    color = torch.tensor(layout.agent_color, dtype=torch.float32, device=device)
    # Separate kernels keep each product and the sum individually rounded (no FMA).
    blended = img * (1.0 - alpha) + color * alpha
    return rows, cols, blended.to(torch.uint8)


# ---------------------------------------------------------------------------------------
# Dynamics.


def step(
    agent_xy: torch.Tensor,
    action: torch.Tensor,
    layout: TwoRoomLayout = DEFAULT_LAYOUT,
    *,
    check: bool = True,
) -> torch.Tensor:
    """One environment step for N agents: (N, 2) positions, (N, 2) actions -> (N, 2) positions.

    a = clip(action, -1, 1); p' = clamp(p + speed * a, 21, 203) per coordinate (float32).
    Wall: if p.x < 112 and p'.x > 100 and p'.y is outside the door, p'.x = 99.5; if
    p.x >= 112 and p'.x < 124 outside the door, p'.x = 124.5. "Inside the door" is
    |p'.y - 49| <= 14 + 1.75. Numbers are the layout's defaults. Bit-identical on CPU and
    CUDA. ``check=False`` skips validation (positions on the canvas, finite actions).
    """
    if check:
        agent_xy = check_positions(agent_xy, "agent_xy", layout)
        action = _check_actions(action, "action", agent_xy.shape[0])
        if action.device != agent_xy.device:
            raise ValueError(f"action is on {action.device} but agent_xy is on {agent_xy.device}")
    else:
        agent_xy, action = agent_xy.to(torch.float32), action.to(torch.float32)
    moved = agent_xy + torch.clamp(action, -1.0, 1.0) * float(layout.speed)
    moved = torch.clamp(moved, layout.clamp_low, layout.clamp_high)
    x, y = moved[:, 0], moved[:, 1]
    door_lo, door_hi = layout.door_range
    band_lo, band_hi = layout.band
    blocked = (y < door_lo) | (y > door_hi)
    left = agent_xy[:, 0] < layout.wall_center
    x = torch.where(left & (x > band_lo) & blocked, torch.full_like(x, band_lo - layout.wall_push), x)
    x = torch.where(~left & (x < band_hi) & blocked, torch.full_like(x, band_hi + layout.wall_push), x)
    return torch.stack([x, y], dim=1)


def norm_xy(d: torch.Tensor) -> torch.Tensor:
    """Euclidean length per row, (N, 2) -> (N,) float32: sqrt_rn(dx * dx + dy * dy), device-exact.

    Each product and the sum is its own eager kernel, so every step is one IEEE rounding
    on both devices (no kernel sees ``a * a + b * b`` to contract into an FMA); the root is
    :func:`sqrt_rn`.
    """
    d = d.to(torch.float32)
    return sqrt_rn(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])


def distance(a_xy: torch.Tensor, b_xy: torch.Tensor) -> torch.Tensor:
    """Euclidean distance per row, (N, 2), (N, 2) -> (N,) float32: :func:`norm_xy` (a - b), device-exact."""
    return norm_xy(a_xy.to(torch.float32) - b_xy.to(torch.float32))


# ---------------------------------------------------------------------------------------
# Seeded episode starts.


def episode_generator(seed: int, episode: int) -> torch.Generator:
    """The CPU random stream of episode ``episode`` under ``seed``, independent of batching and device.

    Seeds a ``torch.Generator`` from ``numpy.random.SeedSequence([seed, episode])``, so
    every episode has its own well-mixed stream: start and goal first
    (:func:`sample_start_goal`), then the policy's per-step randomness.
    """
    for name, value in (("seed", seed), ("episode", episode)):
        _checks.integer(value, name, 0, numpy=True)
    state = np.random.SeedSequence([int(seed), int(episode)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_start_goal(
    generator: torch.Generator, layout: TwoRoomLayout = DEFAULT_LAYOUT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reset positions (spec section 4): agent and goal uniform in [14, 209]^2, float32 (2,) each.

    Agent draws whose x lies in the wall band [100, 124] are rejected and redrawn; the
    goal is unconstrained (as published).
    """
    lo, hi = float(layout.spawn_low), float(layout.spawn_high)
    band_lo, band_hi = layout.band
    while True:
        agent = lo + (hi - lo) * torch.rand(2, generator=generator)
        if not band_lo <= float(agent[0]) <= band_hi:
            break
    goal = lo + (hi - lo) * torch.rand(2, generator=generator)
    return agent, goal


# ---------------------------------------------------------------------------------------
# Batched environment.


class TwoRoom:
    """N Two-Room environments stepped together on one device.

    ``reset`` draws starts and goals per environment (seeded: environment i uses
    :func:`episode_generator` (seed, i), the same stream as episode i of a generated
    dataset with that seed) or takes them explicitly; ``step`` moves every agent;
    ``render`` / ``render_goal`` draw uint8 (N, 224, 224, 3) frames; ``success`` is
    distance < 16 px. There is no auto-reset: environments keep stepping after success.
    """

    def __init__(
        self, num_envs: int, *, device: str | torch.device = "cpu", layout: TwoRoomLayout = DEFAULT_LAYOUT
    ):
        _checks.positive(num_envs, "num_envs")
        if not isinstance(layout, TwoRoomLayout):
            raise ValueError(f"layout must be a TwoRoomLayout, got {type(layout).__name__}")
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.layout = layout
        self._background = layout_image(layout, self.device)
        self.agent_xy = torch.zeros(num_envs, 2, device=self.device)
        self.goal_xy = torch.zeros(num_envs, 2, device=self.device)
        self.steps = 0
        self._ready = False

    def _require_reset(self) -> None:
        if not self._ready:
            raise RuntimeError("TwoRoom: call reset() before step() or render()")

    def reset(
        self,
        seed: int | None = None,
        *,
        agent_xy: torch.Tensor | None = None,
        goal_xy: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Start new episodes; returns ``{"proprio": (N, 2), "goal": (N, 2)}``.

        Positions not given explicitly are drawn from ``seed`` (fresh entropy when None).
        Explicit positions are (N, 2) tensors on the canvas; they are copied to the env's
        device as float32.
        """
        if agent_xy is None or goal_xy is None:
            if seed is None:
                seed = int(np.random.SeedSequence().entropy % 2**63)
            drawn = [sample_start_goal(episode_generator(seed, i), self.layout) for i in range(self.num_envs)]
            starts = torch.stack([a for a, _ in drawn]).to(self.device)
            goals = torch.stack([g for _, g in drawn]).to(self.device)
        elif seed is not None:
            raise ValueError("reset: pass either seed or both agent_xy and goal_xy, not both")
        for name, value in (("agent_xy", agent_xy), ("goal_xy", goal_xy)):
            if value is None:
                continue
            value = check_positions(value, name, self.layout)
            if value.shape[0] != self.num_envs:
                raise ValueError(f"{name} must have shape ({self.num_envs}, 2), got {_checks.shape(value)}")
            if name == "agent_xy":
                starts = value.to(self.device)
            else:
                goals = value.to(self.device)
        self.agent_xy, self.goal_xy = starts.clone(), goals.clone()
        self.steps = 0
        self._ready = True
        return {"proprio": self.agent_xy.clone(), "goal": self.goal_xy.clone()}

    def step(self, action: torch.Tensor) -> dict[str, torch.Tensor]:
        """Move every agent by ``action`` (N, 2); returns proprio (N, 2), distance (N,), success (N,) bool."""
        self._require_reset()
        action = _check_actions(action, "action", self.num_envs).to(self.device)
        self.agent_xy = step(self.agent_xy, action, self.layout, check=False)
        self.steps += 1
        dist = self.distance()
        return {
            "proprio": self.agent_xy.clone(),
            "distance": dist,
            "success": dist < self.layout.success_distance,
        }

    def distance(self) -> torch.Tensor:
        """(N,) float32 distance from each agent to its goal."""
        self._require_reset()
        return distance(self.agent_xy, self.goal_xy)

    def success(self) -> torch.Tensor:
        """(N,) bool: agent within ``success_distance`` (16 px) of its goal."""
        return self.distance() < self.layout.success_distance

    def render(self) -> torch.Tensor:
        """Current frames, uint8 (N, 224, 224, 3) on the env's device."""
        self._require_reset()
        return render(self.agent_xy, self.layout, background=self._background, check=False)

    def render_goal(self) -> torch.Tensor:
        """Goal frames (the agent drawn at the goal), uint8 (N, 224, 224, 3)."""
        self._require_reset()
        return render(self.goal_xy, self.layout, background=self._background, check=False)
