"""SIGReg: the reference (materialises (T, B, P, K)) vs the fused Triton kernel.

Forward, backward and forward+backward time and peak extra memory at the training size
(T=4, B=128, D=192, P=1024, K=17) and a batch sweep. The fused kernel needs CUDA; on a
CPU only the reference rows are measured.
"""

from __future__ import annotations

import torch

from lewm_fast import reference as ref
from lewm_fast import sigreg

from .harness import Report, peak_extra_memory, time_fn, triton_runs_on

KNOTS = 17


def _cases(quick: bool, device: torch.device):
    if device.type != "cuda":
        return [(4, 32, 192, 256)] if quick else [(4, 128, 192, 1024)]
    base = [(4, 128, 192, 1024)]
    return base if quick else base + [(4, 256, 192, 1024), (4, 512, 192, 1024), (4, 1024, 192, 1024)]


def _impls(device: torch.device):
    t, phi, w = ref.sigreg_quadrature(KNOTS, device=device)
    impls = {"reference": lambda z, A: ref.sigreg_statistic(z, A, t, phi, w)}
    if triton_runs_on(device):
        impls["triton"] = lambda z, A: sigreg(z, A, KNOTS, backend="triton")
    return impls


def run(report: Report, quick: bool = False) -> None:
    device = report.device
    impls = _impls(device)
    if "triton" not in impls:
        print("[bench sigreg] the fused kernel needs CUDA and triton; measuring the reference only")
    for T, B, D, P in _cases(quick, device):
        case = f"T{T}-B{B}-D{D}-P{P}-K{KNOTS}"
        gen = torch.Generator(device=device).manual_seed(0)
        z = torch.randn(T, B, D, device=device, generator=gen, requires_grad=True)
        A = ref.draw_projections(D, P, device=device)
        evaluations = T * B * P * KNOTS  # cos/sin pairs per forward
        for impl, fn in impls.items():
            _measure(report, case, impl, fn, z, A, evaluations)


def _measure(report, case, impl, fn, z, A, evaluations) -> None:
    device = report.device

    def forward():
        return fn(z, A)

    def both():
        fn(z, A).backward()

    fwd = time_fn(lambda: forward().detach(), device)
    bwd = time_fn(lambda value: value.backward(), device, setup=forward, grad_to_none=[z])
    full = time_fn(both, device, grad_to_none=[z])
    z.grad = None
    mem = peak_extra_memory(both, device)
    z.grad = None
    for phase, timing in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", full)):
        report.add(
            "sigreg",
            case,
            impl,
            phase,
            timing,
            peak_extra_bytes=mem if phase == "fwd+bwd" else None,
            **{"G(cos,sin)/s": evaluations / (timing.median_ms * 1e6)},
        )
