"""Eager entry points for the ``lewm_fast::*`` custom ops: the host cost of a call.

A ``torch.library.custom_op`` call goes through the dispatcher, the op's autograd kernel,
a redispatch, ``torch._dynamo``'s disable wrapper and default-argument filling before its
launcher runs; on the 2-core CPU machine that is about 85 us per call before any kernel
(``gated_residual`` with the Triton launch stubbed out), against about 35 us for the
eager ``x + gate * y`` *with* its arithmetic. On the first H200 run (2026-12-01,
``bench/results/nvidia-h200-2026-12-01.json``) that host time was the whole story at the
training size: the fused AdaLN-Zero ops took 0.17-0.26 ms per forward against
0.008-0.09 ms for the eager chain, and SIGReg fwd+bwd 0.96 ms against 0.92 ms.

:func:`call` keeps the custom op wherever something traces or intercepts the call
(``torch.compile``/``torch.export``, a ``TorchDispatchMode`` such as the fake mode and
kernel counter of ``bench/perf_model.py``, tensor subclasses) and otherwise runs the same
launchers directly: through one ``torch.autograd.Function`` when a gradient is needed,
bare when none is (planning, ``torch.no_grad``). Both paths run the same forward and
backward launchers, so they agree bit for bit (``tests/test_adaln.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids: ``triton.cdiv`` without the constexpr-function wrapper
    newer Triton puts around it, host time on every launch."""
    return -(-a // b)


def tracing(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a call on ``tensors`` must go through the custom op: under ``torch.compile``
    or ``torch.export``, inside a ``TorchDispatchMode``, or for a tensor subclass."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return any(type(t) not in _PLAIN for t in tensors)


def function(
    name: str,
    forward: Callable,
    setup_context: Callable,
    backward: Callable,
    non_differentiable: Sequence[int] = (),
) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` named ``name`` running ``forward(*inputs)`` (a launcher),
    the custom op's ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``.

    ``non_differentiable``: indices of outputs (a tuple) that carry no gradient, such as
    saved statistics. The backward is once-differentiable: its launchers are not
    differentiable themselves, so a double backward raises instead of being silently wrong.
    """

    def forward_with_ctx(ctx, *inputs):
        # forward(ctx, ...) rather than a setup_context staticmethod: with one, every apply()
        # binds its arguments through inspect.signature, ~50 us of host time here
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        if non_differentiable:
            ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
        return output

    body = {
        "forward": staticmethod(forward_with_ctx),
        "backward": staticmethod(torch.autograd.function.once_differentiable(backward)),
    }
    return type(name, (torch.autograd.Function,), body)


def call(op: Callable, fn: type[torch.autograd.Function], launcher: Callable, *args):
    """``op(*args)`` (the custom op) while tracing (see :func:`tracing`); else
    ``fn.apply(*args)`` when grad mode is on and a tensor argument requires grad; else
    ``launcher(*args)``. The three return the same outputs."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if tracing(tensors):
        return op(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return fn.apply(*args)
    return launcher(*args)
