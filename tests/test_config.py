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
