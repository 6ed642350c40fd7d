"""The public drop-in API against lewm_fast.reference: outputs and gradients, fp32 and bf16."""

import pytest
import torch
from helpers import model_pair, published_grads, randomize_, small_config

import lewm_fast
from lewm_fast import reference as ref
from lewm_fast.testing import assert_close, assert_grads_close, assert_low_precision

B, S = 2, 3
PIX = (3, 56, 56)


def _train_pair(seed=0):
    public, reference = model_pair(small_config(), seed)
    return public.train(), reference.train()


def _compare_grads(public, reference, kind):
    assert_grads_close(published_grads(public), published_grads(reference), kind)


def _encode_loss(model, pixels, action):
    info = model.encode({"pixels": pixels, "action": action})
    return info["emb"], info["act_emb"]


CASES = [  # (id, batch, frames)
    ("B2-T4", 2, 4),
    ("B1-T1", 1, 1),
    ("B3-T3", 3, 3),
]


@pytest.mark.parametrize("b,t", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_encode_parity_fp32(b, t):
    public, reference = _train_pair()
    if b * t == 1:  # BatchNorm needs more than one value per channel in training mode
        public.eval(), reference.eval()
    pixels = torch.randn(b, t, *PIX)
    action = torch.randn(b, t, 10)
    outs = []
    for model in (public, reference):
        emb, act_emb = _encode_loss(model, pixels, action)
        (emb.square().sum() + act_emb.sin().sum()).backward()
        outs.append((emb, act_emb))
    assert_close(outs[0][0], outs[1][0], "fp32_gemm", "emb")
    assert_close(outs[0][1], outs[1][1], "fp32_gemm", "act_emb")
    _compare_grads(public, reference, "fp32_gemm")


def test_predict_parity_fp32():
    public, reference = _train_pair()
    emb, act = torch.randn(4, 3, 32), torch.randn(4, 3, 32)
    outs = []
    for model in (public, reference):
        e, a = emb.clone().requires_grad_(), act.clone().requires_grad_()
        out = model.predict(e, a)
        out.square().sum().backward()
        outs.append((out, e.grad, a.grad))
    for i, what in enumerate(("pred", "d emb", "d act_emb")):
        assert_close(outs[0][i], outs[1][i], "fp32_gemm", what)
    _compare_grads(public, reference, "fp32_gemm")


def _plan_inputs(b=B, s=S, horizon=5):
    pixels = torch.randn(b, 1, 1, *PIX).expand(b, s, 1, *PIX)
    goal = torch.randn(b, 1, 1, *PIX).expand(b, s, 1, *PIX)
    return pixels, goal, torch.randn(b, s, horizon, 10)


@pytest.mark.parametrize("b,s", [(2, 3), (1, 1), (3, 7)], ids=["B2-S3", "B1-S1", "B3-S7"])
def test_rollout_and_get_cost_parity_fp32(b, s):
    public, reference = (m.eval() for m in model_pair(small_config()))
    pixels, goal, cand = _plan_inputs(b, s)
    results = []
    for model in (public, reference):
        c = cand.clone().requires_grad_()
        cost = model.get_cost({"pixels": pixels, "goal": goal}, c)
        cost.sum().backward()
        c2 = cand.clone().requires_grad_()
        rolled = model.rollout({"pixels": pixels}, c2)["predicted_emb"]
        rolled.sum().backward()
        results.append((cost, c.grad, rolled, c2.grad))
    names = ("cost", "d cost / d candidates", "predicted_emb", "d rollout / d candidates")
    for i, what in enumerate(names):
        assert_close(results[0][i], results[1][i], "fp32_gemm", what)
    _compare_grads(public, reference, "fp32_gemm")


def test_model_parity_bf16_autocast():
    """bf16 autocast: public and reference both within tolerance of the fp32 reference."""
    public, reference = _train_pair()
    fp32 = small_config().build(reference=True).train()
    fp32.load_state_dict(reference.state_dict())
    pixels, action = torch.randn(3, 4, *PIX), torch.randn(3, 4, 10)
    sig_seed = 11

    def loss(model, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(sig_seed)
            out = ref.jepa_loss(model, lewm_fast.SIGReg(num_proj=128), {"pixels": pixels, "action": action})
        out["loss"].backward()
        return out

    lp, lr, l32 = loss(public, True), loss(reference, True), loss(fp32, False)
    for key in ("pred_loss", "sigreg_loss", "loss"):
        assert_low_precision(lp[key], lr[key], l32[key], key)
    g32 = published_grads(fp32)
    gp, gr = published_grads(public), published_grads(reference)
    for name in (
        "encoder.embeddings.patch_embeddings.projection.weight",
        "predictor.transformer.layers.1.adaLN_modulation.1.weight",
        "action_encoder.embed.0.weight",
        "projector.net.3.weight",
        "pred_proj.net.0.weight",
    ):
        assert_low_precision(gp[name], gr[name], g32[name], f"grad {name}")


def test_get_cost_parity_bf16_autocast():
    public, reference = (m.eval() for m in model_pair(small_config()))
    pixels, goal, cand = _plan_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cp = public.get_cost({"pixels": pixels, "goal": goal}, cand)
        cr = reference.get_cost({"pixels": pixels, "goal": goal}, cand)
    c32 = reference.get_cost({"pixels": pixels, "goal": goal}, cand)
    assert_low_precision(cp, cr, c32, "cost")


# ---------------------------------------------------------------- SIGReg


@pytest.mark.parametrize(
    "shape", [(4, 128, 192), (1, 1, 191), (3, 17, 40)], ids=["real", "T1-B1-D191", "odd"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sigreg_module_seeded_equals_reference(shape, dtype):
    z32 = torch.randn(shape)
    results = []
    for cls in (lewm_fast.SIGReg, ref.SIGReg):
        z = z32.to(dtype).requires_grad_()
        torch.manual_seed(5)
        value = cls(num_proj=256)(z)
        value.backward()
        results.append((value, z.grad))
    torch.manual_seed(5)
    z = z32.clone().requires_grad_()
    value32 = ref.SIGReg(num_proj=256)(z)
    value32.backward()
    if dtype == torch.float32:
        assert_close(results[0][0], results[1][0], "fp32_elementwise", "SIGReg")
        assert_close(results[0][1], results[1][1], "fp32_gemm", "SIGReg grad")
    else:
        assert_low_precision(results[0][0], results[1][0], value32, "SIGReg")
        assert_low_precision(results[0][1], results[1][1], z.grad, "SIGReg grad")


def test_sigreg_functional_matches_module_draw():
    z = torch.randn(4, 64, 32)
    torch.manual_seed(9)
    module_value = lewm_fast.SIGReg(num_proj=100)(z)
    torch.manual_seed(9)
    A = ref.draw_projections(32, 100)
    assert_close(lewm_fast.sigreg(z, A), module_value, "fp32_elementwise")


def test_published_forward_transcription_matches():
    """The published SIGReg forward, transcribed, gives the same value for the same seed."""
    sig = lewm_fast.SIGReg()
    z = torch.randn(4, 32, 48)
    torch.manual_seed(21)
    A = torch.randn(48, 1024)
    A = A.div_(A.norm(p=2, dim=0))
    x_t = (z @ A).unsqueeze(-1) * sig.t
    err = (x_t.cos().mean(-3) - sig.phi).square() + x_t.sin().mean(-3).square()
    expected = ((err @ sig.weights) * z.size(-2)).mean()
    torch.manual_seed(21)
    assert_close(sig(z), expected, "fp32_elementwise")


# ---------------------------------------------------------------- encoder object


def test_vit_encoder_interface():
    enc = lewm_fast.vit_encoder(size="tiny", patch_size=14, image_size=224)
    assert enc.config.hidden_size == 192 and enc.config.num_hidden_layers == 12
    assert sum(p.numel() for p in enc.parameters()) == 5_501_376
    out = enc(torch.randn(2, 3, 224, 224), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (2, 257, 192)
    out = enc(torch.randn(1, 3, 112, 98), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (1, 1 + 8 * 7, 192)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        enc(torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match="pretrained"):
        lewm_fast.vit_encoder(pretrained=True)
    with pytest.raises(ValueError, match="unknown ViT size"):
        lewm_fast.vit_encoder(size="gigantic")


def test_paper_model_encode_runs():
    model = lewm_fast.LeWMConfig.preset("paper").build().eval()
    with torch.no_grad():
        info = model.encode({"pixels": torch.randn(1, 2, 3, 224, 224), "action": torch.randn(1, 2, 10)})
    assert info["emb"].shape == (1, 2, 192) and torch.isfinite(info["emb"]).all()


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def model():
    return randomize_(small_config().build()).eval()


BAD_ENCODE = [
    ("rank", {"pixels": torch.randn(2, 3, 56, 56)}, r"5 dimensions \(B, T, C, H, W\)"),
    ("channels", {"pixels": torch.randn(2, 1, 4, 56, 56)}, "3 channels"),
    ("channels-last", {"pixels": torch.randn(2, 1, 56, 56, 3)}, "3 channels"),
    ("nan", {"pixels": torch.full((1, 1, 3, 56, 56), float("nan"))}, "NaN"),
    ("uint8", {"pixels": torch.zeros(1, 1, 3, 56, 56, dtype=torch.uint8)}, "floating-point"),
    ("too-small", {"pixels": torch.randn(1, 1, 3, 8, 8)}, "smaller than one 14x14 patch"),
    (
        "action-width",
        {"pixels": torch.randn(1, 2, 3, 56, 56), "action": torch.randn(1, 2, 2)},
        "10 numbers per model action",
    ),
    (
        "action-rank",
        {"pixels": torch.randn(1, 2, 3, 56, 56), "action": torch.randn(2, 10)},
        r"3 dimensions \(B, T, A\)",
    ),
    (
        "action-nan",
        {"pixels": torch.randn(1, 2, 3, 56, 56), "action": torch.full((1, 2, 10), float("nan"))},
        "replaced by 0",
    ),
    ("action-batch", {"pixels": torch.randn(1, 2, 3, 56, 56), "action": torch.randn(2, 2, 10)}, "must agree"),
    ("no-pixels", {"action": torch.randn(1, 2, 10)}, "'pixels'"),
]


@pytest.mark.parametrize("info,match", [c[1:] for c in BAD_ENCODE], ids=[c[0] for c in BAD_ENCODE])
def test_encode_rejects_bad_input(model, info, match):
    with pytest.raises(ValueError, match=match):
        model.encode(info)


def test_predict_rejects_bad_input(model):
    with pytest.raises(ValueError, match="3 dimensions"):
        model.predict(torch.randn(3, 32), torch.randn(3, 32))
    with pytest.raises(ValueError, match="must agree"):
        model.predict(torch.randn(2, 3, 32), torch.randn(2, 2, 32))
    with pytest.raises(ValueError, match="at most num_frames = 3"):
        model.predict(torch.randn(2, 4, 32), torch.randn(2, 4, 32))


def test_rollout_and_get_cost_reject_bad_input(model):
    pixels, goal, cand = _plan_inputs()
    with pytest.raises(ValueError, match="10 numbers per model action"):
        model.rollout({"pixels": pixels}, torch.randn(B, S, 5, 2))
    with pytest.raises(ValueError, match=r"4 dimensions \(B, S, T, A\)"):
        model.rollout({"pixels": pixels}, torch.randn(B, 5, 10))
    with pytest.raises(ValueError, match=r"6 dimensions"):
        model.rollout({"pixels": pixels[:, 0]}, cand)
    with pytest.raises(ValueError, match="must agree"):
        model.rollout({"pixels": pixels}, cand[:1])
    with pytest.raises(ValueError, match="history_size"):
        model.rollout({"pixels": pixels}, cand, history_size=4)
    with pytest.raises(ValueError, match="'goal'"):
        model.get_cost({"pixels": pixels}, cand)
    with pytest.raises(ValueError, match="NaN"):
        model.get_cost({"pixels": pixels, "goal": torch.full_like(goal, float("nan"))}, cand)


def test_sigreg_rejects_bad_input():
    with pytest.raises(ValueError, match=r"3 dimensions \(T, B, D\)"):
        lewm_fast.SIGReg()(torch.randn(8, 16))
    with pytest.raises(ValueError, match="D = 16 rows"):
        lewm_fast.sigreg(torch.randn(2, 8, 16), torch.randn(15, 32))
    with pytest.raises(ValueError, match="floating point"):
        lewm_fast.SIGReg()(torch.ones(2, 8, 16, dtype=torch.int64))
