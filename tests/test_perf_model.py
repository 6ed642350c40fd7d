"""The CPU performance model (bench/perf_model.py): hand counts it must reproduce."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from lewm_fast import ConditionalBlock, LeWMConfig
from lewm_fast.bench import perf_model

pytestmark = pytest.mark.skipif(
    perf_model._cuda_guard_reason() is not None, reason="no C++ toolchain for the no-op CUDA guard"
)


def _count(module: nn.Module, *shapes, dtype=torch.float32):
    with FakeTensorMode(), torch.no_grad(), perf_model._counting_patches():
        perf_model.fake_cuda(module)
        inputs = [torch.empty(s, device="cuda", dtype=dtype) for s in shapes]
        with perf_model.count() as counter:
            module(*inputs)
    return counter.tally


def test_conditional_block_launches_equal_a_hand_count():
    # ConditionalBlock.forward on CUDA (fused AdaLN backend), eval, x and c (B, T, D):
    #   adaLN_modulation = SiLU -> Linear:      silu 1, addmm 1                     = 2
    #   chunk(6):                               views                               = 0
    #   attn_input (fused adaln kernel):        1                                   = 1
    #   attn.to_qkv (no bias):                  mm 1; chunk/view/transpose free     = 1
    #   SDPA (causal, fp32):                    memory-efficient attention kernel 1 = 1
    #   transpose(1, 2).reshape:                a view (the kernel writes its output as
    #                                           (B, T, heads, dim_head) in memory)  = 0
    #   attn.to_out.0 (+ Dropout(eval) = identity): addmm 1                          = 1
    #   gated_mlp_input (fused gated_adaln):    1                                   = 1
    #   mlp.after_norm: Linear, GELU, Linear:   addmm 1, gelu 1, addmm 1            = 3
    #   gated (fused gated_residual):           1                                   = 1
    # total                                                                           11
    block = ConditionalBlock(192, 16, 64, 2048).eval()
    tally = _count(block, (2, 3, 192), (2, 3, 192))
    assert tally.launches == 11, tally.by_op()
    assert tally.by_op()["aten::_scaled_dot_product_efficient_attention"] == 1


def test_lone_linear_bytes_are_input_output_weight():
    for dtype in (torch.float32, torch.bfloat16):
        layer = nn.Linear(192, 2048, bias=False, dtype=dtype)
        tally = _count(layer, (37, 192), dtype=dtype)
        size = torch.empty((), dtype=dtype).element_size()
        assert tally.launches == 1
        assert tally.bytes == (37 * 192 + 37 * 2048 + 2048 * 192) * size
        assert tally.flops == 2 * 37 * 192 * 2048


def test_linear_training_step_launches_equal_a_hand_count():
    # layer(x).sum().backward(), x (37, 192) without grad, Linear(192, 2048):
    #   forward: addmm 1, sum 1; backward: the seed ones_like 1, SumBackward expands (free),
    #   AddmmBackward: weight grad mm 1, bias grad sum 1; AccumulateGrad takes both gradients
    #   as they are (their strides match the parameters'): no copy
    layer = nn.Linear(192, 2048)
    with FakeTensorMode(), perf_model._counting_patches():
        perf_model.fake_cuda(layer)
        x = torch.empty(37, 192, device="cuda")
        with perf_model.count() as counter:
            layer(x).sum().backward()
        assert layer.weight.grad.shape == (2048, 192) and layer.bias.grad.shape == (2048,)
    assert counter.tally.by_op() == {"aten::sum": 2, "aten::addmm": 1, "aten::ones_like": 1, "aten::mm": 1}


def _linear_flops(rows: int, *dims: int) -> int:
    """2 rows d_in d_out for a chain of Linear layers dims[0] -> dims[1] -> ..."""
    return sum(2 * rows * a * b for a, b in zip(dims, dims[1:]))


def test_plan_flops_match_the_analytic_count(record_property):
    config = LeWMConfig.preset("paper")
    envs, samples, horizon, steps = 1, 300, 5, 30
    n = envs * samples
    d, mlp, heads, dim_head, depth = 192, 2048, 16, 64, 6
    inner = heads * dim_head
    # Encoder, once per plan, start + goal frames: patch conv + 12 ViT layers + projector.
    frames, tokens, patches = 2 * envs, 257, 256
    vit = 12 * (
        _linear_flops(frames * tokens, 192, 192) * 4  # q, k, v, o
        + 2 * 2 * frames * 3 * tokens * tokens * 64  # q k^T and attn v, 3 heads of 64
        + _linear_flops(frames * tokens, 192, 768, 192)  # MLP
    )
    encoder = 2 * frames * patches * (3 * 14 * 14) * 192 + vit + _linear_flops(frames, 192, 2048, 192)
    # Per iteration: action encoder (Conv1d k=1 10->10, Linear 10->768->192) on N x 5 actions,
    # every block's adaLN Linear(192, 6*192) on N x 5, then the rollout. One context frame,
    # window 3: steps 0-2 grow the cached window from position 0 (1 new token each, 1-3 keys),
    # steps 3 and 4 run shifted windows of 3 fresh tokens.
    act = _linear_flops(n * horizon, 10, 10, 768, 192) + depth * _linear_flops(n * horizon, 192, 6 * 192)
    rollout = 0
    for new, keys in ((1, 1), (1, 2), (1, 3), (3, 3), (3, 3)):
        for layer in range(depth):
            last = layer == depth - 1
            q_rows = 1 if last else new  # the last block's attention output and MLP: last token only
            rollout += _linear_flops(n * new, d, 3 * inner)  # to_qkv on the new tokens
            rollout += 2 * 2 * n * heads * q_rows * keys * dim_head  # attention
            rollout += _linear_flops(n * q_rows, inner, d) + _linear_flops(n * q_rows, d, mlp, d)
        rollout += _linear_flops(n, d, 2048, d)  # pred_proj on the last position
    analytic = encoder + steps * (act + rollout)
    # The paper model at the published setting: the model counts one CEM iteration and
    # multiplies by n_steps, so this costs one encoder pass and one iteration.
    counted = perf_model.plan_counts(perf_model.build_model("paper"), envs, None)["per_plan"]["flops"]
    residual = (counted - analytic) / analytic
    record_property("plan_1env_flops_residual", residual)
    assert config.encoder.image_size == 224
    message = f"plan_1env.flops {counted:,} vs analytic {analytic:,}: residual {residual:+.6%}"
    print(message)
    assert abs(residual) < 0.05, message


def test_bf16_cem_iteration_is_at_most_100_launches():
    """Issue 13's launch budget: one CEM iteration of the paper model in bf16 is at most 100
    kernels, each predictor block step one ``block_step`` kernel (the last block of the two
    shifted windows two: keys/values, then the last token) priced at its bf16 GEMM rate."""
    result = perf_model.plan_counts(perf_model.build_model("paper"), 1, torch.bfloat16)
    launches = result["per_iter"]["launches"]
    assert launches <= 100, result["iter_ops"]
    assert result["iter_ops"]["lewm_fast::block_step"] == 5 * 6 + 2
    assert not any(
        op in result["iter_ops"] for op in ("lewm_fast::adaln", "aten::_scaled_dot_product_flash_attention")
    )
    steps = [k for k in result["_kernels"] if k.op == "lewm_fast::block_step"]
    assert steps and all(k.dtype == "torch.bfloat16" for k in steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sigreg_counts_match_the_launchers(dtype):
    # lewm_fast.sigreg(z, A) forward and backward at T=4, B=128, D=192, P=1024, 17 knots:
    #   forward:  _sigreg_fwd_kernel, partial.sum()                                   = 2
    #   backward: the seed gradient (ones_like); _sigreg_bwd_kernel (grad_x);
    #             mm grad_z; for bf16 z the cast of grad_z                            = 3 / 4
    #   (grad z becomes z.grad without a copy: its strides match z's)
    T, B, D, P, K = 4, 128, 192, 1024, 17
    counts = perf_model.sigreg_counts(dtype)
    ops = counts["ops"]
    assert counts["fwd"]["launches"] == 2 and ops["lewm_fast::sigreg (partial.sum)"] == 1
    assert counts["bwd"]["launches"] == (3 if dtype == torch.float32 else 4)
    kernels = {k.op: k for k in counts["_kernels"]}
    z_bytes, a_bytes, grad_x = T * B * D * dtype.itemsize, D * P * 4, T * B * P * 4
    gemm = 2 * T * B * D * P
    fwd = kernels["lewm_fast::sigreg"]
    assert fwd.flops == gemm + perf_model.sigreg_trig_flops(T, B, P, K, use=2)
    assert fwd.bytes == z_bytes + a_bytes + 2 * K * 4 + 2 * T * K * P * 4 + T * (P // 16) * 4
    bwd = kernels["lewm_fast::sigreg_bwd"]
    assert bwd.flops == gemm + perf_model.sigreg_trig_flops(T, B, P, K, use=4)
    assert bwd.bytes == 4 + z_bytes + a_bytes + 2 * T * K * P * 4 + 2 * K * 4 + grad_x  # grad_x written
    mm = kernels["lewm_fast::sigreg_bwd (mm grad_z)"]
    assert (mm.flops, mm.bytes) == (gemm, grad_x + a_bytes + T * B * D * 4)  # grad_x read back
    # priced at their operands' rate: the fused kernels at z's dtype, the matmul at float32;
    # the fused kernels' trigonometry at the float32 rate whatever z's dtype
    assert (fwd.dtype, bwd.dtype, mm.dtype) == (str(dtype), str(dtype), "torch.float32")
    trig = perf_model.sigreg_trig_flops(T, B, P, K, use=4)
    assert (bwd.fp32_flops, mm.fp32_flops) == (trig, 0)
    h200 = perf_model.DEVICES["H200"]
    peak = h200["bf16_tflops" if dtype == torch.bfloat16 else "fp32_tflops"] * 1e12
    compute = gemm / peak + trig / (h200["fp32_tflops"] * 1e12)
    expected = max(compute, bwd.bytes / (h200["bandwidth_gbps"] * 1e9))
    assert perf_model._kernel_seconds([bwd], h200) == pytest.approx(expected)
    # the ops' dataflow, as for any op: inputs read by the first kernel, outputs written by the last
    assert fwd.reads and not fwd.writes and kernels["lewm_fast::sigreg (partial.sum)"].writes
    last = [k for k in counts["_kernels"] if k.op.startswith("lewm_fast::sigreg_bwd")][-1]
    assert bwd.reads and not bwd.writes and last.writes and not mm.reads


def test_sigreg_counts_follow_the_forward_triton_runs(monkeypatch):
    # Triton < 3.3 runs _sigreg_fwd_loop_kernel, whose statistic is partial.sum() / (T P):
    # one launch more in the forward; the backward is the same kernel on every version
    from lewm_fast.kernels import sigreg as kernel

    tuple_counts = perf_model.sigreg_counts(torch.float32)
    monkeypatch.setattr(kernel, "TUPLE_ACCUMULATORS", False)
    loop_counts = perf_model.sigreg_counts(torch.float32)
    assert (tuple_counts["fwd"]["launches"], loop_counts["fwd"]["launches"]) == (2, 3)
    assert loop_counts["ops"]["lewm_fast::sigreg (divide)"] == 1
    assert loop_counts["bwd"] == tuple_counts["bwd"]
    assert loop_counts["flops"] == tuple_counts["flops"]


@pytest.fixture(scope="module")
def tiny_result():
    """One counting run of ``run_model`` on the tiny model (plans of 1 and 50 envs, fp32 and
    bf16; the whole-batch training step) that several tests read. The paper-size plan counts
    are checked by the FLOPs test above; the numbers do not matter here, the keys do."""
    return perf_model.run_model("tiny", envs=(1, 50), memory_plans=("whole",))


def test_model_json_has_the_required_keys(tiny_result, tmp_path):
    json_path, md_path = perf_model.write(tiny_result, tmp_path)
    data = json.loads(json_path.read_text())
    for key in ("plan_1env", "plan_50env"):
        assert data[key]["launches_per_iter"] > 0
    assert data["plan_1env"]["flops"] > 0 and data["plan_1env"]["bytes"] > 0
    assert data["train_step"]["headline"] == "whole_bf16"
    for key in ("launches", "flops", "bytes"):
        assert data["train_step"][key] > 0
    for name in ("H200", "RTX 4090", "RTX 3060 Ti"):
        proj = data["plan_1env"]["bf16"]["projection_per_plan"][name]
        assert 0 < proj["work_ms"] < proj["graph_ms"] < proj["eager_ms"]
        assert all(data["devices"][name]["sources"].values())
    assert data["plan_50env"]["fp32"]["per_iter"]["flops"] > data["plan_1env"]["fp32"]["per_iter"]["flops"]
    assert "not measured" in md_path.read_text().lower()
    # TrainConfig.compile's projection: fewer launches and bytes than the eager step, the
    # same FLOPs, CUDA graphs for the whole-batch plan
    step = data["train_step"]["whole_bf16"]
    assert step["compiled"]["cudagraphs"] is True and step["compiled"]["flops"] == step["flops"]
    assert 0 < step["compiled"]["launches"] < step["launches"]
    assert 0 < step["compiled"]["bytes"] < step["bytes"]
    assert data["train_step"]["launches_compiled"] == step["compiled"]["launches"]
    assert "| training step, batch 128, whole, compiled (CUDA graphs) | bf16 |" in md_path.read_text()
    # the SIGReg op at the training size: both CUDA-graph and eager times, like a plan
    assert data["sigreg"]["headline"] == "fp32" and data["sigreg"]["launches"] > 0
    proj = data["sigreg"]["fp32"]["projection"]["H200"]
    times = " / ".join(perf_model.format_ms(proj[k]) for k in ("graph_ms", "eager_ms"))
    row = [line for line in md_path.read_text().splitlines() if line.startswith("| SIGReg fwd+bwd")][0]
    assert f"| {times} |" in row


def test_readme_projections_sit_next_to_measured_rows(tiny_result, tmp_path):
    # TEST DATA: a fabricated measured result file for an H200 (the numbers are made up),
    # joined to the tiny model's projections by the NVML device name.
    from lewm_fast.bench import readme

    model_json, _ = perf_model.write(tiny_result, tmp_path / "model")
    results = tmp_path / "results"
    results.mkdir()
    env = {
        "device_name": "NVIDIA H200",
        "date": "2026-03-01T00:00:00",
        "torch": "test",
        "git_commit": "abc1234def",
    }
    rows = [
        {"bench": "plan", "case": "1 env, S=300, 30 it", "impl": "fast-bf16-graph", "phase": "plan"},
        {"bench": "plan", "case": "1 env, S=300, 30 it", "impl": "fast-bf16", "phase": "plan"},
        {"bench": "train", "case": "tiny-B128-bf16", "impl": "fast-whole", "phase": "step"},
    ]
    for row, ms in zip(rows, (20.0, 70.0, 55.0)):
        row["median_ms"] = ms
    (results / "nvidia-h200-test.json").write_text(json.dumps({"env": env, "rows": rows}))
    path = tmp_path / "README.md"
    path.write_text(f"# t\n{readme.BEGIN}\n{readme.END}\n{readme.MODEL_BEGIN}\n{readme.MODEL_END}\ntail\n")
    assert readme.update_readme(path, results, tracked_only=False, model_json=model_json) is True
    text = path.read_text()
    bench = text[text.index(readme.BEGIN) : text.index(readme.END)]
    section = text[text.index(readme.MODEL_BEGIN) : text.index(readme.MODEL_END)]
    assert "projected (model)" not in bench  # the measured table stays measured-only
    assert "| workload | precision | device | projected (model) | measured |" in section
    proj = tiny_result["plan_1env"]["bf16"]["projection_per_plan"]["H200"]
    graph, eager = (perf_model.format_ms(proj[k]) for k in ("graph_ms", "eager_ms"))
    label = "plan, 1 env (300 x 30 CEM)"
    assert (
        f"| {label} | bf16 | H200 | {graph} / {eager} | 20 ms (fast-bf16-graph, 2026-03-01, commit abc1234) |"
        in section
    )
    assert f"| {label} | bf16 | RTX 4090 | " in section
    for line in section.splitlines():
        if line.startswith((f"| {label} | fp32 | H200 |", f"| {label} | bf16 | RTX 4090 |")):
            assert line.endswith("| not yet measured |"), line
    train = perf_model.format_ms(tiny_result["train_step"]["whole_bf16"]["projection"]["H200"]["eager_ms"])
    assert (
        f"| training step, batch 128, whole | bf16 | H200 | {train} "
        "| 55 ms (fast-whole, 2026-03-01, commit abc1234) |" in (section)
    )
    assert text.endswith(f"{readme.MODEL_END}\ntail\n")
    assert readme.update_readme(path, results, tracked_only=False, model_json=model_json) is False


def _compiled_count(fn, *shapes, dtype=torch.float32):
    """Eager tally of ``fn(*inputs)`` on fake CUDA tensors, and the torch.compile projection
    of it as one compiled graph whose output outlives it."""
    with FakeTensorMode(), torch.no_grad(), perf_model._counting_patches():
        inputs = [torch.empty(s, device="cuda", dtype=dtype) for s in shapes]
        with perf_model.count() as counter, perf_model._graph_segments(counter) as piece:
            out = piece(fn)(*inputs)
        storage = perf_model._storage(out)
        final = {(counter.last_writer[storage], storage)}
    return counter.tally, perf_model.Tally(perf_model.compiled_kernels(counter.tally.kernels, final))


def test_compiled_projection_fuses_a_pointwise_chain_into_one_kernel():
    # gelu(x * 2 + 1): eager mul, add, gelu each read and write (64, 192) fp32; fused: one
    # kernel reading x and writing the result
    size = 64 * 192 * 4
    eager, compiled = _compiled_count(lambda x: torch.nn.functional.gelu(x * 2 + 1), (64, 192))
    assert (eager.launches, eager.bytes) == (3, 6 * size)
    assert (compiled.launches, compiled.bytes) == (1, 2 * size)
    assert compiled.by_op() == {"inductor::fused": 1}


def test_compiled_projection_counts_one_kernel_per_reduction_and_drops_dead_work():
    # sum((x - mean(x))^2): mean, sub, pow, sum eagerly; fused: two reductions (the mean, the
    # sum), reading x once and writing the scalar. x.sin() is never used: dropped.
    def fn(x):
        x.sin()
        return ((x - x.mean(-1, keepdim=True)) ** 2).sum()

    eager, compiled = _compiled_count(fn, (64, 192))
    assert eager.launches == 5
    assert (compiled.launches, compiled.bytes) == (2, 64 * 192 * 4 + 4)


def test_compiled_projection_keeps_matmuls_and_merges_repeated_casts():
    # autocast-style: x cast to bf16 once per matmul that reads it. Eagerly 4 casts, 2 mm,
    # 1 add; compiled: the second cast of x merges into the first (CSE), the matmuls stay
    # extern kernels, and the casts on either side of a matmul cannot fuse across it:
    # [cast x, cast w1] (2 unconnected groups) mm [cast w2] mm [add] = 6.
    def fn(x, w1, w2):
        b = torch.bfloat16
        return x.to(b) @ w1.to(b) + x.to(b) @ w2.to(b)

    eager, compiled = _compiled_count(fn, (64, 192), (192, 192), (192, 192))
    assert eager.launches == 7 and eager.by_op()["aten::_to_copy"] == 4
    assert compiled.launches == 6
    assert compiled.by_op() == {"inductor::fused": 4, "aten::mm": 2}
    assert compiled.flops == eager.flops == 2 * 2 * 64 * 192 * 192
