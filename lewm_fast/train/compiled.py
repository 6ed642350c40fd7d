"""``TrainConfig.compile``: the training step's forward and backward under ``torch.compile``.

:func:`compile_step` returns the :class:`~lewm_fast.train.step.StepFunctions` of a memory
plan with every piece the plan runs compiled (``dynamic=False``: shapes are static, which
the trainer's batches are, since it drops a short last batch). AOTAutograd traces each
piece's forward and backward together and compiles both, so ``objective.backward()``
runs compiled code too. Per plan:

- ``whole``: one piece, :func:`~lewm_fast.train.step.whole_objective` (pixels to the
  objective): one forward graph and one backward graph per step. On CUDA with inductor
  it is compiled with ``mode="reduce-overhead"``: inductor captures both graphs as CUDA
  graphs (where it accepts them; it logs why when it does not) and the step replays them.
- ``checkpoint``: the same piece with ``checkpoint=True``. The per-layer
  ``torch.utils.checkpoint`` calls become activation-checkpoint regions of the one graph,
  which the backward graph recomputes. No CUDA graphs (below).
- ``two_pass``: two pieces, because the plan calls backward several times with gradients
  it computes itself, and one compiled graph cannot hold a ``.backward()`` call:
  :func:`~lewm_fast.train.step.encode_frames` (a chunk of frames to CLS features; run
  under ``no_grad`` for pass 1, an inference graph, and with grad for pass 2, a forward
  and a backward graph; an uneven last chunk compiles once more) and
  :func:`~lewm_fast.train.step.head_objective` (CLS features to the objective, forward
  and backward). The ``torch.cat`` of the chunks and the loop stay in Python. No CUDA
  graphs (below).

CUDA graphs are only requested for ``whole``: a CUDA graph tree keeps a private memory
pool for the run and static copies of each graph's inputs, which the peak-memory model
(:mod:`lewm_fast.train.memory`) does not count and which validation and evaluation
cannot reuse, while ``checkpoint`` and ``two_pass`` exist to fit a tight budget; and
``two_pass`` calls its encoder graph several times a step while earlier outputs are
alive, which graph trees would record as separate graphs. The CPU never requests them.

Backends (``TrainConfig.compile``): ``True`` or ``"inductor"`` (generated kernels, CUDA
graphs as above), ``"inductor-no-cudagraphs"`` (the same kernels launched one by one) and
``"aot_eager"`` (AOTAutograd's traced forward and backward run by eager ATen ops: no
speed-up; for checking the traced graphs, and what the CPU tests use). Random numbers:
under ``aot_eager`` the compiled step draws exactly the eager step's dropout masks and
SIGReg directions; inductor generates its own (seeded from the global generator, so a
seeded run is still reproducible, but not equal to the eager run's draws).

Each :class:`CompiledStep` compiles its own copies of the piece functions, so the
recompilation limit of ``torch._dynamo`` (8 graphs per function) counts per step, not
across every model a process trains.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .step import PLANS, StepFunctions, encode_frames, head_objective, whole_objective

__all__ = ["COMPILE_BACKENDS", "CompiledStep", "compile_step", "compile_backend"]

COMPILE_BACKENDS = ("inductor", "inductor-no-cudagraphs", "aot_eager")


def compile_backend(value: bool | str) -> str | None:
    """The backend name of a ``TrainConfig.compile`` value: False -> None, True -> "inductor",
    a name of :data:`COMPILE_BACKENDS` -> itself; ValueError otherwise."""
    if value is False:
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str) and value in COMPILE_BACKENDS:
        return value
    raise ValueError(f"compile must be True, False or one of {COMPILE_BACKENDS}, got {value!r}")


@dataclass(frozen=True)
class CompiledStep(StepFunctions):
    """:class:`StepFunctions` whose pieces for ``plan`` are compiled (see the module docstring).

    ``backend`` (a name of :data:`COMPILE_BACKENDS`), ``mode`` (the ``torch.compile`` mode,
    None for the default) and ``pieces`` (the names of the compiled pieces) describe it;
    :meth:`describe` gives them as a JSON-ready dict.
    """

    plan: str = "whole"
    backend: str = "inductor"
    mode: str | None = None
    pieces: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "mode": self.mode,
            "pieces": list(self.pieces),
            "cudagraphs": self.cudagraphs,
            "dynamic": False,
        }


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: torch.compile caches compiled frames (and
    counts recompilations) per code object."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def compile_step(
    plan: str, device: torch.device | str, backend: bool | str = "inductor", *, compiler=None
) -> CompiledStep:
    """The pieces of ``plan`` ("whole", "checkpoint", "two_pass") under ``torch.compile``.

    ``device``: where the step runs (CUDA graphs only on CUDA, only for "whole", only with
    ``backend="inductor"``). ``backend``: ``True`` or a name of :data:`COMPILE_BACKENDS`.
    ``compiler``: a ``torch.compile`` backend callable ``(gm, example_inputs)`` replacing
    the named one and its mode (tests count graphs with it): it gets no mode, so no CUDA
    graphs are requested (torch.compile would pass ``mode=`` to a callable as a keyword).
    Compilation happens at the first call of each piece, not here. Raises ValueError for
    an unknown plan or backend.
    """
    if plan not in PLANS:
        raise ValueError(f"memory_plan must be one of {PLANS}, got {plan!r}")
    name = compile_backend(backend)
    if name is None:
        raise ValueError("compile_step needs a backend; compile=False means the eager step")
    device = torch.device(device)
    cudagraphs = compiler is None and name == "inductor" and device.type == "cuda" and plan == "whole"
    mode = "reduce-overhead" if cudagraphs else None
    target = compiler or ("aot_eager" if name == "aot_eager" else "inductor")
    options = {"backend": target, "dynamic": False}
    if mode is not None:
        options["mode"] = mode

    def compiled(fn: Callable) -> Callable:
        return torch.compile(_own_copy(fn), **options)

    if plan == "two_pass":
        pieces = ("encode", "head")
        fns = dict(head=compiled(head_objective), encode=compiled(encode_frames))
    else:
        pieces = ("whole",)
        fns = dict(whole=compiled(whole_objective))
    return CompiledStep(**fns, cudagraphs=cudagraphs, plan=plan, backend=name, mode=mode, pieces=pieces)
