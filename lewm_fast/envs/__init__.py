"""Environments: Two-Room (spec section 4), batched and bit-exact on CPU and CUDA.

``lewm_fast.envs.gym`` holds the gymnasium wrapper; it is imported on demand so that
gymnasium stays an optional extra (``pip install lewm-fast[gym]``).
"""

from .png import save_png
from .policies import POLICIES, NoisyExpert, UniformRandom, make_policy
from .two_room import (
    DEFAULT_LAYOUT,
    TwoRoom,
    TwoRoomLayout,
    distance,
    episode_generator,
    layout_image,
    render,
    sample_start_goal,
    step,
)

__all__ = [
    "DEFAULT_LAYOUT",
    "TwoRoom",
    "TwoRoomLayout",
    "render",
    "step",
    "distance",
    "layout_image",
    "episode_generator",
    "sample_start_goal",
    "NoisyExpert",
    "UniformRandom",
    "POLICIES",
    "make_policy",
    "save_png",
]
