"""Planning: fast cost vs JEPA.get_cost, batched refit vs the reference, the CEM solver."""

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import model_pair, randomize_, small_config

import lewm_fast
from lewm_fast import reference as ref
from lewm_fast.plan import CEMSolver, PlanningCost, cem_refit, cem_refit_torch, plan_seed, planning_cost
from lewm_fast.testing import assert_close, assert_low_precision

PIX = (3, 56, 56)


def _expand(value, samples):
    return value.unsqueeze(1).expand(value.shape[0], samples, *value.shape[1:])


def _reference_cost(model, pixels, goal, candidates, history_size=None):
    """The published path: get_cost on info values repeated per sample, (B, S, ...); with a
    history size, the reference rollout at that window and the criterion."""
    s = candidates.shape[1]
    info = {"pixels": _expand(pixels, s), "goal": _expand(goal, s)}
    with torch.no_grad():
        if history_size is None:
            return model.get_cost(info, candidates)
        goal_info = {"pixels": info["goal"][:, 0]}
        info["goal_emb"] = model.encode(goal_info)["emb"]
        return model.criterion(model.rollout(info, candidates, history_size=history_size))


# ------------------------------------------------------------------ fast cost

COST_CASES = [  # (id, config overrides, B, S, T, context frames, goal frames, history)
    ("B2-S7-T5", {}, 2, 7, 5, 1, 1, 3),
    ("B1-S1-T5", {}, 1, 1, 5, 1, 1, 3),
    ("B3-S13-T4-odd", {}, 3, 13, 4, 1, 2, 3),
    ("H2-context", {}, 2, 5, 5, 2, 1, 3),
    ("T1", {}, 2, 4, 1, 1, 1, 3),
    ("history2", {}, 2, 6, 5, 1, 1, 2),
    ("hidden40-projections", {"predictor.hidden_dim": 40}, 2, 5, 5, 1, 1, 3),
    ("frames4-history4-H3", {"predictor.num_frames": 4}, 1, 3, 6, 3, 1, 4),
]


@pytest.mark.parametrize(
    "overrides,b,s,t,h,g,hist", [c[1:] for c in COST_CASES], ids=[c[0] for c in COST_CASES]
)
def test_fast_cost_matches_get_cost_fp32(overrides, b, s, t, h, g, hist):
    public, reference = (m.eval() for m in model_pair(small_config(**overrides), seed=3))
    pixels, goal = torch.randn(b, h, *PIX), torch.randn(b, g, *PIX)
    candidates = torch.randn(b, s, t, 10)
    want = _reference_cost(reference, pixels, goal, candidates, hist)
    for model in (public, reference):
        got = planning_cost(model, {"pixels": pixels, "goal": goal}, candidates, history_size=hist)
        assert got.shape == (b, s)
        assert_close(got, want, "fp32_gemm", "planning cost")


@pytest.mark.parametrize("frames", [1, 2, 3, 4])
def test_planning_window_is_the_predictors_num_frames(frames):
    """Spec section 6: the rollout window is the predictor's num_frames unless a history size is
    given. A num_frames = 4 checkpoint planned with window 3 gave costs 24% (relative L2) away
    from the published get_cost of the same weights; one with num_frames < 3 could not plan."""
    config = small_config(**{"predictor.num_frames": frames})
    public, reference = (m.eval() for m in model_pair(config, seed=21))
    pixels, goal, candidates = torch.randn(2, 1, *PIX), torch.randn(2, 1, *PIX), torch.randn(2, 6, 5, 10)
    want = _reference_cost(reference, pixels, goal, candidates, history_size=frames)  # rollout at W = frames
    s = candidates.shape[1]
    for model in (public, reference):  # get_cost takes no window: it must use num_frames
        got = model.get_cost({"pixels": _expand(pixels, s), "goal": _expand(goal, s)}, candidates)
        assert_close(got, want, "fp32_gemm", f"get_cost, num_frames {frames}")
        fast = planning_cost(model, {"pixels": pixels, "goal": goal}, candidates)
        assert_close(fast, want, "fp32_gemm", f"fast cost, num_frames {frames}")
    solver = CEMSolver(public, action_dim=10, num_samples=4, n_steps=1, topk=2)
    assert solver.history_size == frames and solver._cost.history_size == frames
    if frames > 1:  # an explicit history size still overrides the model's window
        one = _reference_cost(reference, pixels, goal, candidates, history_size=1)
        assert_close(
            planning_cost(public, {"pixels": pixels, "goal": goal}, candidates, 1), one, "fp32_gemm", "W=1"
        )
        assert not torch.allclose(one, want)
        assert (
            CEMSolver(public, action_dim=10, num_samples=4, n_steps=1, topk=2, history_size=1).history_size
            == 1
        )


def test_fast_cost_matches_get_cost_bf16_autocast():
    public, reference = (m.eval() for m in model_pair(small_config(), seed=4))
    pixels, goal, candidates = torch.randn(3, 1, *PIX), torch.randn(3, 1, *PIX), torch.randn(3, 9, 5, 10)
    info = {"pixels": pixels, "goal": goal}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = planning_cost(public, info, candidates)
        low = _reference_cost(reference, pixels, goal, candidates)
    fp32 = _reference_cost(reference, pixels, goal, candidates)
    assert fast.dtype == torch.float32
    assert_low_precision(fast, low, fp32, "planning cost (bf16 autocast)")


def test_fast_cost_differs_for_different_candidates():
    """The cost reads every action: changing only the last one changes it."""
    public, _ = model_pair(small_config(), seed=5)
    pixels, goal, candidates = torch.randn(1, 1, *PIX), torch.randn(1, 1, *PIX), torch.randn(1, 2, 5, 10)
    candidates[0, 1] = candidates[0, 0]
    candidates[0, 1, -1] += 1.0
    cost = planning_cost(public.eval(), {"pixels": pixels, "goal": goal}, candidates)
    assert not torch.isclose(cost[0, 0], cost[0, 1])


@pytest.mark.parametrize(
    "info,candidates,match",
    [
        ({"pixels": torch.randn(2, 1, *PIX)}, torch.randn(2, 3, 5, 10), "'goal'"),
        (
            {"pixels": torch.randn(2, *PIX), "goal": torch.randn(2, 1, *PIX)},
            torch.randn(2, 3, 5, 10),
            "pixels",
        ),
        (
            {"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(3, 1, *PIX)},
            torch.randn(2, 3, 5, 10),
            "env axis",
        ),
        (
            {"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(2, 1, *PIX)},
            torch.randn(2, 3, 5, 4),
            "10 numbers",
        ),
        (
            {"pixels": torch.randn(2, 2, *PIX), "goal": torch.randn(2, 1, *PIX)},
            torch.randn(2, 3, 1, 10),
            "fewer",
        ),
        (
            {"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(2, 1, *PIX)},
            torch.randn(2, 5, 10),
            "(B, S, T, A)",
        ),
    ],
    ids=["no-goal", "pixels-4d", "env-mismatch", "action-width", "horizon-lt-context", "candidates-3d"],
)
def test_planning_cost_bad_input(info, candidates, match):
    public, _ = model_pair(small_config())
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        planning_cost(public.eval(), info, candidates)


def test_planning_cost_needs_eval_mode_and_a_jepa():
    public, _ = model_pair(small_config())
    info = {"pixels": torch.randn(1, 1, *PIX), "goal": torch.randn(1, 1, *PIX)}
    with pytest.raises(ValueError, match="eval mode"):
        planning_cost(public.train(), info, torch.randn(1, 2, 5, 10))
    with pytest.raises(ValueError, match="LeWM JEPA"):
        PlanningCost(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="history_size"):
        PlanningCost(public, history_size=4)


# ---------------------------------------------------------------- refit op

REFIT_CASES = [  # (id, B, S, T, A, topk)
    ("paper", 3, 300, 5, 10, 30),
    ("B1-S2-K2", 1, 2, 1, 1, 2),
    ("odd", 4, 37, 3, 7, 11),
    ("K=S", 2, 9, 2, 3, 9),
]


def _refit_inputs(b, s, t, a, gen):
    candidates = torch.randn(b, s, t, a, generator=gen) * 2 + 0.5
    costs = torch.rand(b, s, generator=gen) * 10
    mean, std = torch.randn(b, t, a, generator=gen), torch.rand(b, t, a, generator=gen) + 0.5
    return candidates, costs, mean, std


def _reference_refit(candidates, costs, mean, std, topk):
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(candidates.shape[0]):
            outs.append(ref.cem_refit(candidates[i], costs[i], mean[i], std[i], topk))
    return [torch.stack(x) for x in zip(*outs)]


def _with_nans(costs, gen):
    """Env 0: a few NaN; env 1 (if any): all but one NaN; env 2 (if any): all NaN."""
    costs = costs.clone()
    b, s = costs.shape
    costs[0, torch.randperm(s, generator=gen)[: max(1, s // 5)]] = float("nan")
    if b > 1:
        costs[1, 1:] = float("nan")
    if b > 2:
        costs[2] = float("nan")
    return costs


@pytest.mark.parametrize("b,s,t,a,k", [c[1:] for c in REFIT_CASES], ids=[c[0] for c in REFIT_CASES])
@pytest.mark.parametrize("nans", [False, True], ids=["finite", "nan"])
def test_batched_refit_matches_reference(b, s, t, a, k, nans):
    gen = torch.Generator().manual_seed(b * 1000 + s)
    candidates, costs, mean, std = _refit_inputs(b, s, t, a, gen)
    if nans:
        costs = _with_nans(costs, gen)
    want_mean, want_std, want_cost = _reference_refit(candidates, costs, mean, std, k)
    got = cem_refit_torch(candidates, costs, mean, std, k)
    assert_close(got.mean, want_mean, "fp32_elementwise", "elite mean")
    assert_close(got.std, want_std, "fp32_elementwise", "elite std")
    finite = torch.isfinite(want_cost)
    assert torch.equal(torch.isfinite(got.elite_cost), finite)
    if finite.any():
        assert_close(got.elite_cost[finite], want_cost[finite], "fp32_elementwise", "elite cost")
    assert torch.equal(got.nan_count, torch.isnan(costs).sum(1).int())


@pytest.mark.parametrize("b,s,t,a,k", [c[1:] for c in REFIT_CASES], ids=[c[0] for c in REFIT_CASES])
def test_csrc_cpu_refit_matches_torch(b, s, t, a, k):
    gen = torch.Generator().manual_seed(7 + s)
    candidates, costs, mean, std = _refit_inputs(b, s, t, a, gen)
    costs = _with_nans(costs, gen)
    costs[0, 0] = float("inf")  # a genuine +inf cost sorts before NaN
    got = cem_refit(candidates, costs, mean, std, k, backend="cuda")  # the csrc op (C++ on CPU)
    want = cem_refit_torch(candidates, costs, mean, std, k)
    assert_close(got.mean, want.mean, "fp32_elementwise", "elite mean")
    assert_close(got.std, want.std, "fp32_elementwise", "elite std")
    assert torch.equal(got.nan_count, want.nan_count)
    assert torch.equal(torch.isnan(got.elite_cost), torch.isnan(want.elite_cost))
    assert torch.equal(torch.isposinf(got.elite_cost), torch.isposinf(want.elite_cost))
    ok = torch.isfinite(want.elite_cost)
    if ok.any():
        assert_close(got.elite_cost[ok], want.elite_cost[ok], "fp32_elementwise", "elite cost")


def test_refit_is_what_cem_means():
    """Elites: the topk lowest costs; mean and unbiased std over them (checked by hand)."""
    candidates = torch.randn(1, 20, 2, 3)
    costs = torch.randn(1, 20)
    for backend in ("torch", "cuda"):
        out = cem_refit(candidates, costs, torch.zeros(1, 2, 3), torch.ones(1, 2, 3), 4, backend=backend)
        elites = candidates[0, costs[0].argsort()[:4]]
        assert_close(out.mean[0], elites.mean(0), "fp32_elementwise", f"{backend} mean")
        assert_close(out.std[0], elites.std(0, unbiased=True), "fp32_elementwise", f"{backend} std")
        assert_close(out.elite_cost, costs[0].sort().values[:4].mean().view(1), "fp32_elementwise")


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_nan_costs_are_never_elites(backend):
    gen = torch.Generator().manual_seed(1)
    candidates, costs, mean, std = _refit_inputs(2, 50, 3, 4, gen)
    # The NaN-cost candidates sit far away: any of them in the elites would move the mean.
    bad = torch.rand(2, 50, generator=gen) < 0.5
    bad[:, 0] = True
    costs[bad] = float("nan")
    candidates[bad] = 1e6
    out = cem_refit(candidates, costs, mean, std, 30, backend=backend)
    assert out.mean.abs().max() < 100 and out.std.abs().max() < 100
    assert torch.equal(out.nan_count, bad.sum(1).int())


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_refit_keeps_distribution_without_two_elites(backend):
    candidates, costs = torch.randn(2, 6, 2, 2), torch.randn(2, 6)
    costs[0, 1:] = float("nan")  # one finite cost left
    costs[1] = float("nan")
    mean, std = torch.randn(2, 2, 2), torch.rand(2, 2, 2) + 0.1
    out = cem_refit(candidates, costs, mean, std, 3, backend=backend)
    assert torch.equal(out.mean, mean) and torch.equal(out.std, std)
    assert out.elite_cost[0] == costs[0, 0] and torch.isnan(out.elite_cost[1])


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(2, 5, 3, 2), torch.randn(2, 5), torch.zeros(2, 3, 2), torch.ones(2, 3, 2), 6), "topk"),
        ((torch.randn(2, 5, 3, 2), torch.randn(2, 5), torch.zeros(2, 3, 2), torch.ones(2, 3, 2), 1), "topk"),
        ((torch.randn(2, 5, 3, 2), torch.randn(2, 4), torch.zeros(2, 3, 2), torch.ones(2, 3, 2), 2), "costs"),
        ((torch.randn(2, 5, 3, 2), torch.randn(2, 5), torch.zeros(2, 3, 3), torch.ones(2, 3, 2), 2), "mean"),
        (
            (torch.randn(5, 3, 2), torch.randn(2, 5), torch.zeros(2, 3, 2), torch.ones(2, 3, 2), 2),
            "candidates",
        ),
    ],
    ids=["topk-gt-S", "topk-1", "costs-shape", "mean-shape", "candidates-3d"],
)
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_refit_bad_arguments(args, match, backend):
    with pytest.raises(ValueError, match=match):
        cem_refit(*args, backend=backend)


def test_csrc_op_checks_its_inputs():
    """The C++ binding itself rejects bad input with a ValueError (not only the Python wrapper)."""
    import torch as t

    from lewm_fast import _csrc

    assert _csrc.load("cem_refit_cpu", t.device("cpu"))
    op = t.ops.lewm_fast.cem_refit
    good = (t.randn(2, 5, 3, 2), t.randn(2, 5), t.zeros(2, 3, 2), t.ones(2, 3, 2))
    with pytest.raises(ValueError, match="float32"):
        op(good[0].double(), *good[1:], 2)
    with pytest.raises(ValueError, match="contiguous"):
        op(good[0].transpose(2, 3).contiguous().transpose(2, 3), *good[1:], 2)
    with pytest.raises(ValueError, match="topk"):
        op(*good, 9)
    with pytest.raises(ValueError, match="costs"):
        op(good[0], t.randn(5, 2), *good[2:], 2)


# ------------------------------------------------------------------- solver


class Quadratic:
    """A known cost: squared distance of the plan to a per-env target, ``info['target']``."""

    def __init__(self, nan_fraction=0.0):
        self.nan_fraction = nan_fraction
        self.calls = 0

    def get_cost(self, info, candidates):
        self.calls += 1
        target = info["target"]  # (B, S, T, A), repeated per sample
        assert target.shape == candidates.shape
        cost = (candidates - target).square().sum(dim=(-2, -1))
        if self.nan_fraction:
            cost[torch.rand(cost.shape) < self.nan_fraction] = float("nan")
        return cost


def test_both_planners_converge_on_a_quadratic():
    targets = torch.randn(3, 4, 2) * 0.8
    kwargs = {"horizon": 4, "action_dim": 2, "num_samples": 200, "n_steps": 25, "topk": 20}
    fast = CEMSolver(Quadratic(), seed=1, **kwargs).solve({"target": targets})
    plain = ref.cem_plan(
        Quadratic().get_cost, {"target": targets}, generator=torch.Generator().manual_seed(1), **kwargs
    )
    for plan in (fast, plain):
        assert plan["actions"].shape == (3, 4, 2)
        assert (plan["actions"] - targets).abs().max() < 0.05
        assert plan["costs"].shape == (3,) and (plan["costs"] < 0.01).all()
    start = (targets**2).sum(dim=(1, 2))  # the cost of the initial mean (zeros)
    assert (fast["costs"] < 1e-2 * start).all()


def test_solver_masks_nan_costs_with_one_warning():
    targets = torch.randn(2, 3, 2)
    solver = CEMSolver(
        Quadratic(nan_fraction=0.3), horizon=3, action_dim=2, num_samples=60, n_steps=10, topk=10
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = solver.solve({"target": targets})
    nan_warnings = [w for w in caught if "NaN" in str(w.message)]
    assert len(nan_warnings) == 1
    assert torch.isfinite(plan["actions"]).all()
    assert (plan["actions"] - targets).abs().max() < 0.3


def test_solver_expands_info_per_sample():
    """Tensors and arrays reach get_cost as (B, S, ...); other values pass through."""
    seen = {}

    class Recorder(Quadratic):
        def get_cost(self, info, candidates):
            seen.update(extra=info["extra"].shape, flag=info["flag"], target=info["target"].shape)
            return super().get_cost(info, candidates)

    model = Recorder()
    solver = CEMSolver(model, horizon=2, action_dim=3, num_samples=8, n_steps=3, topk=2)
    solver.solve({"target": torch.randn(4, 2, 3), "extra": np.arange(4.0), "flag": "x"})
    assert seen == {"extra": (4, 8), "flag": "x", "target": (4, 8, 2, 3)}
    assert model.calls == 3


def test_solver_fast_path_equals_get_cost_path():
    """Same seed: the fast path and the published get_cost path give the same plan."""
    public, _ = model_pair(small_config(), seed=6)
    public.eval()
    info = {"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(2, 1, *PIX)}
    kwargs = {"action_dim": 10, "num_samples": 24, "n_steps": 3, "topk": 5, "seed": 11}
    fast = CEMSolver(public, **kwargs).solve(info)
    slow = CEMSolver(public, fast=False, **kwargs).solve(info)
    assert fast["seed"] == slow["seed"] == plan_seed(11, 0)
    assert_close(fast["actions"], slow["actions"], "fp32_gemm", "plan")
    assert_close(fast["costs"], slow["costs"], "fp32_gemm", "elite cost")


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that needs the host to wait for the device (a CUDA graph cannot hold one)."""

    SYNCING = {
        "_local_scalar_dense",
        "nonzero",
        "is_nonzero",
        "equal",
        "masked_select",
        "unique_dim",
        "_unique2",
        "repeat_interleave",
        "item",
    }

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCING:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_solve_body_never_waits_for_the_device(autocast):
    """The body CUDA graphs capture (encode, rollout, refit, every iteration) on CPU: no op in it
    reads a tensor value on the host, so capture cannot fail on a sync and replay stays launch-only."""
    public, _ = model_pair(small_config(), seed=12)
    solver = CEMSolver(public.eval(), action_dim=10, num_samples=9, n_steps=3, topk=3, autocast=autocast)
    pixels, goal = torch.randn(2, 1, *PIX), torch.randn(2, 1, *PIX)
    mean0 = solver._mean0(2, None)
    probe = _HostSyncs()
    with torch.no_grad():
        syncs_of_item = _HostSyncs()
        with syncs_of_item:
            torch.ones(1).item()
        assert syncs_of_item.seen, "the detector must see a host read"
        with probe:
            solver._generator().manual_seed(1)
            mean, std, elite_cost, nan_count, faults = solver._fast_body(pixels, goal, mean0, solver.n_steps)
    assert probe.seen == []  # the frame checks included: their counts are read after the solve
    assert mean.shape == std.shape == (2, 5, 10) and torch.isfinite(elite_cost).all()
    assert faults.shape == (2, 2, 2) and not faults[:, 0].any()  # (pixels/goal, count/peak, env)


def test_low_precision_copy_gives_the_autocast_numbers():
    """Autocast computes Linear/Conv in bf16 from weights it rounds at every call; the copy
    holds those rounded weights, so the fast cost is bit-for-bit the same without the casts."""
    from lewm_fast.plan import LowPrecisionWeights

    public, _ = model_pair(small_config(), seed=14)
    public.eval()
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        LowPrecisionWeights(public, torch.float32)
    low = LowPrecisionWeights(public, torch.bfloat16).sync()
    assert low is not public and not low.training
    for name, p in low.named_parameters():
        module = low.get_submodule(name.rpartition(".")[0])
        cast = isinstance(module, LowPrecisionWeights.CAST)
        assert p.dtype == (torch.bfloat16 if cast else torch.float32), name
    pixels, goal, candidates = torch.randn(2, 1, *PIX), torch.randn(2, 1, *PIX), torch.randn(2, 9, 5, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = PlanningCost(public)(pixels, goal, candidates)
        got = PlanningCost(low)(pixels, goal, candidates)
    assert torch.equal(got, want)


def test_low_precision_copy_follows_the_model_weights():
    """In-place weight changes (optimizer steps, load_state_dict) refresh the copy in place (a
    captured graph stays valid); replaced tensors rebuild it. Plans always use the live weights."""
    public, _ = model_pair(small_config(), seed=15)
    other, _ = model_pair(small_config(), seed=16)
    public.eval(), other.eval()
    info = {"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(2, 1, *PIX)}
    kwargs = {"action_dim": 10, "num_samples": 12, "n_steps": 2, "topk": 3, "autocast": torch.bfloat16}
    solver = CEMSolver(public, **kwargs)
    before = solver.solve(info, seed=1)
    copy, ptr = solver._cost.model, next(solver._cost.model.parameters()).data_ptr()
    with torch.no_grad():
        public.load_state_dict(other.state_dict())
    after = solver.solve(info, seed=1)
    assert solver._cost.model is copy and next(copy.parameters()).data_ptr() == ptr
    assert torch.equal(after["actions"], CEMSolver(other, **kwargs).solve(info, seed=1)["actions"])
    assert not torch.equal(after["actions"], before["actions"])
    public.pred_proj.net[0].weight = torch.nn.Parameter(public.pred_proj.net[0].weight.detach() * 2)
    solver.solve(info, seed=1)
    assert solver._cost.model is not copy  # a replaced tensor: a new copy


@pytest.mark.parametrize(
    "envs,samples,rows", [(3, 10, None), (3, 10, 30), (3, 10, 25), (3, 10, 4), (1, 7, 3), (5, 4, 9)]
)
def test_rollout_chunks_cover_every_row_once_in_order(envs, samples, rows):
    chunks = CEMSolver._chunks(envs, samples, rows)
    order = [(b, s) for e, sl in chunks for b in range(envs)[e] for s in range(samples)[sl]]
    assert order == [(b, s) for b in range(envs) for s in range(samples)]
    if rows is not None:
        assert all(len(range(envs)[e]) * len(range(samples)[sl]) <= rows for e, sl in chunks)


def _attention_rows(monkeypatch) -> list[int]:
    """From now on, the rows (candidates) of every attention call of the planning cost (the
    blocks' cached attention, ``Attention.attend_cached``)."""
    from lewm_fast.reference import modules as cost_module

    rows = []
    attention = cost_module.scaled_dot_product_attention
    monkeypatch.setattr(
        cost_module,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: (rows.append(q.shape[0]), attention(q, k, v, **kw))[1],
    )
    return rows


@pytest.mark.parametrize("max_batch", [25, 4], ids=["whole-envs", "sample-chunks"])
def test_solver_max_batch_scores_in_chunks_with_the_same_plan(monkeypatch, max_batch):
    """max_batch bounds every predictor rollout's rows (envs x samples); the plan is unchanged."""

    public, _ = model_pair(small_config(), seed=17)
    info = {"pixels": torch.randn(3, 1, *PIX), "goal": torch.randn(3, 1, *PIX)}
    kwargs = {"action_dim": 10, "num_samples": 10, "n_steps": 3, "topk": 3, "seed": 8}
    whole = CEMSolver(public.eval(), **kwargs).solve(info)
    batches = _attention_rows(monkeypatch)
    chunked = CEMSolver(public, max_batch=max_batch, **kwargs).solve(info)
    assert batches and max(batches) <= max_batch and max(batches) < 30
    assert_close(chunked["actions"], whole["actions"], "fp32_gemm", "plan")
    assert_close(chunked["costs"], whole["costs"], "fp32_gemm", "elite cost")
    auto = CEMSolver(public, max_batch="auto", **kwargs)
    assert auto._batch_rows(3) is None  # "auto" sizes by free CUDA memory; no chunks on CPU
    for bad in (0, -2, "all", 2.5):
        with pytest.raises(ValueError, match="max_batch"):
            CEMSolver(public, max_batch=bad, **kwargs)


@pytest.mark.parametrize("max_batch", [None, 4], ids=["one-batch", "chunks"])
def test_solver_active_plans_only_those_envs_and_as_the_full_batch(monkeypatch, max_batch):
    """solve(active=mask) scores only the active envs' candidates, each from the noise of a
    full solve, so their plans equal the full solve's; all or none active plans everything."""

    public, _ = model_pair(small_config(), seed=17)
    info = {"pixels": torch.randn(4, 1, *PIX), "goal": torch.randn(4, 1, *PIX)}
    kwargs = {"action_dim": 10, "num_samples": 10, "n_steps": 3, "topk": 3, "seed": 8, "max_batch": max_batch}
    whole = CEMSolver(public.eval(), **kwargs).solve(info, seed=5)
    rows = _attention_rows(monkeypatch)
    active = torch.tensor([False, True, False, True])
    part = CEMSolver(public, **kwargs).solve(info, seed=5, active=active)
    assert rows and sum(rows) <= 2 * 10 * 3 * 5 * 2  # 2 envs x 10 samples; 3 iterations x 5 steps x 2 blocks
    for key in ("actions", "costs"):
        assert_close(part[key][active], whole[key][active], "fp32_gemm", key)
    assert torch.isfinite(part["actions"]).all()  # the others' plans mean nothing but stay finite
    for everything in (torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)):
        same = CEMSolver(public, **kwargs).solve(info, seed=5, active=everything)
        assert torch.equal(same["actions"], whole["actions"])
    for bad in (torch.ones(3, dtype=torch.bool), torch.ones(4), [True] * 4):
        with pytest.raises(ValueError, match="active"):
            CEMSolver(public, **kwargs).solve(info, active=bad)


def test_bytes_per_row_estimate_scales_with_the_model_and_dtype():
    paper = lewm_fast.LeWMConfig.preset("paper").build().eval()
    cost = PlanningCost(paper)
    fp32, bf16 = cost.bytes_per_row(5), cost.bytes_per_row(5, torch.bfloat16)
    assert 200_000 < fp32 < 1_000_000 and 0.4 * fp32 < bf16 < 0.7 * fp32
    assert cost.bytes_per_row(10) > fp32  # more steps: more modulations to hold


def test_rollout_runs_one_block_kernel_per_block_step(monkeypatch):
    """With the Triton backend (interpreted here) every predictor block step of the planning
    cost is one fused block kernel (``kernels.block_step``; two for the last block of a
    shifted window: keys/values of the earlier tokens, then the last), reading the modulation's sliding
    windows as strided views, with no AdaLN-Zero kernel left; the costs equal the PyTorch
    backend's, and with ``step_kernel = False`` the AdaLN-Zero kernels run instead and get
    each window as views (made contiguous once per block, never copied by the kernels)."""
    pytest.importorskip("triton")
    from lewm_fast.backend import triton_interpreter
    from lewm_fast.kernels import adaln, block_step

    if not triton_interpreter():
        pytest.skip("runs the kernels in the Triton interpreter on CPU tensors")
    calls, copies = [], []
    launcher, rows = block_step.block_step_fwd, adaln._rows

    def counting_launcher(x, mod, *args):
        calls.append((tuple(x.shape), mod.is_contiguous()))
        return launcher(x, mod, *args)

    def counting_rows(t, d):
        out = rows(t, d)
        calls.append("adaln")
        if out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            copies.append(tuple(t.shape))
        return out

    monkeypatch.setattr(block_step, "block_step_fwd", counting_launcher)
    monkeypatch.setattr(adaln, "_rows", counting_rows)
    fused, _ = model_pair(small_config(), seed=18)
    fused.eval()
    blocks = list(fused.predictor.transformer.layers)
    pixels, goal, candidates = torch.randn(2, 1, *PIX), torch.randn(2, 1, *PIX), torch.randn(2, 5, 5, 10)

    def cost(backend, step_kernel=True):
        for block in blocks:
            block.backend, block.step_kernel = backend, step_kernel
        with torch.no_grad():
            return PlanningCost(fused)(pixels, goal, candidates)

    got = cost("triton")
    # horizon 5 from 1 context frame: 5 predictor calls; the last 2 are shifted 3-token
    # windows, whose last block writes the first 2 tokens' keys/values in a launch of its own
    assert len(calls) == 5 * len(blocks) + 2 and "adaln" not in calls
    assert any(not contiguous for _, contiguous in calls)  # shifted windows: strided (N, 3, 6D) views
    want = cost("torch")
    assert_close(got, want, "fp32_gemm", "block-kernel planning cost")
    calls.clear()
    pieces = cost("triton", step_kernel=False)
    assert calls and set(calls) == {"adaln"} and copies == []
    assert_close(pieces, want, "fp32_gemm", "AdaLN-kernel planning cost")


def test_solver_plans_past_the_attention_batch_limit(monkeypatch):
    """envs x samples above the fused-attention grid limit: attention runs in chunks, same plan."""
    from lewm_fast.reference import attention

    public, _ = model_pair(small_config(), seed=13)
    info = {"pixels": torch.randn(3, 1, *PIX), "goal": torch.randn(3, 1, *PIX)}
    kwargs = {"action_dim": 10, "num_samples": 10, "n_steps": 2, "topk": 3, "seed": 4}
    whole = CEMSolver(public.eval(), **kwargs).solve(info)
    monkeypatch.setattr(attention, "MAX_BATCH", 7)  # 30 rows -> 5 chunks, the last one short
    chunked = CEMSolver(public, **kwargs).solve(info)
    assert_close(chunked["actions"], whole["actions"], "fp32_gemm", "plan")
    assert_close(chunked["costs"], whole["costs"], "fp32_gemm", "elite cost")


def test_solver_seeding_is_per_plan():
    public, _ = model_pair(small_config(), seed=7)
    info = {"pixels": torch.randn(1, 1, *PIX), "goal": torch.randn(1, 1, *PIX)}
    kwargs = {"action_dim": 10, "num_samples": 16, "n_steps": 2, "topk": 4, "seed": 3}
    a = CEMSolver(public.eval(), **kwargs)
    first, second = a.solve(info), a.solve(info)
    assert not torch.equal(first["actions"], second["actions"])
    again = CEMSolver(public, **kwargs).solve(info, seed=second["seed"])
    assert torch.equal(again["actions"], second["actions"])


def test_solver_warm_start_and_bf16():
    public, _ = model_pair(small_config(), seed=8)
    info = {"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(2, 1, *PIX)}
    init = torch.randn(2, 3, 10)
    kwargs = {"action_dim": 10, "num_samples": 16, "n_steps": 1, "topk": 4}
    plan = CEMSolver(public.eval(), **kwargs).solve(info, init_action=init)
    assert plan["actions"].shape == (2, 5, 10) and torch.isfinite(plan["actions"]).all()
    low = CEMSolver(public, autocast=torch.bfloat16, **kwargs).solve(info)
    assert low["actions"].dtype == torch.float32 and torch.isfinite(low["actions"]).all()


def _model_state(model):
    tensors = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    flags = [(name, m.training) for name, m in model.named_modules()]
    grads = [(name, p.requires_grad) for name, p in model.named_parameters()]
    return tensors, flags, grads


def _assert_same_state(before, after):
    assert before[1] == after[1] and before[2] == after[2]
    assert before[0].keys() == after[0].keys()
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key


@pytest.mark.parametrize("fast", [None, False], ids=["fast", "get_cost"])
def test_solver_plans_a_training_mode_model_in_eval_mode_and_leaves_it_as_found(fast):
    """BatchNorm in training mode would rewrite its running statistics and plan on batch
    statistics; the solver plans in eval mode and restores every flag (issue: field faults)."""
    public, _ = model_pair(small_config(), seed=9)
    randomize_(public)  # running statistics away from their defaults
    public.train()
    public.predictor.eval()  # a mixed state must come back as it was, not as a blanket .train()
    next(public.projector.parameters()).requires_grad_(False)
    before = _model_state(public)
    info = {"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(2, 1, *PIX)}
    kwargs = {"action_dim": 10, "num_samples": 8, "n_steps": 2, "topk": 2, "fast": fast}
    plan = CEMSolver(public, **kwargs).solve(info, seed=5)
    _assert_same_state(before, _model_state(public))
    want = CEMSolver(public.eval(), **kwargs).solve(info, seed=5)
    assert torch.equal(plan["actions"], want["actions"])


FRAME_FAULTS = [  # (id, how the frames are spoiled, error match)
    ("nan-env1", lambda p, g: (p.index_fill(0, torch.tensor([1]), float("nan")), g), r"pixels'\]\[1\].*NaN"),
    (
        "inf-goal-env0",
        lambda p, g: (p, g.index_fill(0, torch.tensor([0]), float("inf"))),
        r"goal'\]\[0\].*NaN/inf",
    ),
    ("0-255", lambda p, g: (p, (g * 50 + 128).clamp(0, 255)), "normalise them first"),
    ("uint8", lambda p, g: (p.to(torch.uint8), g), "floating-point frames normalised"),
    ("channels-last", lambda p, g: (p.permute(0, 1, 3, 4, 2).contiguous(), g), "channels-last"),
]


@pytest.mark.parametrize("spoil,match", [c[1:] for c in FRAME_FAULTS], ids=[c[0] for c in FRAME_FAULTS])
def test_solver_and_planning_cost_check_frames(spoil, match):
    public, _ = model_pair(small_config(), seed=10)
    public.eval()
    pixels, goal = spoil(torch.randn(3, 1, *PIX), torch.randn(3, 1, *PIX))
    info = {"pixels": pixels, "goal": goal}
    solver = CEMSolver(public, action_dim=10, num_samples=4, n_steps=1, topk=2)
    with pytest.raises(ValueError, match=match):
        solver.solve(info)
    with pytest.raises(ValueError, match=match.replace(r"\]\[1\]", "").replace(r"\]\[0\]", "")):
        planning_cost(public, info, torch.randn(3, 4, 5, 10))


NAN_CEM = {"action_dim": 10, "num_samples": 16, "n_steps": 2, "topk": 4}


def _assert_nan_costs_reported(solver):
    """Plan 2 envs with the solver's model spoiled by a forward hook: the projector's output row 0
    (env 0's context embedding; encode runs context frames, then goal frames) is NaN, so every
    cost of env 0 is NaN, a fault the frame check cannot see. One RuntimeWarning counts them."""
    projector = solver._cost.model.projector

    def spoil(module, args, out):
        out[0] = float("nan")  # in place: no host value, so a CUDA graph can capture it

    hook = projector.register_forward_hook(spoil)
    count = NAN_CEM["num_samples"] * NAN_CEM["n_steps"]
    try:
        with pytest.warns(RuntimeWarning, match=rf"{count} NaN candidate costs .*per env: \[{count}, 0\]"):
            plan = solver.solve(_gpu_info(2))
    finally:
        hook.remove()
    assert torch.equal(plan["actions"][0], torch.zeros(5, 10))  # env 0 kept its initial mean
    assert torch.isnan(plan["costs"][0]) and torch.isfinite(plan["actions"][1]).all()
    assert torch.isfinite(plan["costs"][1])


def test_solver_warns_about_nan_costs_the_model_makes():
    """The eager fast path's twin of test_graph_solve_warns_about_nan_costs_after_the_solve."""
    public, _ = model_pair(small_config(), seed=10)
    _assert_nan_costs_reported(CEMSolver(public.eval(), **NAN_CEM))


def test_rejected_solves_leave_the_seed_sequence_alone():
    """Frames rejected after the solve (NaN) or arguments rejected before it use up no plan
    seed: the next plan is the one the solver would have made without the bad calls."""
    public, _ = model_pair(small_config(), seed=10)
    solver = CEMSolver(public.eval(), action_dim=10, num_samples=4, n_steps=1, topk=2, seed=7)
    info = {"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(2, 1, *PIX)}
    with pytest.raises(ValueError, match="NaN"):
        solver.solve({**info, "pixels": info["pixels"].index_fill(0, torch.tensor([0]), float("nan"))})
    with pytest.raises(ValueError, match="init_action"):
        solver.solve(info, torch.zeros(3, 1, 10))
    assert [solver.solve(info)["seed"] for _ in range(2)] == [plan_seed(7, 0), plan_seed(7, 1)]


def test_randn_frames_are_well_formed():
    """The README plans torch.randn frames: the normalisation check must let them through."""
    public, _ = model_pair(small_config(), seed=11)
    big = {"pixels": torch.randn(64, 1, *PIX), "goal": torch.randn(64, 1, *PIX)}
    plan = CEMSolver(public.eval(), action_dim=10, num_samples=4, n_steps=1, topk=2).solve(big)
    assert torch.isfinite(plan["actions"]).all()


def test_solver_warns_when_a_jepa_has_no_fast_path():
    """A JEPA whose blocks lack the published structure is planned through get_cost, loudly."""

    class Wrapped(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.inner = block

        def forward(self, x, c):
            return self.inner(x, c)

    public, _ = model_pair(small_config(), seed=13)
    layers = public.predictor.transformer.layers
    layers[0] = Wrapped(layers[0])
    info = {"pixels": torch.randn(1, 1, *PIX), "goal": torch.randn(1, 1, *PIX)}
    kwargs = {"action_dim": 10, "num_samples": 8, "n_steps": 2, "topk": 2}
    with pytest.warns(RuntimeWarning, match="no fast path"):
        solver = CEMSolver(public.eval(), **kwargs)
    assert not solver.fast
    assert torch.equal(
        solver.solve(info)["actions"], CEMSolver(public, fast=False, **kwargs).solve(info)["actions"]
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"topk": 301}, "topk"),
        ({"topk": 1}, "topk"),
        ({"horizon": 0}, "horizon"),
        ({"num_samples": 1}, "num_samples"),
        ({"n_steps": 0}, "n_steps"),
        ({"var_scale": 0.0}, "var_scale"),
        ({"var_scale": math.inf}, "var_scale"),
        ({"action_dim": 2}, "action width"),
        ({"cuda_graph": True, "device": "cpu"}, "cuda_graph"),
        ({"autocast": torch.float64}, "autocast"),
        ({"history_size": 5}, "history_size"),
        ({"backend": "triton2"}, "backend"),
        ({"device": "meta"}, "move the model"),
    ],
    ids=[
        "topk-gt-samples",
        "topk-1",
        "horizon-0",
        "samples-1",
        "steps-0",
        "var-0",
        "var-inf",
        "action-width",
        "graph-on-cpu",
        "autocast-f64",
        "history",
        "backend-name",
        "model-elsewhere",
    ],
)
def test_solver_bad_arguments(kwargs, match):
    public, _ = model_pair(small_config())
    args = {"action_dim": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        CEMSolver(public.eval(), **args)


def test_solver_bad_solve_inputs():
    public, _ = model_pair(small_config())
    solver = CEMSolver(public.eval(), action_dim=10, horizon=2, num_samples=4, n_steps=1, topk=2)
    good = {"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(2, 1, *PIX)}
    cases = [
        ([1, 2], None, "dict"),
        ({"pixels": torch.randn(2, 1, *PIX), "goal": torch.randn(3, 1, *PIX)}, None, "env axis"),
        ({"pixels": torch.randn(2, 1, *PIX)}, None, "goal"),
        ({"pixels": torch.randn(2, 3, *PIX), "goal": torch.randn(2, 1, *PIX)}, None, "context frames"),
        (good, torch.randn(2, 3, 10), "init_action"),
        (good, torch.randn(2, 1, 4), "init_action"),
        (good, torch.randn(3, 1, 10), "init_action"),
    ]
    for info, init, match in cases:
        with pytest.raises(ValueError, match=match):
            solver.solve(info, init_action=init)
    bad_model = Quadratic()
    bad_model.get_cost = lambda info, cand: cand.sum(-1)  # (B, S, T): wrong shape
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        CEMSolver(bad_model, horizon=2, action_dim=2, num_samples=4, topk=2).solve(
            {"target": torch.zeros(1, 2, 2)}
        )
    with pytest.raises(ValueError, match="get_cost"):
        CEMSolver(object(), action_dim=2)
    with pytest.raises(ValueError, match="fast=True"):
        CEMSolver(Quadratic(), action_dim=2, fast=True)


# -------------------------------------------------------------- GPU (graphs)


def _gpu_model():
    public, _ = model_pair(small_config(), seed=10)
    return public.eval().cuda()


def _gpu_info(b, pix=PIX):
    gen = torch.Generator().manual_seed(b)
    return {"pixels": torch.randn(b, 1, *pix, generator=gen), "goal": torch.randn(b, 1, *pix, generator=gen)}


GRAPH_CEM = {  # "paper": the published 300 x 30 CEM (top 30)
    "tiny": {"num_samples": 64, "n_steps": 6, "topk": 8},
    "paper": {"num_samples": 300, "n_steps": 30, "topk": 30},
}
GRAPH_SOLVE_CASES = [  # (model size, autocast dtype)
    pytest.param("tiny", None, id="tiny-fp32"),
    pytest.param("tiny", torch.bfloat16, id="tiny-bf16"),
    pytest.param("paper", None, id="paper-fp32", marks=pytest.mark.smoke),
    pytest.param("paper", torch.bfloat16, id="paper-bf16", marks=pytest.mark.smoke),
]


@pytest.mark.gpu
@pytest.mark.parametrize("size,autocast", GRAPH_SOLVE_CASES)
def test_graph_solve_equals_eager_solve(size, autocast, smoke_line):
    if size == "paper":
        model = randomize_(lewm_fast.LeWMConfig.preset("paper").build(), seed=10).eval().cuda()
        info = _gpu_info(3, pix=(3, 224, 224))
    else:
        model, info = _gpu_model(), _gpu_info(3)
    kwargs = {"action_dim": 10, "autocast": autocast, **GRAPH_CEM[size]}
    graph = CEMSolver(model, cuda_graph=True, **kwargs)
    eager = CEMSolver(model, cuda_graph=False, **kwargs)
    kind = "fp32_gemm" if autocast is None else "bf16"
    for attempt in ("capture", "replay"):
        g, e = graph.solve(info), eager.solve(info)
        assert g["seed"] == e["seed"]
        err = assert_close(g["actions"], e["actions"], kind, f"graph vs eager plan ({attempt})")
    assert graph._captured is not None and graph.cuda_graph
    smoke_line(f"graph vs eager plan relative error {err:.1e}")


@pytest.mark.gpu
def test_graph_replay_is_reproducible_and_recaptures_on_new_shapes():
    model = _gpu_model()
    solver = CEMSolver(model, action_dim=10, num_samples=32, n_steps=4, topk=4, cuda_graph=True)
    a = solver.solve(_gpu_info(2), seed=5)
    first_graph = solver._captured.graph
    b = solver.solve(_gpu_info(2), seed=5)
    assert torch.equal(a["actions"], b["actions"])
    assert solver._captured.graph is first_graph
    c = solver.solve(_gpu_info(4), seed=5)  # new env count: a new capture
    assert c["actions"].shape == (4, 5, 10) and solver._captured.graph is not first_graph
    reference_plan = CEMSolver(model, action_dim=10, num_samples=32, n_steps=4, topk=4, cuda_graph=False)
    assert_close(c["actions"], reference_plan.solve(_gpu_info(4), seed=5)["actions"], "fp32_gemm")


@pytest.mark.gpu
def test_graph_solve_with_auto_chunks_equals_one_batch(monkeypatch):
    """max_batch='auto' with little free memory: the captured solve scores in chunks, same plan."""
    model = _gpu_model()
    kwargs = {"action_dim": 10, "num_samples": 32, "n_steps": 3, "topk": 4, "seed": 2}
    whole = CEMSolver(model, cuda_graph=True, **kwargs).solve(_gpu_info(3))
    solver = CEMSolver(model, cuda_graph=True, max_batch="auto", **kwargs)
    per_row = solver._cost.bytes_per_row(5)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(2 * 40 * per_row), 1 << 40))
    chunked = solver.solve(_gpu_info(3))
    assert solver._auto_rows[3] == 40 and solver._captured is not None
    assert_close(chunked["actions"], whole["actions"], "fp32_gemm", "chunked graph plan")


@pytest.mark.gpu
def test_bf16_graph_follows_in_place_weight_updates_without_recapture():
    """The low-precision weight copy is refreshed in place, so the captured graph replays with
    the new weights (no new capture) and plans like a fresh solver on those weights."""
    model, other = _gpu_model(), model_pair(small_config(), seed=11)[0].eval().cuda()
    kwargs = {"action_dim": 10, "num_samples": 32, "n_steps": 3, "topk": 4, "autocast": torch.bfloat16}
    solver = CEMSolver(model, cuda_graph=True, **kwargs)
    solver.solve(_gpu_info(2), seed=3)
    graph = solver._captured.graph
    with torch.no_grad():
        model.load_state_dict(other.state_dict())
    after = solver.solve(_gpu_info(2), seed=3)
    assert solver._captured.graph is graph
    fresh = CEMSolver(other, cuda_graph=True, **kwargs).solve(_gpu_info(2), seed=3)
    assert torch.equal(after["actions"], fresh["actions"])


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
def test_graph_solve_matches_cpu_cost():
    """The fast cost on CUDA equals the reference get_cost on CPU (TF32 off: float32 parity)."""
    public, reference = (m.eval() for m in model_pair(small_config(), seed=12))
    info = _gpu_info(2)
    candidates = torch.randn(2, 16, 5, 10)
    want = _reference_cost(reference, info["pixels"], info["goal"], candidates)
    got = planning_cost(public.cuda(), {k: v.cuda() for k, v in info.items()}, candidates.cuda())
    assert_close(got.cpu(), want, "fp32_gemm", "CUDA planning cost")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,s,t,a,k",
    [pytest.param(*c[1:], id=c[0], marks=pytest.mark.smoke if c[0] == "paper" else ()) for c in REFIT_CASES],
)
def test_csrc_cuda_refit_matches_torch(b, s, t, a, k):
    gen = torch.Generator().manual_seed(s)
    candidates, costs, mean, std = _refit_inputs(b, s, t, a, gen)
    costs = _with_nans(costs, gen)
    args = [x.cuda() for x in (candidates, costs, mean, std)]
    got = cem_refit(*args, k, backend="cuda")
    want = cem_refit_torch(candidates, costs, mean, std, k)
    cpu = cem_refit(candidates, costs, mean, std, k, backend="cuda")
    for out in (got, cpu):
        assert_close(out.mean.cpu(), want.mean, "fp32_elementwise", "elite mean")
        assert_close(out.std.cpu(), want.std, "fp32_elementwise", "elite std")
        assert torch.equal(out.nan_count.cpu(), want.nan_count)


def test_cuda_refit_limit_matches_the_kernel_header():
    """The Python-side S + topk limit is the one the CUDA kernel was built with."""
    import re
    from pathlib import Path

    import lewm_fast.csrc
    from lewm_fast.plan import refit

    header = (Path(lewm_fast.csrc.__file__).parent / "cem_refit_kernel.cuh").read_text()
    expr = re.search(r"kCemRefitMaxSharedItems = ([^;]+);", header).group(1)
    assert int(expr) == refit.CUDA_MAX_SHARED_ITEMS


@pytest.mark.gpu
def test_csrc_cuda_refit_at_its_shared_memory_limit():
    """S + topk at the kernel's limit launches (48 KiB of shared memory, static counter included)."""
    from lewm_fast.plan.refit import CUDA_MAX_SHARED_ITEMS

    gen = torch.Generator().manual_seed(0)
    k = 84
    candidates, costs, mean, std = _refit_inputs(2, CUDA_MAX_SHARED_ITEMS - k, 1, 2, gen)
    got = cem_refit(*(x.cuda() for x in (candidates, costs, mean, std)), k, backend="cuda")
    want = cem_refit_torch(candidates, costs, mean, std, k)
    assert_close(got.mean.cpu(), want.mean, "fp32_elementwise", "elite mean")
    assert_close(got.std.cpu(), want.std, "fp32_elementwise", "elite std")


@pytest.mark.gpu
def test_graph_solve_warns_about_nan_costs_after_the_solve():
    """NaN costs the model makes itself (the frames are clean, so the frame check passes) are
    counted inside the captured graph and reported once its results reach the host: on the
    solve that captures and on a pure replay (which runs the hook's captured fill, not the hook)."""
    solver = CEMSolver(_gpu_model(), cuda_graph=True, **NAN_CEM)
    for attempt in ("capture", "replay"):
        _assert_nan_costs_reported(solver)
        assert solver._captured is not None and solver.cuda_graph, attempt  # no eager fallback


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_block_step_cost_on_gpu(autocast, smoke_line):
    """The paper-size planning cost with each predictor block step as one kernel equals the
    cost with the steps as separate kernels (AdaLN-Zero kernels, cuBLAS, SDPA), and the
    reference get_cost in float32; bf16 runs on the solver's low-precision weight copy."""
    from lewm_fast.plan.cost import LowPrecisionWeights

    model = randomize_(lewm_fast.LeWMConfig.preset("paper").build(), seed=10).eval().cuda()
    planned = model if autocast is None else LowPrecisionWeights(model, autocast).sync()
    gen = torch.Generator().manual_seed(4)
    info = {k: torch.randn(2, 1, 3, 224, 224, generator=gen).cuda() for k in ("pixels", "goal")}
    candidates = torch.randn(2, 64, 5, 10, generator=gen).cuda()
    costs = {}
    with (
        torch.no_grad(),
        torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None),
    ):
        for fused in (True, False):
            for block in planned.predictor.transformer.layers:
                block.step_kernel = fused
            costs[fused] = PlanningCost(planned)(info["pixels"], info["goal"], candidates).float()
    kind = "fp32_gemm" if autocast is None else "bf16"
    err = assert_close(costs[True], costs[False], kind, "fused vs unfused block steps")
    line = f"fused block-step cost vs unfused rel err {err:.1e}"
    if autocast is None:  # the published get_cost on a CPU copy of the same weights
        import copy

        cpu = copy.deepcopy(model).cpu()
        want = _reference_cost(cpu, info["pixels"].cpu(), info["goal"].cpu(), candidates.cpu())
        line += f", vs reference {assert_close(costs[True].cpu(), want, kind, 'fused vs reference'):.1e}"
    smoke_line(line)
