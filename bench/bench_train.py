"""Training step: the published path vs lewm_fast's, whole batch and under an 8 GiB budget.

One step = forward + backward + gradient clipping (1.0) + AdamW update, on random
normalised windows (data loading is measured by ``bench_data``).

- reference: the published path: ``lewm_fast.reference`` classes, the reference SIGReg
  (materialises (T, B, P, K)), :func:`lewm_fast.reference.train_step` on the whole batch,
  ``torch.optim.AdamW`` (foreach) and ``loss.item()`` each step (the published trainer
  logs the loss every step).
- fast-<plan>: the public model (fused AdaLN-Zero kernels on CUDA), the fused SIGReg,
  :func:`lewm_fast.train.forward_backward` under the plan, fused AdamW, no host sync.
- fast-<plan>-compile (CUDA): fast-<plan> with ``TrainConfig.compile``'s step
  (:func:`lewm_fast.train.compile_step`, inductor: the plan's forward and backward compiled,
  "whole" replaying CUDA graphs) and the encoder's attention backend the trainer picks.
- fast-8GiB-<plan>: the plan :func:`lewm_fast.train.choose_plan` picks for an 8 GiB budget,
  run with the CUDA caching allocator capped at 8 GiB
  (``torch.cuda.set_per_process_memory_fraction``; uncapped on a card of 8 GiB or less);
  ``grad_rel_err`` is its gradients' relative L2 distance to the whole-batch step's on the
  same batch and seed.

On CUDA: the paper model in bf16 autocast at batch 128, then a batch-size sweep of the fast
step (and the reference). On CPU: the ``tiny`` training preset's model in float32 at batch 8.
``--quick`` runs batch 128 (CPU: 8) alone, without the compiled steps and the sweep. Rows
carry samples/s, achieved TFLOP/s (model FLOPs: recomputation is not counted), the
absolute allocator peak (``peak_GiB``, CUDA only) and, on CUDA, ``launches/step``: the CUDA
kernels ``torch.profiler`` sees in one step (kernels replayed from a CUDA graph count as the
profiler reports them), to set beside the performance model's projected counts.
"""

from __future__ import annotations

import torch

from lewm_fast import LeWMConfig, SIGReg
from lewm_fast import reference as ref
from lewm_fast.backend import choose_sdpa
from lewm_fast.train import TrainConfig, choose_plan, compile_step, forward_backward, parse_size
from lewm_fast.train.memory import cap_vram, uncap_vram

from .harness import Report, peak_extra_memory, time_fn

BENCH = "train"
BUDGET = "8GiB"


def step_flops(config: LeWMConfig, batch_size: int, num_proj: int = 1024) -> float:
    """Model FLOPs of one training step (forward x 3), counting matmuls as 2 per MAC."""
    vit = config.encoder.vit_config()
    d, f, n = vit.hidden_size, vit.intermediate_size, vit.num_hidden_layers
    patches = vit.num_patches
    tokens = patches + 1
    t = config.predictor.num_frames + 1
    frames = batch_size * t
    encoder = patches * 3 * vit.patch_size**2 * d + n * (tokens * (4 * d * d + 2 * d * f) + 2 * tokens**2 * d)
    pp, pq = config.projector, config.pred_proj
    projector = frames * (pp.input_dim * pp.hidden_dim + pp.hidden_dim * pp.output_dim)
    pred_tokens = batch_size * (t - 1)
    pc = config.predictor
    inner = pc.heads * pc.dim_head
    block = 6 * pc.hidden_dim**2 + 4 * pc.hidden_dim * inner + 2 * pc.hidden_dim * pc.mlp_dim
    predictor = pred_tokens * (
        pc.depth * block + pq.input_dim * pq.hidden_dim + pq.hidden_dim * pq.output_dim
    )
    ac = config.action_encoder
    actions = frames * (ac.input_dim * ac.smoothed_dim + ac.smoothed_dim * 4 * ac.emb_dim + 4 * ac.emb_dim**2)
    sigreg = frames * pp.output_dim * num_proj
    forward_macs = frames * encoder + projector + predictor + actions + sigreg
    return 3 * 2 * float(forward_macs)


def _setting(device: torch.device, quick: bool):
    if device.type == "cuda":
        return TrainConfig(), 128, (() if quick else (32, 64, 256, 512))
    return TrainConfig.preset("tiny"), 8, (() if quick else (4, 16))


def _batch(config: LeWMConfig, b: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    s, t = config.encoder.image_size, config.predictor.num_frames + 1
    action = torch.randn(b, t, config.action_encoder.input_dim, device=device, generator=g)
    action[:, -1] = float("nan")  # window edges, as in real batches
    return {"pixels": torch.randn(b, t, 3, s, s, device=device, generator=g), "action": action}


class _Step:
    """A model, its SIGReg and AdamW, and one training step as a closure."""

    def __init__(
        self, cfg: TrainConfig, device: torch.device, *, reference: bool, plan=None, chunk=None, compile=False
    ):
        torch.manual_seed(cfg.seed)
        self.model = cfg.model.build(reference=reference).to(device).train()
        self.params = list(self.model.parameters())
        self.dtype = cfg.autocast_dtype if device.type == "cuda" else None
        self.functions = compile_step(plan, device) if compile else None
        self.sdpa = None
        if compile:  # as the trainer does: the encoder's attention backend, chosen and enabled
            vit = cfg.model.encoder.vit_config()
            heads = vit.num_attention_heads
            shape = (heads, 1 + vit.num_patches, vit.hidden_size // heads)
            self.sdpa = choose_sdpa(device, self.dtype or torch.float32, shape).backend
        self.device, self.plan, self.chunk, self.reference = device, plan, chunk, reference
        kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        if reference:
            self.sigreg = ref.SIGReg(cfg.sigreg_knots, cfg.sigreg_num_proj).to(device)
            self.optimizer = torch.optim.AdamW(self.params, **kwargs)
        else:
            self.sigreg = SIGReg(cfg.sigreg_knots, cfg.sigreg_num_proj).to(device)
            self.optimizer = torch.optim.AdamW(self.params, fused=True, **kwargs)

    def grads(self, batch: dict) -> None:
        if self.reference:
            with torch.autocast(
                self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None
            ):
                losses = ref.jepa_loss(self.model, self.sigreg, batch)
            losses["loss"].backward()
            return losses["loss"]
        return forward_backward(
            self.model,
            self.sigreg,
            batch,
            self.plan,
            self.chunk,
            autocast_dtype=self.dtype,
            functions=self.functions,
            sdpa_backend=self.sdpa,
        )["loss"]

    def __call__(self, batch: dict) -> None:
        loss = self.grads(batch)
        if self.reference:
            ref.optimizer_step(self.model, self.optimizer, 1.0)
            loss.item()
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def _absolute_peak(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def _launches(fn, device: torch.device) -> int | None:
    """CUDA kernels ``torch.profiler`` records during one call of ``fn`` (None off CUDA or
    when the profiler fails)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as exc:  # a profiler that cannot start (CUPTI missing) loses one metric
        print(f"[bench train] launches/step not counted: {type(exc).__name__}: {exc}")
        return None


def _measure(report, case, impl, step: _Step, batch, flops, reps, **extra) -> None:
    device = report.device
    # No L2 flush: a step moves gigabytes, far more than any L2, and a flush buffer would
    # count against the 8 GiB cap of the budget case.
    timing = time_fn(lambda: step(batch), device, warmup=2, reps=reps, max_seconds=15.0, flush_l2=False)
    peak = _absolute_peak(lambda: step(batch), device)
    extra_bytes = peak_extra_memory(lambda: step(batch), device)
    launches = _launches(lambda: step(batch), device)
    if launches is not None:
        extra = {**extra, "launches/step": launches}
    metrics = {
        "samples/s": batch["pixels"].shape[0] / (timing.median_ms / 1e3),
        "TFLOP/s": flops / (timing.median_ms * 1e9),
        **extra,
    }
    if peak is not None:
        metrics["peak_GiB"] = peak
    report.add(BENCH, case, impl, "step", timing, peak_extra_bytes=extra_bytes, **metrics)


def _grad_rel_err(cfg, device, batch, plan, chunk) -> float:
    grads = []
    for p, c in (("whole", None), (plan, chunk)):
        step = _Step(cfg, device, reference=False, plan=p, chunk=c)
        torch.manual_seed(1)
        step.grads(batch)
        grads.append(torch.cat([q.grad.double().flatten() for q in step.params]))
        del step
    return float((grads[1] - grads[0]).norm() / grads[0].norm())


def run(report: Report, quick: bool = False) -> None:
    device = report.device
    cfg, batch_size, sweep = _setting(device, quick)
    reps = 3 if device.type != "cuda" else (5 if quick else 15)
    name = "paper" if device.type == "cuda" else "tiny"
    precision = cfg.precision if device.type == "cuda" else "fp32"

    def case(b: int) -> str:
        return f"{name}-B{b}-{precision}"

    for b in (batch_size, *sweep):
        batch = _batch(cfg.model, b, device)
        flops = step_flops(cfg.model, b, cfg.sigreg_num_proj)
        impls = [("reference", dict(reference=True))]
        if b == batch_size:
            plans = ("whole", "checkpoint", "two_pass")
            impls += [(f"fast-{p}", dict(reference=False, plan=p)) for p in plans]
            if device.type == "cuda" and not quick:
                impls += [(f"fast-{p}-compile", dict(reference=False, plan=p, compile=True)) for p in plans]
        else:
            impls += [("fast-whole", dict(reference=False, plan="whole"))]
        for impl, kwargs in impls:
            try:
                step = _Step(cfg, device, **kwargs)
                _measure(report, case(b), impl, step, batch, flops, reps)
            except torch.cuda.OutOfMemoryError:
                print(f"[bench train] {case(b)} {impl}: out of memory, skipped")
            finally:
                step = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        if b == batch_size:
            _budget_case(report, cfg, batch, case(b), flops, reps, precision)


def _budget_case(report, cfg, batch, case, flops, reps, precision) -> None:
    """The fast step under the 8 GiB budget: the plan choose_plan picks, allocator capped."""
    device = report.device
    b = batch["pixels"].shape[0]
    estimate = choose_plan(cfg.model, b, parse_size(BUDGET), precision=precision)
    err = _grad_rel_err(cfg, device, batch, estimate.plan, estimate.chunk_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    capped = cap_vram(device, parse_size(BUDGET))
    try:
        step = _Step(cfg, device, reference=False, plan=estimate.plan, chunk=estimate.chunk_size)
        _measure(
            report,
            case,
            f"fast-{BUDGET}-{estimate.plan}",
            step,
            batch,
            flops,
            reps,
            grad_rel_err=err,
            predicted_peak_GiB=estimate.peak_bytes / 2**30,
        )
    except torch.cuda.OutOfMemoryError:
        print(f"[bench train] {case} under {BUDGET} ({estimate.plan}): out of memory")
    finally:
        if capped:
            uncap_vram(device)
            torch.cuda.empty_cache()
