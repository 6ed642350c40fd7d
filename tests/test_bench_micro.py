"""Micro benchmarks under pytest-benchmark: small CPU cases with few rounds, so the suite stays
fast. They time and check a result; they assert no speed (speed belongs in bench/).
``pytest tests/test_bench_micro.py --benchmark-only`` prints the table alone."""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from lewm_fast import reference as ref  # noqa: E402
from lewm_fast.data import normalize_frames  # noqa: E402
from lewm_fast.envs import layout_image, render  # noqa: E402
from lewm_fast.probe import ridge_fit  # noqa: E402

ROUNDS = {"rounds": 3, "iterations": 1, "warmup_rounds": 1}


def test_micro_sigreg_reference(benchmark):
    z = torch.randn(4, 32, 64)
    A = ref.draw_projections(64, 128)
    t, phi, w = ref.sigreg_quadrature(17)
    value = benchmark.pedantic(ref.sigreg_statistic, args=(z, A, t, phi, w), **ROUNDS)
    assert value.dim() == 0 and torch.isfinite(value)


def test_micro_render(benchmark):
    xy = 21 + 182 * torch.rand(16, 2)
    background = layout_image(device="cpu")
    frames = benchmark.pedantic(render, args=(xy,), kwargs={"background": background}, **ROUNDS)
    assert frames.shape == (16, 224, 224, 3) and frames.dtype == torch.uint8


def test_micro_normalize_frames(benchmark):
    frames = torch.randint(0, 256, (16, 224, 224, 3), dtype=torch.uint8)
    out = benchmark.pedantic(normalize_frames, args=(frames, 56), **ROUNDS)
    assert out.shape == (16, 3, 56, 56)


def test_micro_ridge_probe(benchmark):
    x = torch.randn(2000, 192)
    y = x[:, :2] * 3.0 + 1.0
    probe = benchmark.pedantic(ridge_fit, args=(x, y, 1e-6), **ROUNDS)
    assert torch.allclose(probe.predict(x), y.double(), atol=1e-3)
