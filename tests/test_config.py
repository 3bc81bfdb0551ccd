import math

import pytest

from learnpruner_ext import BudgetError, LearnablePruningModule, PruningConfig
from learnpruner_ext.config import default_stage2_layer, two_stage_plan
from learnpruner_ext.methods import create_method

TABLE_7A = {8: (129, 43), 10: (120, 40), 12: (111, 37), 14: (105, 35), 16: (96, 32)}


@pytest.mark.parametrize("k", sorted(TABLE_7A))
def test_table_7a(k):
    plan = two_stage_plan(64, 576, 32, k, 3)
    assert (plan.r1, plan.r2) == TABLE_7A[k]
    assert 64 <= plan.average < 64 + (3 * k + 32 - k) / 32  # R2 is rounded up, so the average overshoots by < one R2 step


@pytest.mark.parametrize("budget,expected", [(128, (222, 74)), (64, (111, 37)), (32, (57, 19))])
def test_k12_rows(budget, expected):
    plan = create_method(PruningConfig("learnpruner", budget), num_vision_tokens=576, num_layers=32, vision_dim=1024).plan
    assert (plan.r1, plan.r2, plan.layer) == (*expected, 12)
    assert plan.tokens_per_layer == [expected[0]] * 12 + [expected[1]] * 20


def test_capping_and_full_budget():
    plan = two_stage_plan(400, 576, 32, 12, 3)  # 3*R2 = 687 would exceed 576
    assert plan.r1 == 576 and plan.r2 == math.ceil((400 * 32 - 12 * 576) / 20)
    full = two_stage_plan(576, 576, 32, 12, 3)
    assert (full.r1, full.r2) == (576, 576)


def test_default_layer_keeps_relative_depth():
    assert default_stage2_layer(32) == 12
    assert default_stage2_layer(8) == 3


@pytest.mark.parametrize("budget", [0, -5])
def test_nonpositive_budget_rejected(budget):
    with pytest.raises(BudgetError, match="positive"):
        PruningConfig("learnpruner", budget)


def test_budget_above_tokens_rejected():
    with pytest.raises(BudgetError, match="exceeds the 576 vision tokens"):
        two_stage_plan(577, 576, 32, 12, 3)


@pytest.mark.parametrize("k", [0, 32, 40, -1])
def test_layer_out_of_range(k):
    with pytest.raises(ValueError, match="0 < k < 32"):
        two_stage_plan(64, 576, 32, k, 3)


def test_lpm_parameter_count():
    assert sum(p.numel() for p in LearnablePruningModule(1024).parameters()) == 525_826


def test_unknown_method_lists_valid():
    with pytest.raises(ValueError, match="valid methods: .*learnpruner"):
        create_method(PruningConfig("nope", 64), num_vision_tokens=576, num_layers=32, vision_dim=1024)


# ---------------------------------------------------------------------------------------------- CLI flags
FLAGS = {"method": "--pruning-method", "budget": "--visual-token-budget", "layer": "--pruning-layer",
         "ratio": "--pruning-ratio", "diversity": "--diversity-ratio", "position_mode": "--position-mode",
         "lpm_path": "--lpm-path", "seed": "--pruning-seed", "options": "--method-option",
         "budget_scope": "--budget-scope", "video_stage1": "--video-stage1", "atp_path": "--atp-path"}  # what scripts and docs use


def _pruning_parser(**kw):
    import argparse

    from learnpruner_ext.cli import add_pruning_args

    parser = argparse.ArgumentParser()
    add_pruning_args(parser, **kw)
    return parser


def test_every_field_has_exactly_one_flag():
    from dataclasses import fields

    parser = _pruning_parser()
    [group] = [g for g in parser._action_groups if g.title == "visual-token pruning"]
    flags = [a.option_strings for a in group._group_actions]
    assert all(len(f) == 1 for f in flags), flags  # one flag each, no aliases
    assert sorted(f[0] for f in flags) == sorted(FLAGS.values())
    assert {f.name: f.metadata["flag"] for f in fields(PruningConfig)} == FLAGS
    assert all(f.metadata["help"] for f in fields(PruningConfig))
    excluded = _pruning_parser(exclude=("method", "budget"))
    assert "--pruning-method" not in excluded.format_help() and "--pruning-layer" in excluded.format_help()


def test_flags_round_trip_every_field():
    """Non-default values for every field (a field the flags dropped or mis-typed would keep its default)."""
    from dataclasses import asdict, fields

    from learnpruner_ext.cli import pruning_config_from_args

    want = PruningConfig(method="vispruner", budget=48, budget_scope="scaled", layer=5, ratio=2.5, diversity=0.25, position_mode="original",
                         video_stage1="per_frame", lpm_path="some/lpm", atp_path="some/atp", seed=7, options={"important_ratio": 0.5, "tag": "x", "flags": [1, 2]})
    defaults = PruningConfig()
    assert all(getattr(want, f.name) != getattr(defaults, f.name) for f in fields(PruningConfig))
    argv = ["--pruning-method", "vispruner", "--visual-token-budget", "48", "--budget-scope", "scaled", "--pruning-layer", "5", "--pruning-ratio",
            "2.5", "--diversity-ratio", "0.25", "--position-mode", "original", "--video-stage1", "per_frame", "--lpm-path", "some/lpm",
            "--atp-path", "some/atp", "--pruning-seed", "7", "--method-option", "important_ratio=0.5", "--method-option", "tag=x",
            "--method-option", "flags=[1, 2]"]
    got = pruning_config_from_args(_pruning_parser().parse_args(argv))
    assert asdict(got) == asdict(want)
    assert type(got.budget) is int and type(got.ratio) is float and type(got.seed) is int
    assert asdict(pruning_config_from_args(_pruning_parser().parse_args([]))) == asdict(defaults)
    # the excluded fields are given directly (the sweep: --methods / --budgets)
    sweep_like = _pruning_parser(exclude=("method", "budget")).parse_args(argv[4:])
    assert asdict(pruning_config_from_args(sweep_like, method="vispruner", budget=48)) == asdict(want)


def test_bad_flags():
    from learnpruner_ext.cli import pruning_config_from_args

    with pytest.raises(ValueError, match="--method-option expects KEY=VALUE, got 'important_ratio'"):
        pruning_config_from_args(_pruning_parser().parse_args(["--method-option", "important_ratio"]))
    with pytest.raises(ValueError, match="unknown --pruning-method 'nope'; valid methods: .*learnpruner"):
        pruning_config_from_args(_pruning_parser().parse_args(["--pruning-method", "nope"]))
    with pytest.raises(SystemExit):  # argparse: invalid choice / not an int
        _pruning_parser().parse_args(["--position-mode", "shuffled"])


def test_candidate_plan_caps_only_a_pruning_vision_stage():
    """N_i = 44 tokens of which M = 40 are candidates (4 newlines): a plan keeping R1 = 42 < 44 can keep only the
    40 candidates (R2 = 14 unchanged); a full vision stage (R1 = 44, FastV-like) keeps the newlines; R1 = 30 <= M
    is unchanged."""
    from learnpruner_ext.config import TokenPlan, candidate_plan

    assert candidate_plan(TokenPlan(44, 4, r1=42, r2=14, layer=1), 40) == TokenPlan(44, 4, r1=40, r2=14, layer=1)
    assert candidate_plan(TokenPlan(44, 4, r1=42, r2=41, layer=1), 40).r2 == 40
    assert candidate_plan(TokenPlan(44, 4, r1=44, r2=10, layer=1), 40) == TokenPlan(44, 4, r1=44, r2=10, layer=1)
    assert candidate_plan(TokenPlan(44, 4, r1=30), 40) == TokenPlan(44, 4, r1=30)
