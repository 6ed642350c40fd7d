"""AdaLN-Zero: the eager chain (LayerNorm -> modulate -> affine LayerNorm; x + gate * y) vs
the fused Triton kernels, at planning size (15,000 sequences x 3 tokens x 192) and training
size (128 x 3 x 192). The fused kernels need CUDA; on a CPU only the eager rows run.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from lewm_fast.reference import modulate

from .harness import Report, peak_extra_memory, time_fn, triton_runs_on

D = 192


def _eager_norm(x, shift, scale, w, b):
    h = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    return F.layer_norm(modulate(h, shift, scale), (x.shape[-1],), w, b, eps=1e-5)


def _impls(device: torch.device):
    impls = {"reference": (_eager_norm, lambda x, g, y: x + g * y)}
    if triton_runs_on(device):
        from lewm_fast.kernels import adaln

        impls["triton"] = (
            lambda x, s, c, w, b: adaln.AdalnFunction.apply(x, s, c, w, b, 1e-6, 1e-5),
            adaln.GatedResidualFunction.apply,
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
            for impl, (norm, gated) in impls.items():
                shift, scale, gate = mod[..., :D], mod[..., D : 2 * D], mod[..., 2 * D : 3 * D]
                _measure(
                    report,
                    "adaln_modulate_norm",
                    case,
                    impl,
                    partial(norm, x, shift, scale, w, b),
                    norm_bytes,
                )
                _measure(
                    report, "adaln_gated_residual", case, impl, partial(gated, x, gate, branch), gated_bytes
                )


def _measure(report: Report, bench: str, case: str, impl: str, forward, nbytes: int) -> None:
    device = report.device

    def both():
        forward().sum().backward()

    t_fwd = time_fn(lambda: forward().detach(), device)
    t_bwd = time_fn(lambda out: out.sum().backward(), device, setup=forward)
    t_full = time_fn(both, device)
    mem = peak_extra_memory(both, device)
    for phase, timing in (("fwd", t_fwd), ("bwd", t_bwd), ("fwd+bwd", t_full)):
        extra = {"GB/s": nbytes / (timing.median_ms * 1e6)} if phase == "fwd" else {}
        report.add(
            bench, case, impl, phase, timing, peak_extra_bytes=mem if phase == "fwd+bwd" else None, **extra
        )
