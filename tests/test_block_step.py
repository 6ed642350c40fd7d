"""lewm_fast::block_step (one ConditionalBlock step of planning) against lewm_fast.reference.

The reference runs the whole window (the cached earlier tokens and the new ones) through a
ConditionalBlock with random weights (its AdaLN-Zero modulation re-randomised too); the
kernel gets the new tokens, their modulation and a cache holding the earlier tokens' keys
and values, and must give the window's output at the new positions and write the new
keys and values into the cache (nothing else). Float32 weights at the float32 GEMM
tolerance, half-precision Linear weights at the low-precision bound; the real block at a
few candidates and odd shapes. On CPU the kernel runs under TRITON_INTERPRET=1 (conftest).
"""

import copy

import pytest
import torch
from helpers import randomize_

from lewm_fast import reference as ref
from lewm_fast.testing import assert_close, assert_low_precision

pytest.importorskip("triton")
from lewm_fast.kernels import block_step as bs  # noqa: E402

REAL = (192, 16, 64, 2048)  # (D, heads, dim_head, mlp_dim) of the LeWM predictor
ODD48 = (48, 3, 16, 100)
ODD20 = (20, 2, 10, 33)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _block(shape, seed=0):
    D, heads, dim_head, mlp_dim = shape
    torch.manual_seed(seed)
    return randomize_(ref.ConditionalBlock(D, heads, dim_head, mlp_dim), seed).eval().to(_device())


def _weights(block, dtype):
    """The kernel's weight arguments: Linear weights and biases in ``dtype`` (the planner
    casts the Linear layers), LayerNorm parameters as they are (float32)."""
    a, m = block.attn, block.mlp
    lin = [a.to_qkv.weight, a.to_out[0].weight, a.to_out[0].bias]
    lin = [t.detach().to(dtype) for t in lin]
    mlp = [t.detach().to(dtype) for t in (m.net[1].weight, m.net[1].bias, m.net[4].weight, m.net[4].bias)]
    norms = [t.detach() for t in (a.norm.weight, a.norm.bias, m.net[0].weight, m.net[0].bias)]
    return (*lin, *norms, *mlp)


def _step(block, x, mod, k_cache, v_cache, past, dtype, fn=bs.block_step, kv_only=False):
    a = block.attn
    eps = (block.norm1.eps, a.norm.eps, block.norm2.eps, block.mlp.net[0].eps)
    return fn(x, mod, k_cache, v_cache, past, *_weights(block, dtype), a.heads, a.dim_head, *eps, kv_only)


class Window:
    """A window of ``past + t`` tokens for N candidates, its reference output and keys/values."""

    def __init__(self, block, N, past, t, seed=1):
        gen = torch.Generator().manual_seed(seed)
        D, dev = block.norm1.normalized_shape[0], _device()
        self.X = torch.randn(N, past + t, D, generator=gen).to(dev)
        self.C = torch.randn(N, past + t, D, generator=gen).to(dev)
        with torch.no_grad():
            self.mods = block.adaLN_modulation(self.C)  # (N, W, 6D)
            self.out = block(self.X, self.C)  # (N, W, D)
            shift, scale = self.mods.chunk(6, dim=-1)[:2]
            _, self.k, self.v = block.attn.to_qkv(block.attn_input(self.X, shift, scale)).chunk(3, dim=-1)
        self.block, self.N, self.past, self.t = block, N, past, t

    def inputs(self, x_dtype, mod_dtype, cache_dtype, L=None, seed=2):
        """x and mod as views into bigger tensors (as the planner slices them), and caches of
        length L with arbitrary outer strides: positions < past hold the reference keys and
        values, the rest random values (which must survive outside past .. past + t - 1)."""
        N, past, t = self.N, self.past, self.t
        D, inner = self.X.shape[-1], self.k.shape[-1]
        L = L or past + t + 1
        gen = torch.Generator().manual_seed(seed)
        dev = self.X.device
        x = self.X.to(x_dtype)[:, past:]
        big = torch.randn(N, past + t, 18 * D, generator=gen).to(dev, mod_dtype)
        big[..., 6 * D : 12 * D] = self.mods.to(mod_dtype)
        mod = big[:, past:, 6 * D : 12 * D]
        k_cache = torch.randn(3, N, L, inner, generator=gen).to(dev, cache_dtype)[
            1
        ]  # a (depth, N, L, inner) slice
        v_cache = (
            torch.randn(L, N, inner, generator=gen).to(dev, cache_dtype).transpose(0, 1)
        )  # (N, L, inner)
        k_cache[:, :past] = self.k[:, :past].to(cache_dtype)
        v_cache[:, :past] = self.v[:, :past].to(cache_dtype)
        return x, mod, k_cache, v_cache


def _check_cache(win, before, after, new_ref, kind):
    """Positions past .. past+t-1 hold the reference keys/values (rounded), the rest are untouched."""
    past, t = win.past, win.t
    assert torch.equal(after[:, :past], before[:, :past])
    assert torch.equal(after[:, past + t :], before[:, past + t :])
    assert after.dtype == before.dtype
    if kind == "fp32_gemm":
        assert_close(after[:, past : past + t], new_ref, kind, "cache")
    else:
        assert_close(after[:, past : past + t], new_ref.to(after.dtype), "bf16", "cache")


# (id, block shape, N, past, t, Linear weight dtype, x dtype, mod dtype)
CASES = [
    ("real-fp32-N5-past0-t1", REAL, 5, 0, 1, "fp32", "fp32", "fp32"),
    ("real-fp32-N3-past2-t1", REAL, 3, 2, 1, "fp32", "fp32", "fp32"),
    ("real-bf16-N5-past1-t1", REAL, 5, 1, 1, "bf16", "bf16", "bf16"),
    ("real-bf16-xfp32-N3-past0-t3", REAL, 3, 0, 3, "bf16", "fp32", "bf16"),
    ("D48-fp32-N19-past0-t1", ODD48, 19, 0, 1, "fp32", "fp32", "fp32"),
    ("D48-fp32-N7-past1-t1", ODD48, 7, 1, 1, "fp32", "fp32", "fp32"),
    ("D48-fp32-N7-past2-t1", ODD48, 7, 2, 1, "fp32", "fp32", "fp32"),
    ("D48-fp32-N7-past0-t3", ODD48, 7, 0, 3, "fp32", "fp32", "fp32"),
    ("D48-fp32-N7-past1-t2", ODD48, 7, 1, 2, "fp32", "fp32", "fp32"),
    ("D20-fp32-N3-past1-t2", ODD20, 3, 1, 2, "fp32", "fp32", "fp32"),
    ("D20-fp32-N1-past0-t1", ODD20, 1, 0, 1, "fp32", "fp32", "fp32"),
    ("D48-bf16-N17-past2-t1", ODD48, 17, 2, 1, "bf16", "bf16", "bf16"),
    ("D20-bf16-xfp32-N5-past1-t2", ODD20, 5, 1, 2, "bf16", "fp32", "bf16"),
    ("D48-fp16-N7-past0-t3", ODD48, 7, 0, 3, "fp16", "fp16", "fp16"),
]


@pytest.mark.parametrize(
    ("shape", "N", "past", "t", "w", "xd", "md"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_matches_the_reference_block(shape, N, past, t, w, xd, md):
    block = _block(shape)
    win = Window(block, N, past, t)
    w_dtype = DTYPES[w]
    x, mod, k_cache, v_cache = win.inputs(DTYPES[xd], DTYPES[md], w_dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        out = _step(block, x, mod, k_cache, v_cache, past, w_dtype)
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = win.out[:, past:]
    kind = "fp32_gemm" if w_dtype == torch.float32 else "bf16"
    _check_cache(win, k_before, k_cache, win.k[:, past:], kind)
    _check_cache(win, v_before, v_cache, win.v[:, past:], kind)
    if kind == "fp32_gemm":
        assert_close(out, expected, "fp32_gemm")
    else:  # against float32, bounded by the same-dtype reference block's own error
        low = copy.deepcopy(block).to(w_dtype)
        with torch.no_grad():
            ref_low = low(win.X.to(w_dtype), win.C.to(w_dtype))[:, past:]
        assert_low_precision(out, ref_low, expected)


def test_three_steps_grow_the_window_like_the_full_block():
    """(past, t) = (0, 1), (1, 1), (2, 1) through one cache equal the full window's block."""
    block = _block(ODD48, seed=3)
    win = Window(block, 6, 2, 1, seed=4)  # a window of 3 tokens
    x, mod, k_cache, v_cache = win.inputs(torch.float32, torch.float32, torch.float32, L=3)
    X, mods = win.X, win.mods
    with torch.no_grad():
        for j in range(3):
            out = _step(block, X[:, j : j + 1], mods[:, j : j + 1], k_cache, v_cache, j, torch.float32)
            assert_close(out, win.out[:, j : j + 1], "fp32_gemm", f"step {j}")
    assert_close(k_cache, win.k, "fp32_gemm", "keys")
    assert_close(v_cache, win.v, "fp32_gemm", "values")


def test_wide_tiles(monkeypatch):
    """The 32-row tile of large batches (several candidates of several tokens per program,
    a ragged last program) on a small batch."""
    block = _block(ODD20, seed=5)
    win = Window(block, 11, 1, 2, seed=6)
    wide = {**bs.tile_config(10**6, 2, 20, 33, False), "BLOCK_C": 16}
    assert wide["T_PAD"] == 2
    monkeypatch.setattr(bs, "tile_config", lambda *args: wide)
    x, mod, k_cache, v_cache = win.inputs(torch.float32, torch.float32, torch.float32)
    with torch.no_grad():
        out = _step(block, x, mod, k_cache, v_cache, 1, torch.float32)
    assert_close(out, win.out[:, 1:], "fp32_gemm")
    assert_close(k_cache[:, 1:3], win.k[:, 1:], "fp32_gemm", "cache")


def test_tile_config_at_planning_sizes():
    for N, t in ((300, 1), (15_000, 1), (300, 3), (15_000, 3)):
        for precise in (False, True):
            cfg = bs.tile_config(N, t, 192, 2048, precise)
            rows = cfg["BLOCK_C"] * cfg["T_PAD"]
            assert cfg["T_PAD"] >= t and rows >= 16
            assert rows == (32 if N == 15_000 and not precise else 16)


@pytest.mark.parametrize(
    ("w", "past", "t"), [("fp32", 0, 3), ("bf16", 1, 2)], ids=["fp32-past0-t3", "bf16-past1-t2"]
)
def test_kv_only_writes_the_keys_and_values_alone(w, past, t):
    """kv_only: the new tokens' keys/values as a full step writes them, nothing else, and an
    empty output; then the last token alone (past + t - 1 cached) gives the full step's last
    output: the planner's last block of a shifted window, without the other tokens' MLP."""
    block = _block(ODD48, seed=5)
    win = Window(block, 7, past, t, seed=6)
    dtype = DTYPES[w]
    x, mod, k_cache, v_cache = win.inputs(dtype, dtype, dtype)
    full_k, full_v = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        full = _step(block, x, mod, full_k, full_v, past, dtype)
        before = k_cache.clone()
        kv = _step(block, x[:, :-1], mod[:, :-1], k_cache, v_cache, past, dtype, kv_only=True)
        assert kv.shape == (7, 0, x.shape[-1]) and kv.dtype == x.dtype
        kind = "fp32_gemm" if w == "fp32" else "bf16"  # GEMMs of another tile shape: same up to rounding
        assert_close(k_cache[:, : past + t - 1], full_k[:, : past + t - 1], kind, "keys")
        assert_close(v_cache[:, : past + t - 1], full_v[:, : past + t - 1], kind, "values")
        assert torch.equal(k_cache[:, past + t - 1 :], before[:, past + t - 1 :])
        last = _step(block, x[:, -1:], mod[:, -1:], k_cache, v_cache, past + t - 1, dtype)
    assert_close(last, full[:, -1:], kind, "last token after kv_only")
    assert_close(k_cache, full_k, kind, "keys") and assert_close(v_cache, full_v, kind, "values")


def test_tile_rows_follow_the_gpu_size():
    """32-row programs once 16-row ones would outnumber the SMs twice over: earlier on a GPU
    with fewer SMs (an RTX 3060 Ti has 38), so its programs read the weights fewer times."""
    assert bs.tile_config(2000, 1, 192, 2048, False)["BLOCK_C"] == 16  # 132 SMs assumed
    assert bs.tile_config(2000, 1, 192, 2048, False, sms=38)["BLOCK_C"] == 32
    assert bs.tile_config(2000, 1, 192, 2048, True, sms=38)["BLOCK_C"] == 16  # float32 weights: 16
    assert bs._sm_count(torch.device("cpu")) == 132


def _op_args(N, block_seed, window_seed):
    """The launcher's positional arguments for N candidates, one new token after one cached
    (float32, the ODD20 block)."""
    block = _block(ODD20, seed=block_seed)
    x, mod, k_cache, v_cache = Window(block, N, 1, 1, seed=window_seed).inputs(
        torch.float32, torch.float32, torch.float32
    )
    a = block.attn
    eps = (block.norm1.eps, a.norm.eps, block.norm2.eps, block.mlp.net[0].eps)
    return (x, mod, k_cache, v_cache, 1, *_weights(block, torch.float32), a.heads, a.dim_head, *eps)


def test_the_op_passes_opcheck_and_equals_the_launcher():
    args = _op_args(3, 7, 8)
    x, mod, k_cache, v_cache = args[:4]
    torch.library.opcheck(bs.block_step_op, args, test_utils=("test_schema", "test_faketensor"))
    kv_args = (x, *args[1:], True)  # keys/values only: an empty output
    torch.library.opcheck(bs.block_step_op, kv_args, test_utils=("test_schema", "test_faketensor"))
    assert bs.block_step_op(*kv_args).shape == (3, 0, x.shape[-1])
    k2, v2 = k_cache.clone(), v_cache.clone()
    out_op = bs.block_step_op(*args)
    out = bs.block_step_fwd(x, mod, k2, v2, *args[4:])
    assert torch.equal(out_op, out) and torch.equal(k_cache, k2) and torch.equal(v_cache, v2)


def test_refuses_gradients():
    block = _block(ODD20)
    win = Window(block, 2, 0, 1)
    x, mod, k_cache, v_cache = win.inputs(torch.float32, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="forward-only"):
        _step(block, x.requires_grad_(), mod, k_cache, v_cache, 0, torch.float32)


def _error_cases():
    """(id, change to the arguments, message) for the launcher's checks."""
    return [
        ("x-rank", lambda a: a.update(x=a["x"][:, 0]), "x must be 3-D"),
        ("mod-shape", lambda a: a.update(mod=a["mod"][..., :-1]), "mod must have shape"),
        ("past-beyond-cache", lambda a: a.update(past=3), "past \\+ t <= cache length"),
        ("cache-dtype", lambda a: a.update(k_cache=a["k_cache"].double()), "k_cache must be float32"),
        ("cache-gemm-dtype", lambda a: a.update(v_cache=a["v_cache"].bfloat16()), "GEMM dtype"),
        (
            "inner-stride",
            lambda a: a.update(x=torch.cat([a["x"], a["x"]], -1)[..., ::2]),
            "unit inner",
        ),
        ("heads", lambda a: a.update(heads=3), "k_cache must have shape .* heads=3"),
        ("weight-D", lambda a: a.update(qkv_weight=a["qkv_weight"][:, :-1]), "qkv_weight must have shape"),
        ("device", lambda a: a.update(fc2_bias=a["fc2_bias"].to("meta")), "fc2_bias is on meta"),
        ("negative-past", lambda a: a.update(past=-1), "past must be an integer >= 0"),
    ]


@pytest.mark.parametrize(
    ("change", "message"), [c[1:] for c in _error_cases()], ids=[c[0] for c in _error_cases()]
)
def test_bad_inputs_raise_value_errors(change, message):
    block = _block(ODD20)
    win = Window(block, 2, 1, 1)
    x, mod, k_cache, v_cache = win.inputs(torch.float32, torch.float32, torch.float32)
    w = _weights(block, torch.float32)
    args = dict(x=x, mod=mod, k_cache=k_cache, v_cache=v_cache, past=1)
    args.update(zip(("qkv_weight", "out_weight", "out_bias"), w[:3]))
    args.update(zip(("attn_norm_weight", "attn_norm_bias", "mlp_norm_weight", "mlp_norm_bias"), w[3:7]))
    args.update(zip(("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), w[7:]))
    args.update(heads=2, dim_head=10, eps_norm1=1e-6, eps_attn_norm=1e-5, eps_norm2=1e-6, eps_mlp_norm=1e-5)
    change(args)
    with pytest.raises(ValueError, match=message):
        bs.block_step_fwd(**args)


def test_entry_point_takes_keywords_and_traces_through_the_op():
    """``block_step`` binds keywords to positions, and inside a dispatch mode (here the fake
    mode torch.compile traces with) it calls the custom op, whose fake gives the shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _op_args(2, 9, 10)
    x = args[0]
    with torch.no_grad():
        out = bs.block_step(*args)
        out_kw = bs.block_step(**dict(zip(bs._SIGNATURE.parameters, args)))
    assert torch.equal(out, out_kw)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        out_fake = bs.block_step(*fake)
    assert out_fake.shape == x.shape and out_fake.dtype == x.dtype


# ------------------------------------------- lewm_fast.ConditionalBlock.step's choice of path


def _fast_block(seed=9):
    import lewm_fast

    torch.manual_seed(seed)
    block = lewm_fast.ConditionalBlock(48, 3, 16, 100, backend="triton")
    return randomize_(block, seed).eval().to(_device())


def _predictor_of(block, frames=3):
    from types import SimpleNamespace

    return SimpleNamespace(
        pos_embedding=torch.zeros(1, frames, 1), transformer=SimpleNamespace(layers=[block])
    )


@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_conditional_block_step_runs_the_kernel_when_it_can(monkeypatch, last_only):
    """lewm_fast.ConditionalBlock.step (backend "triton"; "auto" on CUDA) is the kernel in eval
    mode without gradients when the cache and the Linear weights share a dtype -- and equals
    the reference step -- else the fused pieces: in training, with gradients, with a cache of
    another dtype (autocast over float32 weights) and with ``step_kernel = False``."""
    calls = []
    launcher = bs.block_step_fwd
    kv_only = lambda args: len(args) > 22 and args[22]  # noqa: E731
    monkeypatch.setattr(bs, "block_step_fwd", lambda *a: (calls.append(kv_only(a)), launcher(*a))[1])
    block = _fast_block()
    win = Window(block, 5, 0, 3, seed=10)
    ref.setup_caches(_predictor_of(block), 5, torch.float32, _device())
    with torch.no_grad():
        out = block.step(win.X, win.mods, 0, last_only=last_only)
    assert calls == ([True, False] if last_only else [False])  # keys/values alone, then the last token
    assert_close(out, win.out[:, -1:] if last_only else win.out, "fp32_gemm", "block step")
    calls.clear()

    def unfused(**change):
        with torch.no_grad():
            block.step(win.X[:, :1], win.mods[:, :1], 0)
        assert calls == [], change

    block.step_kernel = False
    unfused(step_kernel=False)
    block.step_kernel = True
    block.train()
    unfused(training=True)
    block.eval()
    with torch.enable_grad():
        block.step(win.X[:, :1], win.mods[:, :1], 0)  # the weights require grad: the pieces
    assert calls == []
    ref.setup_caches(_predictor_of(block), 5, torch.bfloat16, _device())
    with torch.autocast(_device(), dtype=torch.bfloat16):
        unfused(cache="bf16, weights fp32")


GPU_CASES = [  # the paper block at the 1-env planning size: (Linear weight dtype, past, t)
    pytest.param(
        w, past, t, id=f"{w}-past{past}-t{t}", marks=pytest.mark.smoke if t == 1 and past == 2 else ()
    )
    for w in ("fp32", "bf16")
    for past, t in ((0, 1), (2, 1), (0, 3))
]


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize(("w", "past", "t"), GPU_CASES)
def test_real_block_on_gpu(w, past, t, smoke_line):
    """The compiled kernel on the GPU (tensor-core bf16 dots; float32 by three TF32 passes,
    which the interpreter does not exercise) against the float32 reference block, N = 300."""
    block = _block(REAL, seed=11)
    win = Window(block, 300, past, t, seed=12)
    dtype = DTYPES[w]
    x, mod, k_cache, v_cache = win.inputs(torch.float32, dtype, dtype)
    with torch.no_grad():
        out = _step(block, x, mod, k_cache, v_cache, past, dtype)
    kind = "fp32_gemm" if w == "fp32" else "bf16"
    err = assert_close(out, win.out[:, past:], kind, f"block step on the GPU ({w})")
    smoke_line(f"block_step {w} past={past} t={t} rel err {err:.1e}")
