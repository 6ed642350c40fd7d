"""The fused SIGReg kernel against lewm_fast.reference: values and gradients, all dtypes.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest); GPU tests repeat
parity at the real size. The forward that Triton < 3.3 runs (``_sigreg_fwd_loop_kernel``) is
forced with the ``loop_forward`` fixture, so both forwards are checked whatever Triton is
installed.
"""

import os
import re

import pytest
import torch

import lewm_fast
from lewm_fast import backend
from lewm_fast import reference as ref
from lewm_fast.sigreg import _trig_sums_torch
from lewm_fast.testing import assert_close, assert_low_precision

triton = pytest.importorskip("triton")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _force_loop_forward(kernel) -> None:
    """Make ``kernel`` (lewm_fast.kernels.sigreg) run the forward of Triton < 3.3; the
    tuple-accumulator kernel then fails if launched. For a process of its own (the ranks)."""
    kernel.TUPLE_ACCUMULATORS = False
    kernel._sigreg_fwd_kernel = _NotLaunched()


class _NotLaunched:
    def __getitem__(self, grid):
        raise AssertionError("the tuple-accumulator forward ran with TUPLE_ACCUMULATORS false")


@pytest.fixture
def loop_forward(monkeypatch):
    """The forward as under Triton < 3.3, whatever Triton runs (see _force_loop_forward)."""
    from lewm_fast.kernels import sigreg as kernel

    monkeypatch.setattr(kernel, "TUPLE_ACCUMULATORS", False)
    monkeypatch.setattr(kernel, "_sigreg_fwd_kernel", _NotLaunched())


def _run(z32, A, dtype, backend_name, grad_A=False):
    z = z32.detach().to(dtype).clone().requires_grad_()
    a = A.clone().requires_grad_(grad_A)
    value = lewm_fast.sigreg(z, a, backend=backend_name)
    value.backward()
    return value.detach(), z.grad, (a.grad if grad_A else None)


def _check_parity(z32, A, dtype_name, grad_A=False, what=""):
    """Assert parity of the value and gradients; returns their relative errors by name."""
    dtype = DTYPES[dtype_name]
    fast = _run(z32, A, dtype, "triton", grad_A)
    ref32 = _run(z32, A, torch.float32, "torch", grad_A)
    if dtype_name == "fp32":
        errors = {
            "value": assert_close(fast[0], ref32[0], "fp32_gemm", f"{what} value"),
            "grad z": assert_close(fast[1], ref32[1], "fp32_gemm", f"{what} grad z"),
        }
        if grad_A:
            errors["grad A"] = assert_close(fast[2], ref32[2], "fp32_gemm", f"{what} grad A")
        return errors
    low = _run(z32, A, dtype, "torch", grad_A)
    return {
        "value": assert_low_precision(fast[0], low[0], ref32[0], f"{what} value"),
        "grad z": assert_low_precision(fast[1], low[1], ref32[1], f"{what} grad z"),
    }


CASES = [  # (id, T, B, D, P, scale of z)
    ("T4-B32-D192-P64", 4, 32, 192, 64, 1.0),
    ("T1-B1-D191-P7", 1, 1, 191, 7, 1.0),
    ("T2-B16-D20-P18", 2, 16, 20, 18, 1.0),  # the largest batch of the one-warp tiles
    ("T3-B33-D24-P100", 3, 33, 24, 100, 3.0),
    ("T2-B70-D40-P33-wide", 2, 70, 40, 33, 20.0),
    ("T2-B130-D24-P20", 2, 130, 24, 20, 2.0),  # three 64-row chunks in the forward, the last ragged
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("T,B,D,P,scale", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fused_matches_reference(T, B, D, P, scale, dtype_name):
    device = _device()
    z = scale * torch.randn(T, B, D, device=device)
    A = ref.draw_projections(D, P, device=device)
    _check_parity(z, A, dtype_name, what=f"{T}x{B}x{D}x{P}")


# The forward of Triton < 3.3 on the odd shapes: one row with D = 191 and P = 7 (its ragged
# tiles), a z of scale 3, and B = 70 (two of its 64-row batch blocks) at scale 20.
LOOP_CASES = [c for c in CASES if c[0] in ("T1-B1-D191-P7", "T3-B33-D24-P100", "T2-B70-D40-P33-wide")]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("T,B,D,P,scale", [c[1:] for c in LOOP_CASES], ids=[c[0] for c in LOOP_CASES])
def test_triton_3_2_forward_matches_reference(loop_forward, T, B, D, P, scale, dtype_name):
    device = _device()
    z = scale * torch.randn(T, B, D, device=device)
    A = ref.draw_projections(D, P, device=device)
    _check_parity(z, A, dtype_name, what=f"loop forward {T}x{B}x{D}x{P}")


def test_tuple_accumulators_follow_the_triton_version():
    from lewm_fast.kernels import sigreg as kernel

    version = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    assert kernel.TUPLE_ACCUMULATORS is (version >= (3, 3))


def test_gradient_with_respect_to_A():
    device = _device()
    z = torch.randn(19, 2, 40, device=device).transpose(0, 1)  # (T, B, D) as the library passes it
    A = ref.draw_projections(40, 50, device=device)
    _check_parity(z, A, "fp32", grad_A=True)


@pytest.mark.parametrize("knots", [2, 32])
def test_knot_counts_at_the_ends_of_the_range(knots):
    """The knots are unrolled at compile time: the fewest and the most the kernel takes."""
    device = _device()
    z32 = torch.randn(2, 21, 24, device=device)
    A = ref.draw_projections(24, 40, device=device)

    def run(name):
        z = z32.clone().requires_grad_()
        value = lewm_fast.sigreg(z, A, knots, backend=name)
        value.backward()
        return value.detach(), z.grad

    fast, expected = run("triton"), run("torch")
    assert_close(fast[0], expected[0], "fp32_gemm", f"{knots} knots value")
    assert_close(fast[1], expected[1], "fp32_gemm", f"{knots} knots grad z")


def test_real_size_value_and_gradient():
    """T=4, B=128, D=192 in float32: the value and grad z, with P=1024 directions on a GPU
    (every dtype: the GPU tests). Under the CPU interpreter P=256: the same tiling over t,
    B and D and several projection blocks, at a quarter of the time CI would spend."""
    device = _device()
    z = torch.randn(4, 128, 192, device=device)
    A = ref.draw_projections(192, 1024 if device == "cuda" else 256, device=device)
    _check_parity(z, A, "fp32", what="real size")


@pytest.mark.parametrize("forward", ["tuple", "loop"])
def test_moment_sums_and_their_backward(forward, request):
    from lewm_fast.kernels import sigreg as kernel

    if forward == "loop":
        request.getfixturevalue("loop_forward")
    device = _device()
    z = torch.randn(3, 21, 30, device=device, requires_grad=True)
    A = ref.draw_projections(30, 40, device=device)
    t, phi, w = ref.sigreg_quadrature(17, device=device)
    grad = torch.randn(2, 3, 17, 40, device=device)
    sums = kernel.sigreg_trig_sums_op(z, A, phi, w, 3 / 16)
    (sums * grad).sum().backward()
    g_fast = z.grad.clone()
    z.grad = None
    expected = _trig_sums_torch(z, A, t)
    (expected * grad).sum().backward()
    assert_close(sums, expected, "fp32_gemm", "sums")
    assert_close(g_fast, z.grad, "fp32_gemm", "grad from sums")
    assert torch.equal(sums[0, :, 0], torch.full_like(sums[0, :, 0], 21.0))  # cos(0) counts rows


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_module_seeded_backends_agree(dtype_name):
    """The drop-in module draws the same directions whichever backend runs."""
    device = _device()
    z32 = torch.randn(3, 20, 24, device=device)

    def run(name, dtype):
        z = z32.to(dtype).clone().requires_grad_()
        torch.manual_seed(17)
        value = lewm_fast.SIGReg(num_proj=64, backend=name).to(device)(z)
        value.backward()
        return value.detach(), z.grad

    fast, torch_same = run("triton", DTYPES[dtype_name]), run("torch", DTYPES[dtype_name])
    if dtype_name == "fp32":
        assert_close(fast[0], torch_same[0], "fp32_gemm", "value")
        assert_close(fast[1], torch_same[1], "fp32_gemm", "grad")
    else:
        fp32 = run("torch", torch.float32)
        assert_low_precision(fast[0], torch_same[0], fp32[0], "value")
        assert_low_precision(fast[1], torch_same[1], fp32[1], "grad")


def test_forced_triton_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backend.BackendUnavailableError, match="sigreg"):
        lewm_fast.sigreg(torch.randn(2, 4, 8), ref.draw_projections(8, 16), backend="triton")


def test_auto_uses_reference_on_cpu(monkeypatch):
    from lewm_fast.kernels import sigreg as kernel

    def boom(*args, **kwargs):
        raise AssertionError("the fused kernel must not run for CPU tensors under 'auto'")

    monkeypatch.setattr(kernel, "sigreg_fwd", boom)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    lewm_fast.sigreg(torch.randn(2, 4, 8), ref.draw_projections(8, 16))


def test_too_many_knots_is_a_clear_error():
    z, A = torch.randn(2, 4, 8, device=_device()), ref.draw_projections(8, 16, device=_device())
    with pytest.raises(ValueError, match="2 to 32 knots"):
        lewm_fast.sigreg(z, A, knots=40, backend="triton")


def test_torch_library_registration():
    from lewm_fast.kernels import sigreg as kernel

    z = torch.randn(2, 9, 20, device=_device(), requires_grad=True)
    A = ref.draw_projections(20, 24, device=_device())
    _, phi, w = ref.sigreg_quadrature(17, device=_device())
    torch.library.opcheck(
        kernel.sigreg_op,
        (z, A, phi, w, 3 / 16),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(
        kernel.sigreg_trig_sums_op,
        (z, A, phi, w, 3 / 16),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_fake_gradients_have_the_kernels_strides():
    """The backward ops' fake implementations give grad_z and grad_A the strides the kernels
    return (contiguous) when z and A are not contiguous: z as the loss passes it, the
    (B, T, D) embeddings transposed to (T, B, D). Inductor checks its buffers' strides
    against the fake ones (a mismatch failed the compiled two_pass step on the GPU)."""
    from lewm_fast.kernels import sigreg as kernel

    T, B, D, P = 2, 3, 8, 4
    z = torch.randn(B, T, D, device=_device()).transpose(0, 1)
    A = torch.randn(P, D, device=_device()).t()
    _, phi, w = ref.sigreg_quadrature(17, device=_device())
    sums = kernel.sigreg_trig_sums_op(z, A, phi, w, 3 / 16)
    utils = ("test_schema", "test_faketensor")
    for need_grad_A in (False, True):
        args = (torch.ones((), device=_device()), z, A, sums, phi, w, 3 / 16, need_grad_A)
        torch.library.opcheck(kernel.sigreg_bwd_op, args, test_utils=utils)
        args = (torch.randn_like(sums), z, A, 3 / 16, need_grad_A)
        torch.library.opcheck(kernel.sigreg_trig_sums_bwd_op, args, test_utils=utils)


def test_module_on_another_device_than_proj_is_a_clear_error():
    """SIGReg whose buffers are not on proj's device raises, naming both devices, before any
    kernel runs, as the published module raises. Unchecked, the fused kernel read the
    buffers where they were: a Triton "cpu tensor?" error on the GPU, and a silent garbage
    value (~1e27) under the CPU interpreter with buffers on 'meta'."""
    z = torch.randn(2, 4, 8)
    with pytest.raises(RuntimeError, match=r"'t' is on meta but proj is on cpu.*sigreg\.to\('cpu'\)"):
        lewm_fast.SIGReg(num_proj=8, backend="triton").to("meta")(z)
    with pytest.raises(RuntimeError, match=r"is on cpu but proj is on meta.*sigreg\.to\('meta'\)"):
        lewm_fast.SIGReg(num_proj=8)(z.to("meta"))


def test_distributed_requires_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        lewm_fast.sigreg(torch.randn(2, 4, 8), ref.draw_projections(8, 16), distributed=True)


# ---------------------------------------------------------------- two processes


def _rank_main(rank, world, init_file, backend_name, out_dir, loop_forward=False):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.distributed as dist

    if loop_forward:
        from lewm_fast.kernels import sigreg as kernel

        _force_loop_forward(kernel)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    z_full = torch.randn(3, 9, 24)
    sizes = [4, 5]  # uneven shards: the global batch size must come from the all-reduce
    start = sum(sizes[:rank])
    z = z_full[:, start : start + sizes[rank]].clone().requires_grad_()
    torch.manual_seed(100 + rank)  # different generators per rank; the module broadcasts rank 0's draw
    value = lewm_fast.SIGReg(num_proj=40, backend=backend_name)(z)
    value.backward()
    torch.save({"value": value.detach(), "grad": z.grad, "start": start}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "backend_name,loop",
    [("torch", False), ("triton", False), ("triton", True)],
    ids=["torch", "triton", "triton-loop-forward"],
)
def test_two_gloo_processes_equal_one_process(tmp_path, backend_name, loop):
    import torch.multiprocessing as mp

    args = (2, str(tmp_path / "init"), backend_name, str(tmp_path), loop)
    mp.spawn(_rank_main, args=args, nprocs=2, join=True)
    torch.manual_seed(0)
    z = torch.randn(3, 9, 24, requires_grad=True)
    torch.manual_seed(100)
    value = lewm_fast.SIGReg(num_proj=40, backend="torch")(z)
    value.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    grad = torch.cat([r["grad"] for r in results], dim=1)
    for r in results:
        assert_close(r["value"], value.detach(), "fp32_gemm", "per-rank value")
    assert_close(grad, z.grad, "fp32_gemm", "gathered gradient")


# ---------------------------------------------------------------- GPU


# The training size (T=4, B=128, D=192, P=1024) and B=1: Triton specialises an integer
# argument equal to 1 into a constant, which the CPU interpreter never does.
REAL_SIZE_CASES = [
    pytest.param("fp32", 128, marks=pytest.mark.smoke, id="fp32-B128"),
    pytest.param("bf16", 128, marks=pytest.mark.smoke, id="bf16-B128"),
    pytest.param("fp16", 128, id="fp16-B128"),
    pytest.param("fp32", 1, marks=pytest.mark.smoke, id="fp32-B1"),
    pytest.param("bf16", 1, marks=pytest.mark.smoke, id="bf16-B1"),
    pytest.param("fp16", 1, id="fp16-B1"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name,b", REAL_SIZE_CASES)
def test_real_size_parity_on_gpu(dtype_name, b, smoke_line):
    z = torch.randn(4, b, 192, device="cuda")
    A = ref.draw_projections(192, 1024, device="cuda")
    errors = _check_parity(z, A, dtype_name, what=f"real size B={b}")
    smoke_line("relative error " + ", ".join(f"{name} {err:.1e}" for name, err in errors.items()))


@pytest.mark.gpu
def test_cuda_graph_capture():
    z = torch.randn(4, 128, 192, device="cuda", requires_grad=True)
    A = ref.draw_projections(192, 1024, device="cuda")
    lewm_fast.sigreg(z, A, backend="triton").backward()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    z.grad = None
    with torch.cuda.graph(graph):
        value = lewm_fast.sigreg(z, A, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert_close(value, lewm_fast.sigreg(z, A, backend="torch"), "fp32_gemm", "captured value")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_entry_points_equal_the_custom_ops_bit_for_bit(dtype_name):
    """statistic / trig_sums skip the torch.library dispatch outside tracing
    (kernels/_eager.py) but run the same launchers: values and the gradients of z and A
    equal the custom ops' exactly; without grad they return the same values."""
    from lewm_fast.kernels import sigreg as kernel

    device, dtype = _device(), DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(9)
    z0 = torch.randn(2, 11, 24, generator=gen).to(device, dtype)
    A0 = torch.nn.functional.normalize(torch.randn(24, 20, generator=gen), dim=0).to(device)
    _, phi, w = ref.sigreg_quadrature(17, device=device)
    weight = torch.randn(2, 2, 17, 20, generator=gen).to(device)
    pairs = [
        ("statistic", kernel.sigreg_op, kernel.statistic, lambda out: out[0]),
        ("trig_sums", kernel.sigreg_trig_sums_op, kernel.trig_sums, lambda out: (out * weight).sum()),
    ]
    for name, op, entry, loss in pairs:
        results = []
        for fn in (op, entry):
            z, A = z0.clone().requires_grad_(), A0.clone().requires_grad_()
            out = fn(z, A, phi, w, 3 / 16)
            loss(out).backward()
            value = out[0] if isinstance(out, tuple) else out
            results.append((value.detach(), z.grad, A.grad))
        for what, a, b in zip(("value", "grad z", "grad A"), *results):
            assert torch.equal(a, b), f"{name}: {what} differs"
        with torch.no_grad():
            bare, custom = entry(z0, A0, phi, w, 3 / 16), op(z0, A0, phi, w, 3 / 16)
        assert torch.equal(
            bare[0] if isinstance(bare, tuple) else bare, custom[0] if isinstance(custom, tuple) else custom
        )
