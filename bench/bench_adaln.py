"""AdaLN-Zero: the eager chain (LayerNorm -> modulate -> affine LayerNorm; x + gate * y; and
the gated residual followed by the next branch input) vs the fused Triton kernels, at
planning size (15,000 sequences x 3 tokens x 192) and training size (128 x 3 x 192). The
fused kernels need CUDA; on a CPU only the eager rows run.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from lewm_fast import adaln_modulate, gated_adaln_modulate, gated_residual
from lewm_fast.reference import modulate

from .harness import Report, peak_extra_memory, time_fn, triton_runs_on

D = 192


def _eager_norm(x, shift, scale, w, b):
    h = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    return F.layer_norm(modulate(h, shift, scale), (x.shape[-1],), w, b, eps=1e-5)


def _eager_gated_norm(x, g, r, shift, scale, w, b):
    out = x + g * r
    return out, _eager_norm(out, shift, scale, w, b)


def _impls(device: torch.device):
    impls = {"reference": (_eager_norm, lambda x, g, y: x + g * y, _eager_gated_norm)}
    if triton_runs_on(device):
        impls["triton"] = (
            partial(adaln_modulate, backend="triton"),
            partial(gated_residual, backend="triton"),
            partial(gated_adaln_modulate, backend="triton"),
        )
    return impls


def _cases(quick: bool, device: torch.device):
    sizes = [("training", 128), ("planning", 15000)]
    if device.type != "cuda":
        sizes = [("training", 128)] if quick else sizes[:1] + [("planning", 1500)]
    return sizes


def run(report: Report, quick: bool = False) -> None:
    device = report.device
    impls = _impls(device)
    if "triton" not in impls:
        print("[bench adaln] the fused kernels need CUDA and triton; measuring the eager chain only")
    for label, seqs in _cases(quick, device):
        for dtypes in ("fp32", "fp32+bf16"):
            mod_dtype = torch.float32 if dtypes == "fp32" else torch.bfloat16
            case = f"{label}-{seqs}x3x{D}-{dtypes}"
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(seqs, 3, D, device=device, generator=gen, requires_grad=True)
            mod = torch.randn(seqs, 3, 6 * D, device=device, generator=gen).to(mod_dtype).requires_grad_()
            w = torch.ones(D, device=device, requires_grad=True)
            b = torch.zeros(D, device=device, requires_grad=True)
            branch = torch.randn(seqs, 3, D, device=device, generator=gen).to(mod_dtype).requires_grad_()
            elem = seqs * 3 * D
            # bytes a fused pass must move: x, shift, scale in and y out (+ per-row stats)
            norm_bytes = elem * (2 * x.element_size() + 2 * mod.element_size()) + seqs * 3 * 16
            gated_bytes = elem * (2 * x.element_size() + 2 * mod.element_size())
            leaves = (x, mod, w, b, branch)  # their .grad is cleared before each timed backward
            for impl, (norm, gated, gated_norm) in impls.items():
                shift, scale, gate = mod[..., :D], mod[..., D : 2 * D], mod[..., 2 * D : 3 * D]
                _measure(
                    report,
                    "adaln_modulate_norm",
                    case,
                    impl,
                    partial(norm, x, shift, scale, w, b),
                    norm_bytes,
                    leaves,
                )
                _measure(
                    report,
                    "adaln_gated_residual",
                    case,
                    impl,
                    partial(gated, x, gate, branch),
                    gated_bytes,
                    leaves,
                )
                _measure(
                    report,
                    "adaln_gated_then_norm",
                    case,
                    impl,
                    partial(gated_norm, x, gate, branch, shift, scale, w, b),
                    gated_bytes + norm_bytes - elem * x.element_size(),  # out is not read back
                    leaves,
                )


def _measure(report: Report, bench: str, case: str, impl: str, forward, nbytes: int, leaves) -> None:
    device = report.device

    def outputs():
        out = forward()
        return out if isinstance(out, tuple) else (out,)

    def backward(outs):
        sum(o.sum() for o in outs).backward()

    def both():
        backward(outputs())

    t_fwd = time_fn(lambda: [o.detach() for o in outputs()], device)
    t_bwd = time_fn(backward, device, setup=outputs, grad_to_none=leaves)
    t_full = time_fn(both, device, grad_to_none=leaves)
    mem = peak_extra_memory(both, device)
    for phase, timing in (("fwd", t_fwd), ("bwd", t_bwd), ("fwd+bwd", t_full)):
        extra = {"GB/s": nbytes / (timing.median_ms * 1e6)} if phase == "fwd" else {}
        report.add(
            bench, case, impl, phase, timing, peak_extra_bytes=mem if phase == "fwd+bwd" else None, **extra
        )
