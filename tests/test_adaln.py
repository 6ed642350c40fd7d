"""The fused AdaLN-Zero kernels against the eager chain of lewm_fast.reference.

Outputs and every gradient (x, shift, scale, the affine weight and bias; gate and branch
of the gated residual), float32 and bfloat16, odd and real shapes. On CPU the Triton
kernels run under TRITON_INTERPRET=1 (set in conftest).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import model_pair, published_grads, randomize_, small_config

import lewm_fast
from lewm_fast import backend
from lewm_fast import reference as ref
from lewm_fast.testing import assert_close, assert_grads_close, assert_low_precision

pytest.importorskip("triton")
from lewm_fast.kernels import adaln  # noqa: E402


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _eager(x, shift, scale, weight, bias):
    """The reference chain: plain LayerNorm (1e-6) -> modulate -> affine LayerNorm (1e-5).

    With low-precision activations and float32 affine parameters the affine LayerNorm runs
    in float32 and rounds its output to the activations' dtype: what the CPU kernel does for
    mixed dtypes, spelled out because CUDA's layer_norm rejects them."""
    h = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    m = ref.modulate(h, shift, scale)
    if m.dtype == weight.dtype:
        return F.layer_norm(m, (x.shape[-1],), weight, bias, eps=1e-5)
    return F.layer_norm(m.float(), (x.shape[-1],), weight, bias, eps=1e-5).to(m.dtype)


def _fused(x, shift, scale, weight, bias):
    return adaln.adaln_op(x, shift, scale, weight, bias, 1e-6, 1e-5, x.dtype)[0]


def _inputs(shape, x_dtype, mod_dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = torch.randn(shape, generator=gen).to(device, x_dtype)
    # shift and scale as chunks of one modulation tensor, as in ConditionalBlock
    mod = (0.5 * torch.randn(*shape[:-1], 2 * D, generator=gen)).to(device, mod_dtype)
    weight = (1 + 0.3 * torch.randn(D, generator=gen)).to(device)
    bias = (0.3 * torch.randn(D, generator=gen)).to(device)
    dy = torch.randn(shape, generator=gen).to(device)
    return x, mod, weight, bias, dy


def _run(fn, x, mod, weight, bias, dy, dtypes=None):
    if dtypes is not None:
        x, mod = x.to(dtypes[0]), mod.to(dtypes[1])
    leaves = [t.detach().clone().requires_grad_() for t in (x, mod, weight, bias)]
    x, mod, weight, bias = leaves
    shift, scale = mod.chunk(2, dim=-1)
    y = fn(x, shift, scale, weight, bias)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _compare(names, fused, ref32, low=None) -> float:
    """float32 (``low`` None): elementwise parity with ``ref32``; else the low-precision bound
    against ``ref32`` and the same-dtype eager ``low``. Returns the largest relative error."""
    if low is None:
        return max(assert_close(a, b, "fp32_elementwise", name) for name, a, b in zip(names, fused, ref32))
    return max(assert_low_precision(a, b, c, name) for name, a, b, c in zip(names, fused, low, ref32))


NAMES = ("y", "dx", "d(shift, scale)", "dweight", "dbias")
SHAPES = [  # (id, shape)
    ("B2-T3-D192", (2, 3, 192)),
    ("B1-T1-D191", (1, 1, 191)),
    ("B5-T7-D33", (5, 7, 33)),
    ("train-B128-T3-D192", (128, 3, 192)),
    ("B2-T2-D2048", (2, 2, 2048)),
]
DTYPE_CASES = {  # id: (x dtype, modulation dtype); "fp32+bf16" is what bf16 autocast produces
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp32+bf16": (torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("dtypes", list(DTYPE_CASES), ids=list(DTYPE_CASES))
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_modulate_norm_matches_eager(shape, dtypes):
    _check_modulate_norm(shape, dtypes)


def _check_modulate_norm(shape, dtypes) -> float:
    x_dtype, mod_dtype = DTYPE_CASES[dtypes]
    inputs = _inputs(shape, torch.float32, torch.float32, _device())
    fused = _run(_fused, *inputs, dtypes=(x_dtype, mod_dtype))
    ref32 = _run(_eager, *inputs)
    low = None if dtypes == "fp32" else _run(_eager, *inputs, dtypes=(x_dtype, mod_dtype))
    err = _compare(NAMES, fused, ref32, low)
    assert fused[0].dtype == x_dtype and fused[2].dtype == mod_dtype
    return err


@pytest.mark.parametrize("dtypes", list(DTYPE_CASES), ids=list(DTYPE_CASES))
@pytest.mark.parametrize("shape", [(2, 3, 192), (1, 1, 191), (3, 5, 40)], ids=["D192", "D191", "D40"])
def test_gated_residual_matches_eager(shape, dtypes):
    _check_gated_residual(shape, dtypes)


def _check_gated_residual(shape, dtypes) -> float:
    x_dtype, mod_dtype = DTYPE_CASES[dtypes]
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(shape, generator=gen).to(_device()) for _ in range(4)]

    def run(fn, dt):
        x, gate, y = (base[i].to(d).clone().requires_grad_() for i, d in ((0, dt[0]), (1, dt[1]), (2, dt[1])))
        out = fn(x, gate, y)
        out.backward(base[3].to(out.dtype))
        return [out.detach(), x.grad, gate.grad, y.grad]

    names = ("out", "dx", "dgate", "dy")
    fused = run(adaln.gated_residual_op, (x_dtype, mod_dtype))
    ref32 = run(lambda x, g, y: x + g * y, (torch.float32, torch.float32))
    low = None if dtypes == "fp32" else run(lambda x, g, y: x + g * y, (x_dtype, mod_dtype))
    err = _compare(names, fused, ref32, low)
    if low is not None:
        assert fused[0].dtype == low[0].dtype
    return err


GATED_ADALN_NAMES = ("out", "y", "dx", "dgate", "dres", "dshift", "dscale", "dweight", "dbias")


@pytest.mark.parametrize("dtypes", list(DTYPE_CASES), ids=list(DTYPE_CASES))
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_gated_adaln_matches_the_two_ops(shape, dtypes):
    """out = x + gate * res and y = modulate-norm(out), fused: both outputs and all seven
    gradients (both outputs carry a gradient, as in a block) against the eager chain."""
    _check_gated_adaln(shape, dtypes)


def _check_gated_adaln(shape, dtypes) -> float:
    x_dtype, mod_dtype = DTYPE_CASES[dtypes]
    gen = torch.Generator().manual_seed(5)
    D = shape[-1]
    x, res, dout, dy = (torch.randn(shape, generator=gen).to(_device()) for _ in range(4))
    mod = (0.5 * torch.randn(*shape[:-1], 3 * D, generator=gen)).to(_device())
    weight = (1 + 0.3 * torch.randn(D, generator=gen)).to(_device())
    bias = (0.3 * torch.randn(D, generator=gen)).to(_device())

    def run(fused, dt):
        pairs = ((x, dt[0]), (res, dt[1]), (mod, dt[1]), (weight, torch.float32), (bias, torch.float32))
        leaves = [t.to(d).detach().clone().requires_grad_() for t, d in pairs]
        lx, lres, lmod, lw, lb = leaves
        gate, shift, scale = lmod.chunk(3, dim=-1)  # strided chunks, as the modulation arrives
        if fused:
            promoted = torch.promote_types(torch.promote_types(lx.dtype, gate.dtype), lres.dtype)
            out, y, _ = adaln.gated_adaln_op(lx, gate, lres, shift, scale, lw, lb, 1e-6, 1e-5, promoted)
        else:
            out = lx + gate * lres
            y = _eager(out, shift, scale, lw, lb)
        torch.autograd.backward((out, y), (dout.to(out.dtype), dy.to(y.dtype)))
        dgate, dshift, dscale = lmod.grad.chunk(3, dim=-1)
        return [out.detach(), y.detach(), lx.grad, dgate, lres.grad, dshift, dscale, lw.grad, lb.grad]

    fused = run(True, (x_dtype, mod_dtype))
    ref32 = run(False, (torch.float32, torch.float32))
    low = None if dtypes == "fp32" else run(False, (x_dtype, mod_dtype))
    err = _compare(GATED_ADALN_NAMES, fused, ref32, low)
    if low is not None:
        assert fused[0].dtype == low[0].dtype and fused[1].dtype == low[1].dtype
    assert fused[2].dtype == x_dtype and fused[3].dtype == mod_dtype
    return err


def test_gated_adaln_op_registration():
    """The torch.library op passes opcheck (schema, fake tensor, autograd registration)."""
    gen = torch.Generator().manual_seed(6)
    x, gate, res, shift, scale = (torch.randn(3, 5, 24, generator=gen).to(_device()) for _ in range(5))
    weight, bias = torch.randn(24, generator=gen).to(_device()), torch.randn(24, generator=gen).to(_device())
    args = [t.requires_grad_() for t in (x, gate, res, shift, scale, weight, bias)]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(adaln.gated_adaln_op, (*args, 1e-6, 1e-5, torch.float32), test_utils=utils)
    torch.library.opcheck(adaln.gated_adaln_op, (*args, 1e-6, 1e-5, torch.bfloat16), test_utils=utils)


def _block_pair(dim=48, heads=4, dim_head=12, mlp_dim=80, dropout=0.0):
    fast = lewm_fast.ConditionalBlock(dim, heads, dim_head, mlp_dim, dropout, backend="triton")
    randomize_(fast)
    slow = ref.ConditionalBlock(dim, heads, dim_head, mlp_dim, dropout)
    slow.load_state_dict(fast.state_dict())
    return fast.to(_device()), slow.to(_device())


def _block_grads(block, x, c, autocast=False):
    block.zero_grad(set_to_none=True)
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = block(x, c)
    out.float().square().sum().backward()
    grads = {"x": x.grad, "c": c.grad, **{n: p.grad.clone() for n, p in block.named_parameters()}}
    return out.detach().float(), grads


@pytest.mark.parametrize("shape", [(4, 3, 48), (1, 1, 48)], ids=["B4-T3", "B1-T1"])
def test_conditional_block_fp32(shape):
    fast, slow = _block_pair()
    x, c = torch.randn(shape, device=_device()), torch.randn(shape, device=_device())
    out_f, grads_f = _block_grads(fast.train(), x, c)
    out_s, grads_s = _block_grads(slow.train(), x, c)
    assert_close(out_f, out_s, "fp32_gemm", "block output")
    assert_grads_close(grads_f, grads_s, "fp32_gemm")


def test_conditional_block_bf16_autocast():
    fast, slow = _block_pair()
    x, c = torch.randn(4, 3, 48, device=_device()), torch.randn(4, 3, 48, device=_device())
    out_f, grads_f = _block_grads(fast, x, c, autocast=True)
    out_s, grads_s = _block_grads(slow, x, c, autocast=True)
    out_32, grads_32 = _block_grads(slow, x, c)
    assert_low_precision(out_f, out_s, out_32, "block output")
    for name in grads_f:
        assert_low_precision(grads_f[name], grads_s[name], grads_32[name], f"grad {name}")


def test_conditional_block_with_dropout_runs_and_differs_from_eval():
    fast, _ = _block_pair(dropout=0.1)
    x, c = torch.randn(4, 3, 48, device=_device()), torch.randn(4, 3, 48, device=_device())
    with torch.no_grad():
        assert not torch.equal(fast.train()(x, c), fast.eval()(x, c))


def test_jepa_with_fused_blocks_matches_reference():
    config = small_config()
    public, reference = model_pair(config)
    for block in public.predictor.transformer.layers:
        block.backend = "triton"
    public.to(_device()).train()
    reference.to(_device()).train()
    batch = {
        "pixels": torch.randn(3, 4, 3, 56, 56, device=_device()),
        "action": torch.randn(3, 4, 10, device=_device()),
    }
    losses = []
    for model in (public, reference):
        torch.manual_seed(0)
        out = ref.jepa_loss(model, lewm_fast.SIGReg(num_proj=32, backend="torch").to(_device()), batch)
        out["loss"].backward()
        losses.append(out)
    for key in ("pred_loss", "sigreg_loss", "loss"):
        assert_close(losses[0][key], losses[1][key], "fp32_gemm", key)
    assert_grads_close(
        published_grads(public),
        published_grads(reference),
        "fp32_gemm",
    )


def test_forced_triton_without_cuda_or_interpreter_raises(monkeypatch):
    fast, _ = _block_pair()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backend.BackendUnavailableError, match="adaln_modulate"):
        fast.cpu()(torch.randn(1, 2, 48), torch.randn(1, 2, 48))


def test_auto_on_cpu_uses_the_eager_chain(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("fused kernels must not run for CPU tensors under 'auto'")

    monkeypatch.setattr(adaln, "adaln_fwd", boom)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    block = randomize_(lewm_fast.ConditionalBlock(48, 4, 12, 80))
    block(torch.randn(2, 3, 48), torch.randn(2, 3, 48))


def test_too_wide_rows_are_a_clear_error():
    x = torch.randn(1, 1, adaln.MAX_D + 1, device=_device())
    w = torch.ones(adaln.MAX_D + 1, device=_device())
    with pytest.raises(ValueError, match="at most|1 to 2048"):
        _fused(x, x, x, w, w)


def test_mismatched_shapes_are_a_clear_error():
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="expected tensors of shape"):
        _fused(x, torch.randn(2, 1, 16), x, torch.ones(16), torch.zeros(16))


def test_torch_library_registration():
    device = _device()
    x, mod, w, b, _ = _inputs((2, 3, 24), torch.float32, torch.float32, device)
    shift, scale = mod.chunk(2, dim=-1)
    args = (x.requires_grad_(), shift.contiguous().requires_grad_(), scale.contiguous(), w, b, 1e-6, 1e-5)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for out_dtype in (torch.float32, torch.bfloat16):  # the branch input's dtype: x's, or the GEMM's
        torch.library.opcheck(adaln.adaln_op, (*args, out_dtype), test_utils=utils)
    others = (torch.randn(2, 3, 24, device=device), torch.randn(2, 3, 24, device=device))
    torch.library.opcheck(adaln.gated_residual_op, (x, *others), test_utils=utils)


# ------------------------------------------------------------------ the public functional form

FUNCTIONAL_CASES = [  # (id, x shape, shape of shift/scale/gate, affine weight and bias)
    ("B2-T3-D33", (2, 3, 33), (2, 3, 33), True),
    ("N5-D17-no-affine", (5, 17), (5, 17), False),
    ("B2-T3-D24-per-sequence", (2, 3, 24), (2, 1, 24), True),  # DiT's (B, 1, D) modulation
]


def _functional(name, x, shift, scale, gate, res, weight, bias):
    """Every functional form on the same leaves, with the given backend."""
    y = lewm_fast.adaln_modulate(x, shift, scale, weight, bias, backend=name)
    r = lewm_fast.gated_residual(x, gate, res, backend=name)
    out, y2 = lewm_fast.gated_adaln_modulate(x, gate, res, shift, scale, weight, bias, backend=name)
    return y, r, out, y2


@pytest.mark.parametrize(
    "x_shape,mod_shape,affine", [c[1:] for c in FUNCTIONAL_CASES], ids=[c[0] for c in FUNCTIONAL_CASES]
)
def test_functional_backends_agree(x_shape, mod_shape, affine):
    """lewm_fast.adaln_modulate, gated_residual and gated_adaln_modulate: the fused ops and
    the PyTorch formula agree on every output and every gradient, broadcast modulation and
    no affine included."""
    gen = torch.Generator().manual_seed(8)
    D = x_shape[-1]
    shapes = (x_shape, mod_shape, mod_shape, mod_shape, x_shape) + (((D,), (D,)) if affine else ())
    base = [torch.randn(shape, generator=gen).to(_device()) for shape in shapes]
    grads = [torch.randn(x_shape, generator=gen).to(_device()) for _ in range(4)]
    results = {}
    for name in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in base]
        weight, bias = leaves[5:] if affine else (None, None)
        outputs = _functional(name, *leaves[:5], weight, bias)
        torch.autograd.backward(outputs, grads)
        results[name] = [o.detach() for o in outputs] + [t.grad for t in leaves]
    names = ("y", "gated", "out", "y after gated", "dx", "dshift", "dscale", "dgate", "dres", "dw", "db")
    for name, fast, slow in zip(names, results["triton"], results["torch"]):
        assert_close(fast, slow, "fp32_elementwise", name)
    assert results["torch"][0].shape == x_shape


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_branch_input_written_in_the_dtype_the_gemm_reads(backend_name):
    """out_dtype=bf16 from an fp32 residual stream: y is the fp32 result rounded once (what the
    next Linear under autocast would cast it to), so bf16 planning has no cast kernel; the
    gradients reach x, shift and scale in their own dtypes."""
    x, mod, weight, bias, dy = _inputs((3, 5, 40), torch.float32, torch.float32, _device(), seed=3)
    leaves = [t.detach().clone().requires_grad_() for t in (x, mod, weight, bias)]
    shift, scale = leaves[1].chunk(2, dim=-1)
    y = lewm_fast.adaln_modulate(
        leaves[0], shift, scale, leaves[2], leaves[3], out_dtype=torch.bfloat16, backend=backend_name
    )
    out, y2 = lewm_fast.gated_adaln_modulate(
        leaves[0], shift, shift, shift, scale, out_dtype=torch.bfloat16, backend=backend_name
    )
    assert y.dtype == y2.dtype == torch.bfloat16 and out.dtype == torch.float32
    want = _eager(x, *mod.chunk(2, dim=-1), weight, bias)
    # the same fp32 value rounded to bf16: at most one bf16 step apart where fp32 noise flips it
    torch.testing.assert_close(y.float(), want.to(torch.bfloat16).float(), atol=1e-2, rtol=2**-7)
    torch.autograd.backward((y, y2), (dy.to(torch.bfloat16), dy.to(torch.bfloat16)))
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
    with torch.autocast(_device(), dtype=torch.bfloat16):
        assert lewm_fast.adaln.autocast_dtype(x) is torch.bfloat16
    assert lewm_fast.adaln.autocast_dtype(x) is None


def test_conditional_block_feeds_its_gemms_in_the_autocast_dtype():
    fast, _ = _block_pair()
    x = torch.randn(2, 3, 48, device=_device())
    shift, scale = torch.randn(2, 2, 3, 48, device=_device()).unbind(0)
    with torch.autocast(_device(), dtype=torch.bfloat16):
        assert fast.attn_input(x, shift, scale).dtype == torch.bfloat16
        assert fast.gated_mlp_input(x, shift, x, shift, scale)[1].dtype == torch.bfloat16
    assert fast.attn_input(x, shift, scale).dtype == torch.float32


def test_functional_torch_backend_is_the_reference_chain():
    x, mod, weight, bias, _ = _inputs((2, 3, 24), torch.float32, torch.float32, "cpu")
    shift, scale = mod.chunk(2, dim=-1)
    y = lewm_fast.adaln_modulate(x, shift, scale, weight, bias, backend="torch")
    assert torch.equal(y, _eager(x, shift, scale, weight, bias))


BAD_CALLS = [  # (id, call, error, message)
    ("shift-shape", lambda x: lewm_fast.adaln_modulate(x, x[..., :15], x), ValueError, "shift .* broadcast"),
    ("integer-x", lambda x: lewm_fast.adaln_modulate(x.long(), x, x), ValueError, "floating point"),
    ("weight-shape", lambda x: lewm_fast.adaln_modulate(x, x, x, x[0, 0, :15]), ValueError, "weight must"),
    ("y-not-a-tensor", lambda x: lewm_fast.gated_residual(x, x, 1.0), ValueError, "y must be a torch.Tensor"),
    ("res-shape", lambda x: lewm_fast.gated_adaln_modulate(x, x, x[:1, :2], x, x), ValueError, "res "),
    (
        "no-cuda-backend",
        lambda x: lewm_fast.gated_residual(x, x, x, backend="cuda"),
        backend.BackendUnavailableError,
        "no 'cuda'",
    ),
    (
        "unknown-backend",
        lambda x: lewm_fast.adaln_modulate(x, x, x, backend="fast"),
        ValueError,
        "backend must be",
    ),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_functional_rejects_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(2, 3, 16))


def test_functional_forced_triton_on_too_wide_rows_raises():
    x = torch.randn(1, 2, adaln.MAX_D + 1, device=_device())
    with pytest.raises(backend.BackendUnavailableError, match="gated_residual: .* at most 2048"):
        lewm_fast.gated_residual(x, x, x, backend="triton")
    assert torch.equal(lewm_fast.gated_residual(x, x, x, backend="torch"), x + x * x)


PLANNING, TRAINING = (15000, 3, 192), (128, 3, 192)  # 300 samples x 50 envs; batch 128
REAL_SIZE_CASES = [
    pytest.param(PLANNING, "fp32", marks=pytest.mark.smoke, id="planning-fp32"),
    pytest.param(PLANNING, "bf16", marks=pytest.mark.smoke, id="planning-bf16"),
    pytest.param(PLANNING, "fp32+bf16", id="planning-fp32+bf16"),
    pytest.param(TRAINING, "fp32", id="training-fp32"),
    pytest.param(TRAINING, "bf16", id="training-bf16"),
    pytest.param(TRAINING, "fp32+bf16", marks=pytest.mark.smoke, id="training-fp32+bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtypes", REAL_SIZE_CASES)
def test_real_sizes_on_gpu(shape, dtypes, smoke_line):
    """Modulate-norm, gated residual and the fused pair, outputs and every gradient."""
    errors = {
        "modulate-norm": _check_modulate_norm(shape, dtypes),
        "gated residual": _check_gated_residual(shape, dtypes),
        "gated adaln": _check_gated_adaln(shape, dtypes),
    }
    smoke_line("largest relative error " + ", ".join(f"{name} {err:.1e}" for name, err in errors.items()))


@pytest.mark.gpu
@pytest.mark.smoke
def test_paper_predictor_on_gpu_matches_eager(smoke_line):
    config = lewm_fast.LeWMConfig.preset("paper")
    fast = randomize_(config.build(backend="triton").predictor).cuda().eval()
    slow = (
        ref.ARPredictor(
            **{
                k: getattr(config.predictor, k)
                for k in (
                    "num_frames",
                    "depth",
                    "heads",
                    "mlp_dim",
                    "input_dim",
                    "hidden_dim",
                    "output_dim",
                    "dim_head",
                    "dropout",
                    "emb_dropout",
                )
            }
        )
        .cuda()
        .eval()
    )
    slow.load_state_dict(fast.state_dict())
    x, c = torch.randn(300, 3, 192, device="cuda"), torch.randn(300, 3, 192, device="cuda")
    with torch.no_grad():
        err = assert_close(fast(x, c), slow(x, c), "fp32_gemm", "paper predictor")
    smoke_line(f"relative error {err:.1e}")


def test_planning_cost_runs_the_fused_blocks(monkeypatch):
    """The planner's KV-cached rollout with the one-kernel block step off (``step_kernel =
    False``; tests/test_plan.py covers the block kernel) goes through the blocks' fused
    AdaLN-Zero pieces and still gives the reference get_cost."""
    from lewm_fast.plan import planning_cost

    public, reference = (m.to(_device()).eval() for m in model_pair(small_config()))
    for block in public.predictor.transformer.layers:
        block.backend, block.step_kernel = "triton", False
    calls = []
    original = adaln.adaln_fwd
    monkeypatch.setattr(adaln, "adaln_fwd", lambda *a, **k: calls.append(1) or original(*a, **k))
    frames = torch.randn(2, 1, 3, 56, 56, device=_device())
    goal = torch.randn(2, 1, 3, 56, 56, device=_device())
    cand = torch.randn(2, 5, 5, 10, device=_device())
    expand = {k: v.unsqueeze(1).expand(2, 5, 1, 3, 56, 56) for k, v in (("pixels", frames), ("goal", goal))}
    with torch.no_grad():
        fast = planning_cost(public, {"pixels": frames, "goal": goal}, cand)
        expected = reference.get_cost(expand, cand)
    assert calls, "the fused AdaLN kernel did not run"
    assert_close(fast, expected, "fp32_gemm", "planning cost with fused blocks")


def test_torch_backend_low_precision_x_with_float32_affine_is_the_cpu_kernel():
    """Low-precision x with float32 weight and bias: the torch backend normalises in float32
    and rounds to x's dtype on every device (CUDA's layer_norm rejects the mix), which is
    bit for bit what CPU's layer_norm does with the mix."""
    x_dtype = torch.bfloat16
    x, mod, weight, bias, _ = _inputs((3, 5, 40), torch.float32, torch.float32, "cpu", seed=4)
    x, mod = x.to(x_dtype), mod.to(x_dtype)
    shift, scale = mod.chunk(2, dim=-1)
    y = lewm_fast.adaln_modulate(x, shift, scale, weight, bias, backend="torch")
    h = ref.modulate(F.layer_norm(x, (40,), eps=1e-6), shift, scale)
    assert y.dtype == x_dtype
    assert torch.equal(y, F.layer_norm(h, (40,), weight, bias, eps=1e-5))


def _op_calls(dtype):
    """(name, custom-op call, entry-point call, number of outputs) for the three fused ops."""
    gen = torch.Generator().manual_seed(11)
    D = 40
    x, gate, res = (torch.randn(3, 5, D, generator=gen).to(dtype) for _ in range(3))
    shift, scale = (0.5 * torch.randn(3, 5, 2 * D, generator=gen).to(dtype)).chunk(2, dim=-1)
    weight, bias = 1 + 0.3 * torch.randn(D, generator=gen), 0.3 * torch.randn(D, generator=gen)
    norm = (x, shift, scale, weight, bias, 1e-6, 1e-5, dtype)
    both = (x, gate, res, shift, scale, weight, bias, 1e-6, 1e-5, dtype)
    return [
        ("adaln", adaln.adaln_op, adaln.adaln, norm),
        ("gated_residual", adaln.gated_residual_op, adaln.gated_residual, (x, gate, res)),
        ("gated_adaln", adaln.gated_adaln_op, adaln.gated_adaln, both),
    ]


def _outputs_and_grads(fn, args):
    args = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    floating = [o for o in outs if o.requires_grad]
    torch.autograd.backward(floating, [torch.ones_like(o) for o in floating])
    return [o.detach() for o in outs] + [a.grad for a in args if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_entry_points_equal_the_custom_ops_bit_for_bit(dtype):
    """adaln / gated_residual / gated_adaln skip the torch.library dispatch outside tracing
    (kernels/_eager.py) but run the same launchers: outputs and every gradient equal the
    custom op's exactly, with and without grad mode."""
    for name, op, entry, args in _op_calls(dtype):
        want, got = _outputs_and_grads(op, args), _outputs_and_grads(entry, args)
        for i, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(a, b), f"{name}: output/gradient {i} differs"
        with torch.no_grad():
            bare, custom = entry(*args), op(*args)
        for a, b in zip(
            bare if isinstance(bare, tuple) else (bare,), custom if isinstance(custom, tuple) else (custom,)
        ):
            assert torch.equal(a, b), f"{name}: no-grad output differs"


def test_entry_points_use_the_custom_op_under_a_dispatch_mode():
    """Inside a TorchDispatchMode (the fake mode and kernel counter of bench/perf_model.py,
    torch.compile's tracing) the call reaches the dispatcher as lewm_fast::<op>; outside one
    the launchers run directly. A double backward raises instead of being silently wrong."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lewm_fast.kernels import _eager

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    for name, _, entry, args in _op_calls(torch.float32):
        assert not _eager.tracing([a for a in args if isinstance(a, torch.Tensor)])
        with Seen() as seen:
            entry(*args)
        assert f"lewm_fast.{name}" in seen.ops or f"lewm_fast::{name}" in seen.ops, (name, seen.ops)
    x = torch.randn(2, 3, 8, requires_grad=True)
    out = adaln.gated_residual(x, torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 8))
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiable"):
        grad.sum().backward()
