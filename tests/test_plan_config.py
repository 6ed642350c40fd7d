"""PlanConfig: one home for the planner settings, read by CEMSolver, evaluate, the pipeline and the CLI."""

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from helpers import model_pair, small_config

from lewm_fast import cli
from lewm_fast.pipeline import EvalConfig, RunConfig
from lewm_fast.plan import CEMSolver, PlanConfig
from lewm_fast.plan.config import add_arguments, from_arguments

# spec section 6: the published Two-Room evaluation and its CEM planner
PUBLISHED = {
    "episodes": 50,
    "goal_offset": 25,
    "budget": 50,
    "seed": 42,
    "horizon": 5,
    "action_block": 5,
    "num_samples": 300,
    "n_steps": 30,
    "topk": 30,
    "var_scale": 1.0,
}


def test_defaults_are_the_published_settings():
    config = PlanConfig()
    assert {k: getattr(config, k) for k in PUBLISHED} == PUBLISHED
    assert config.executed_per_plan == 5 and not config.warm_starts  # 5 of 5 executed: no warm start
    assert config.solver_seed == 42 and config.autocast is None
    assert config.history_size is None  # the predictor's num_frames (3 in the published model)
    assert config.seeds == 1 and not config.vary_start_seed  # one run on the published start rows
    assert PlanConfig(receding_horizon=2).warm_starts
    assert not PlanConfig(receding_horizon=2, warm_start=False).warm_starts
    assert PlanConfig(planner_seed=7).solver_seed == 7


def test_fields_are_checked_and_stored_as_plain_values():
    config = PlanConfig(episodes=np.int64(3), var_scale=2)
    assert type(config.episodes) is int and type(config.var_scale) is float
    cases = [
        ({"topk": 40, "num_samples": 16}, r"topk \(40\) must not exceed num_samples \(16\)"),
        ({"receding_horizon": 6}, r"receding_horizon \(6\) must not exceed horizon \(5\)"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"max_batch": 0}, "max_batch must be a positive integer, 'auto' or null"),
        ({"var_scale": float("nan")}, "var_scale must be a positive finite number"),
        ({"planner_seed": -1}, "planner_seed must be an integer >= 0"),
        ({"warm_start": 1}, "warm_start must be true or false"),
        ({"episodes": True}, "episodes must be an integer >= 1"),
        ({"seeds": 0}, "seeds must be an integer >= 1, got 0"),
        ({"seeds": 2.0}, "seeds must be an integer >= 1, got 2.0"),
        ({"vary_start_seed": 1}, "vary_start_seed must be true or false"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            PlanConfig(**kwargs)


def test_replace_takes_autocast_and_names_unknown_settings():
    config = PlanConfig().replace(autocast=torch.bfloat16, num_samples=64, topk=8)
    assert config.precision == "bf16" and config.autocast is torch.bfloat16 and config.num_samples == 64
    with pytest.raises(ValueError, match=r"unknown planner setting\(s\) \['samples'\]"):
        PlanConfig().replace(samples=3)
    with pytest.raises(ValueError, match="autocast must be None"):
        PlanConfig().replace(autocast=torch.float64)


def test_the_pipeline_eval_section_is_a_plan_config():
    config = RunConfig.preset_config("smoke").override({"eval.action_block": 5, "eval.var_scale": "0.5"})
    assert isinstance(config.eval, PlanConfig) and config.eval.var_scale == 0.5
    assert set(dataclasses.asdict(config.eval)) == {f.name for f in dataclasses.fields(PlanConfig)} | {
        "enabled",
        "during_training",
    }
    with pytest.raises(ValueError, match=r"eval\.topk \(40\) must not exceed eval\.num_samples"):
        EvalConfig(topk=40, num_samples=16)
    config = RunConfig.preset_config("smoke").override({"eval.seeds": "3", "eval.vary_start_seed": "true"})
    assert config.eval.seeds == 3 and config.eval.vary_start_seed is True
    with pytest.raises(ValueError, match="eval.seeds must be an integer >= 1, got 0"):
        RunConfig.preset_config("smoke").override({"eval.seeds": "0"})


def test_solver_reads_the_config_and_the_published_names():
    public, _ = model_pair(small_config())
    config = PlanConfig(horizon=3, num_samples=12, n_steps=2, topk=3, var_scale=0.5, planner_seed=9)
    solver = CEMSolver(public.eval(), action_dim=10, config=config)
    got = (solver.horizon, solver.num_samples, solver.n_steps, solver.topk, solver.var_scale, solver.seed)
    assert got == (3, 12, 2, 3, 0.5, 9) and solver.config == config
    solver = CEMSolver(public, action_dim=10, config=config, seed=4, autocast=torch.bfloat16, n_steps=5)
    assert solver.seed == 4 and solver.config.planner_seed == 4 and solver.n_steps == 5
    assert solver.autocast is torch.bfloat16 and solver.config.precision == "bf16"
    assert CEMSolver(public, action_dim=10).seed == 42  # the published seed, as in evaluate
    with pytest.raises(ValueError, match=r"got \['episodes'\]; evaluation settings go to evaluate"):
        CEMSolver(public, action_dim=10, episodes=3)
    with pytest.raises(ValueError, match="config must be a lewm_fast.plan.PlanConfig"):
        CEMSolver(public, action_dim=10, config={"horizon": 3})


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_cli_flags_are_generated_from_every_field():
    parser = _eval_parser()
    assert from_arguments(parser.parse_args([])) == PlanConfig()
    flags = {option for action in parser._actions for option in action.option_strings}
    for f in dataclasses.fields(PlanConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name
    args = parser.parse_args(
        "--episodes 3 --receding-horizon 2 --no-warm-start --var-scale 0.5 --planner-seed 1 "
        "--precision bf16 --no-cuda-graph --max-batch none --history-size 2 --seeds 3 "
        "--vary-start-seed".split()
    )
    want = PlanConfig(
        episodes=3,
        receding_horizon=2,
        warm_start=False,
        var_scale=0.5,
        planner_seed=1,
        precision="bf16",
        cuda_graph=False,
        max_batch=None,
        history_size=2,
        seeds=3,
        vary_start_seed=True,
    )
    assert from_arguments(args) == want
    assert from_arguments(parser.parse_args(["--max-batch", "64"])).max_batch == 64
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-batch", "many"])


def test_every_subcommand_has_a_plain_text_description(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        if name == "bench":  # its own runner prints its help
            continue
        assert sub.description and len(sub.description) > 20, name
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = capsys.readouterr().out
        for markup in ("``", ":func:", ":class:", ":mod:", ":meth:"):
            assert markup not in text, (name, markup)
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    assert "CEM candidates per env and iteration (default: 300)" in " ".join(capsys.readouterr().out.split())
