"""The reference implementation against the spec, written out independently in the tests."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_, small_config

import lewm_fast
from lewm_fast import reference as ref
from lewm_fast.testing import assert_close


def test_paper_parameter_count():
    model = lewm_fast.LeWMConfig.preset("paper").build(reference=True)
    counts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("encoder", "predictor", "action_encoder", "projector", "pred_proj")
    }
    assert counts == {
        "encoder": 5_501_376,
        "predictor": 10_791_360,
        "action_encoder": 156_206,
        "projector": 792_768,
        "pred_proj": 792_768,
    }
    assert sum(p.numel() for p in model.parameters()) == 18_034_478


def test_paper_key_names():
    keys = set(lewm_fast.LeWMConfig.preset("paper").build(reference=True).state_dict())
    for key in (
        "predictor.pos_embedding",
        "predictor.transformer.layers.5.attn.norm.weight",
        "predictor.transformer.layers.0.attn.to_qkv.weight",
        "predictor.transformer.layers.0.attn.to_out.0.bias",
        "predictor.transformer.layers.0.mlp.net.4.weight",
        "predictor.transformer.layers.0.adaLN_modulation.1.weight",
        "predictor.transformer.norm.bias",
        "action_encoder.patch_embed.weight",
        "action_encoder.embed.2.weight",
        "projector.net.1.running_var",
        "pred_proj.net.3.weight",
        "encoder.embeddings.position_embeddings",
        "encoder.layers.11.attention.q_proj.bias",
        "encoder.layernorm.weight",
    ):
        assert key in keys, key
    assert "predictor.transformer.layers.0.attn.to_qkv.bias" not in keys


def test_conditional_block_zero_init_is_identity():
    block = ref.ConditionalBlock(dim=24, heads=3, dim_head=8, mlp_dim=40)
    x, c = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    assert torch.equal(block(x, c), x)


def _block_by_spec(block, x, c):
    """ConditionalBlock written out from spec section 1 (eval mode, no dropout)."""
    d = x.shape[-1]
    mod = F.linear(F.silu(c), block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.split(d, dim=-1)

    def attn(h):
        a = block.attn
        h = F.layer_norm(h, (d,), a.norm.weight, a.norm.bias, 1e-5)
        q, k, v = (h @ a.to_qkv.weight.T).split(a.heads * a.dim_head, dim=-1)
        b, t = h.shape[:2]
        q, k, v = (z.reshape(b, t, a.heads, a.dim_head).permute(0, 2, 1, 3) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(a.dim_head)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, t, -1)
        return F.linear(out, a.to_out[0].weight, a.to_out[0].bias)

    def mlp(h):
        n = block.mlp.net
        h = F.layer_norm(h, (d,), n[0].weight, n[0].bias, 1e-5)
        return F.linear(F.gelu(F.linear(h, n[1].weight, n[1].bias)), n[4].weight, n[4].bias)

    plain = lambda h: F.layer_norm(h, (d,), eps=1e-6)  # noqa: E731
    x = x + gate_msa * attn(plain(x) * (1 + scale_msa) + shift_msa)
    return x + gate_mlp * mlp(plain(x) * (1 + scale_mlp) + shift_mlp)


@pytest.mark.parametrize("shape", [(2, 3, 48), (1, 1, 48), (3, 2, 48)], ids=["B2T3", "B1T1", "B3T2"])
def test_conditional_block_matches_spec(shape):
    block = randomize_(ref.ConditionalBlock(dim=48, heads=4, dim_head=12, mlp_dim=80)).eval()
    x, c = torch.randn(shape), torch.randn(shape)
    assert_close(block(x, c), _block_by_spec(block, x, c), "fp32_gemm")


def test_embedder_casts_to_float32():
    emb = ref.Embedder(input_dim=10, smoothed_dim=10, emb_dim=16)
    x = torch.randn(2, 4, 10, dtype=torch.float64)
    out = emb(x)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 16)
    manual = emb.embed(F.linear(x.float(), emb.patch_embed.weight[..., 0], emb.patch_embed.bias))
    assert_close(out, manual, "fp32_gemm")


# ---------------------------------------------------------------- SIGReg


def _sigreg_by_spec(z, A, knots=17):
    """Spec section 3, knot by knot."""
    dt = 3 / (knots - 1)
    x = z.double() @ A.double()  # (T, B, P)
    total = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)
    for k in range(knots):
        t_k = k * dt
        phi = math.exp(-(t_k**2) / 2)
        w = phi * (dt if k in (0, knots - 1) else 2 * dt)
        C = torch.cos(t_k * x).mean(1)
        S = torch.sin(t_k * x).mean(1)
        total += w * ((C - phi) ** 2 + S**2)
    return (z.shape[1] * total).mean()


def _sigreg_grad_by_spec(z, A, knots=17):
    """dSIGReg/dx from spec section 3, chained to z: (T, B, D)."""
    dt = 3 / (knots - 1)
    x = z.double() @ A.double()
    T, _, P = x.shape
    g = torch.zeros_like(x)
    for k in range(knots):
        t_k = k * dt
        phi = math.exp(-(t_k**2) / 2)
        w = phi * (dt if k in (0, knots - 1) else 2 * dt)
        cos, sin = torch.cos(t_k * x), torch.sin(t_k * x)
        C, S = cos.mean(1, keepdim=True), sin.mean(1, keepdim=True)
        g += w * 2 * t_k * (S * cos - (C - phi) * sin)
    return (g / (T * P)) @ A.double().T


@pytest.mark.parametrize(
    "T,B,D,P", [(4, 128, 192, 1024), (1, 1, 191, 7), (3, 33, 24, 100)], ids=["real", "T1-B1-D191", "odd"]
)
def test_sigreg_value_and_gradient_match_spec(T, B, D, P):
    z = torch.randn(T, B, D, requires_grad=True)
    A = ref.draw_projections(D, P)
    t, phi, w = ref.sigreg_quadrature(17)
    value = ref.sigreg_statistic(z, A, t, phi, w)
    value.backward()
    assert_close(value, _sigreg_by_spec(z.detach(), A), "fp32_elementwise", "SIGReg value")
    assert_close(z.grad, _sigreg_grad_by_spec(z.detach(), A), "fp32_gemm", "SIGReg gradient")


def test_sigreg_quadrature():
    t, phi, w = ref.sigreg_quadrature(17)
    assert torch.allclose(t, torch.linspace(0, 3, 17))
    assert torch.allclose(phi, torch.exp(-(t**2) / 2))
    dt = 3 / 16
    assert torch.allclose(w[[0, -1]], phi[[0, -1]] * dt)
    assert torch.allclose(w[1:-1], phi[1:-1] * 2 * dt)


def test_sigreg_projection_draw_consumes_generator_like_published():
    torch.manual_seed(7)
    expected = torch.randn(24, 50)
    expected = expected / expected.norm(p=2, dim=0)
    torch.manual_seed(7)
    assert torch.equal(ref.draw_projections(24, 50), expected)
    assert torch.allclose(ref.draw_projections(24, 50).norm(dim=0), torch.ones(50))


def test_sigreg_separates_gaussian_from_collapsed():
    sig = ref.SIGReg()
    gaussian = sig(torch.randn(2, 512, 64))
    collapsed = sig(torch.randn(1, 1, 64).expand(2, 512, 64).contiguous())
    assert gaussian < 3.0  # O(1) under the null
    assert collapsed > 50 * gaussian


# ---------------------------------------------------------------- JEPA functions


def _model(seed=0):
    return randomize_(small_config().build(reference=True), seed).eval()


def test_encode_predict_shapes():
    model = _model()
    info = model.encode({"pixels": torch.randn(2, 4, 3, 56, 56), "action": torch.randn(2, 4, 10)})
    assert info["emb"].shape == (2, 4, 32) and info["act_emb"].shape == (2, 4, 32)
    assert model.predict(info["emb"][:, :3], info["act_emb"][:, :3]).shape == (2, 3, 32)


def test_rollout_follows_spec_section_6():
    """Step j predicts from the last min(3, j + 1) embeddings and their action embeddings."""
    model = _model()
    B, S, T = 2, 3, 5
    pixels = torch.randn(B, 1, 3, 56, 56)
    actions = torch.randn(B, S, T, 10)
    info = {"pixels": pixels.unsqueeze(1).expand(B, S, 1, 3, 56, 56)}
    out = model.rollout(info, actions)["predicted_emb"]
    assert out.shape == (B, S, 1 + T, 32)

    start = model.encode({"pixels": pixels})["emb"]  # (B, 1, D)
    for b in range(B):
        for s in range(S):
            embs = [start[b, 0]]
            act_emb = model.action_encoder(actions[b, s][None])[0]  # (T, D)
            for j in range(T):
                lo = max(0, j + 1 - 3)
                ctx = torch.stack(embs[lo : j + 1])[None]
                embs.append(model.predict(ctx, act_emb[lo : j + 1][None])[0, -1])
            assert_close(out[b, s], torch.stack(embs), "fp32_gemm", f"rollout b={b} s={s}")


def test_get_cost_is_squared_distance_to_goal():
    model = _model()
    B, S = 2, 4
    pixels, goal = torch.randn(B, 1, 3, 56, 56), torch.randn(B, 1, 3, 56, 56)
    candidates = torch.randn(B, S, 5, 10)
    expand = lambda x: x.unsqueeze(1).expand(B, S, *x.shape[1:])  # noqa: E731
    cost = model.get_cost({"pixels": expand(pixels), "goal": expand(goal)}, candidates)
    pred = model.rollout({"pixels": expand(pixels)}, candidates)["predicted_emb"][:, :, -1]
    goal_emb = model.encode({"pixels": goal})["emb"][:, -1]
    assert cost.shape == (B, S)
    assert_close(cost, (pred - goal_emb[:, None]).pow(2).sum(-1), "fp32_gemm")


def test_jepa_loss_matches_spec_section_2():
    model = randomize_(small_config().build(reference=True)).train()
    sig = ref.SIGReg(num_proj=64)
    action = torch.randn(4, 4, 10)
    action[:, -1] = float("nan")  # window edge
    batch = {"pixels": torch.randn(4, 4, 3, 56, 56), "action": action}
    torch.manual_seed(3)
    out = ref.jepa_loss(model, sig, batch)
    torch.manual_seed(3)
    info = model.encode({"pixels": batch["pixels"], "action": torch.nan_to_num(action, 0.0)})
    pred = model.predict(info["emb"][:, :3], info["act_emb"][:, :3])
    pred_loss = ((pred - info["emb"][:, 1:]) ** 2).mean()
    sig_loss = sig(info["emb"].transpose(0, 1))
    assert torch.isfinite(out["loss"])
    assert_close(out["pred_loss"], pred_loss, "fp32_gemm")
    assert_close(out["sigreg_loss"], sig_loss, "fp32_gemm")
    assert_close(out["loss"], pred_loss + 0.09 * sig_loss, "fp32_gemm")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_in_batch_chunks_equals_one_call(monkeypatch, causal):
    """Above the fused-kernel grid limit attention runs in batch chunks; the rows do not change."""
    from lewm_fast.reference import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(11, 4, 3, 8, generator=gen) for _ in range(3))
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    monkeypatch.setattr(attention, "MAX_BATCH", 4)
    chunked = attention.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


# ------------------------------------------------ the block on new tokens with a KV cache


def _window(block, n, t, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x, c = torch.randn(n, t, d, generator=gen), torch.randn(n, t, d, generator=gen)
    return x, c, block.adaLN_modulation(c)


@pytest.mark.parametrize(
    "steps",
    [(1, 1, 1), (3,), (1, 2), (2, 1), (1, 1)],
    ids=["grow-1-1-1", "fresh-3", "1-then-2", "2-then-1", "1-1"],
)
@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
@torch.no_grad()
def test_block_step_with_cache_equals_the_whole_window(steps, last_only):
    """block.step on the window's tokens in pieces (each against the keys/values the earlier
    pieces left in attn.kv_cache) equals the block on the whole window (spec section 1)."""
    block = randomize_(ref.ConditionalBlock(dim=48, heads=4, dim_head=12, mlp_dim=80), seed=2).eval()
    total = sum(steps)
    x, c, mod = _window(block, 5, total, 48, seed=1)
    whole = block(x, c)
    ref.setup_caches(_one_block_predictor(block, total), 5, torch.float32, "cpu")
    past = 0
    for t in steps:
        out = block.step(x[:, past : past + t], mod[:, past : past + t], past, last_only=last_only)
        expected = whole[:, past + t - 1 : past + t] if last_only else whole[:, past : past + t]
        assert out.shape == expected.shape
        assert_close(out, expected, "fp32_gemm", f"tokens {past}..{past + t - 1}")
        past += t


def _one_block_predictor(block, frames):
    """An object with what setup_caches reads: pos_embedding (frames) and transformer.layers."""
    from types import SimpleNamespace

    return SimpleNamespace(
        pos_embedding=torch.zeros(1, frames, 1), transformer=SimpleNamespace(layers=[block])
    )


def test_kv_cache_is_static_scratch_state():
    """Reserved once per shape (a smaller or equal request keeps the storage, so a captured
    CUDA graph stays valid), reallocated for another dtype or a longer batch; not model
    state: no state_dict entry, and a deep copy starts empty."""
    import copy

    model = randomize_(small_config().build(), seed=0).eval()
    predictor = model.predictor
    predictor.setup_caches(7, torch.float32, "cpu")
    caches = [block.attn.kv_cache for block in predictor.transformer.layers]
    frames, inner = predictor.num_frames, predictor.transformer.layers[0].attn.to_qkv.out_features // 3
    assert all(c.kv.shape == (7, frames, 2 * inner) for c in caches)
    ptr = caches[0].kv.data_ptr()
    predictor.setup_caches(5, torch.float32, "cpu")
    keys, values = caches[0].views(5)
    assert caches[0].kv.data_ptr() == ptr and keys.shape == values.shape == (5, frames, inner)
    assert keys.stride(-1) == values.stride(-1) == 1
    predictor.setup_caches(5, torch.bfloat16, "cpu")
    assert caches[0].kv.dtype == torch.bfloat16 and caches[0].kv.shape[0] == 5
    predictor.setup_caches(9, torch.bfloat16, "cpu")
    assert caches[0].kv.shape[0] == 9
    with pytest.raises(ValueError, match="rows must be a positive int"):
        predictor.setup_caches(0, torch.bfloat16, "cpu")
    assert not any("kv_cache" in key for key in model.state_dict())
    twin = copy.deepcopy(model)
    assert twin.predictor.transformer.layers[0].attn.kv_cache.kv is None
    with pytest.raises(RuntimeError, match="reserve"):
        twin.predictor.transformer.layers[0].attn.kv_cache.views(1)
    with pytest.raises(ValueError, match="do not fit"):
        block = predictor.transformer.layers[0]
        h = torch.randn(3, 2, block.attn.to_qkv.in_features)
        block.attn.attend_cached(h, past=frames - 1)
