"""LearnPruner's controls (options stage1 / stage2) on the tiny random LLaVA (16 vision tokens, 8 LLM layers)."""

import pytest
import torch

from learnpruner_ext import BudgetError, PruningConfig, apply_pruning
from llava.inference import build_prompt, prepare_batch
from llava.model.builder import load_pretrained_model

pytestmark = pytest.mark.usefixtures("no_grad")

QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]
CONTROLS = [
    {"stage1": "cls"},
    {"stage1": "random"},
    {"stage1": "none"},
    {"stage2": False},
    {"stage1": "cls", "stage2": False},
]


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    return tokenizer, model, processor


def run(loaded, images, method, budget, questions=QUESTIONS, **kw):
    tokenizer, model, processor = loaded
    apply_pruning(model, PruningConfig(method, budget, **kw))
    batch = prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])
    return model(**batch).logits[:, -1], model.last_pruning_trace()


def learnpruner(loaded, images, budget, options, **kw):
    torch.manual_seed(0)  # the same untrained LPM every time it is built
    if options.get("stage1", "lpm") == "lpm":
        with pytest.warns(UserWarning, match="UNTRAINED"):
            return run(loaded, images, "learnpruner", budget, options=options, **kw)
    return run(loaded, images, "learnpruner", budget, options=options, **kw)


@pytest.mark.parametrize("options", CONTROLS, ids=str)
def test_control_at_full_budget_equals_unpruned(loaded, images, options):
    plain, _ = run(loaded, images, "none", None)
    logits, trace = learnpruner(loaded, images, 16, options)
    assert (logits - plain).abs().max() <= 1e-5 and trace.vision_tokens_per_layer == [16] * 8


@pytest.mark.parametrize("options", CONTROLS, ids=str)
def test_control_batch_equals_single_runs_and_plan(loaded, images, options):
    budget = 12 if options.get("stage1") == "none" else 6  # stage 2 only: K=3 of 8 layers needs T >= 3*16/8
    logits, trace = learnpruner(loaded, images, budget, options)
    _, model, _ = loaded
    assert trace.vision_tokens_per_layer == model.pruner.plan.tokens_per_layer
    for i in range(3):
        single, _ = learnpruner(loaded, images[i : i + 1], budget, options, questions=QUESTIONS[i : i + 1])
        assert (single[0] - logits[i]).abs().max() <= 1e-5


def test_plans_of_the_controls():
    """T = 64 on LLaVA-1.5 (N = 576, L = 32, k = 12): stage 1 only keeps 64 everywhere; stage 2 only keeps all 576
    in layers 0-11 and R2 = ceil((64*32 - 12*576)/20) < 1, infeasible; at T = 400, R2 = ceil((12800-6912)/20) = 295;
    random/cls stage 1 keep LearnPruner's R1 = 111, R2 = 37."""
    from learnpruner_ext.methods import plan_method

    def plan(budget, **options):
        return plan_method(PruningConfig("learnpruner", budget, options=options), num_vision_tokens=576, num_layers=32).plan

    assert plan(64, stage2=False).tokens_per_layer == [64] * 32
    assert (plan(400, stage1="none").r1, plan(400, stage1="none").r2) == (576, 295)
    with pytest.raises(BudgetError, match="infeasible"):
        plan(64, stage1="none")
    assert (plan(64, stage1="random").r1, plan(64, stage1="random").r2) == (111, 37) == (plan(64).r1, plan(64).r2)


def test_cls_stage1_without_diversity_equals_the_cls_method(loaded, images):
    """stage1=cls, no stage 2, lambda = 0 is top-T by [CLS] attention: the `cls` baseline, token for token."""
    logits, trace = learnpruner(loaded, images, 6, {"stage1": "cls", "stage2": False}, diversity=0.0)
    ref, ref_trace = run(loaded, images, "cls", 6)
    assert torch.equal(trace.stage1_index, ref_trace.stage1_index) and (logits - ref).abs().max() <= 1e-6


def test_random_stage1_equals_the_random_method(loaded, images):
    """stage1=random, no stage 2: the same seeded draw as the `random` baseline."""
    logits, trace = learnpruner(loaded, images, 6, {"stage1": "random", "stage2": False}, seed=3)
    ref, ref_trace = run(loaded, images, "random", 6, seed=3)
    assert torch.equal(trace.stage1_index, ref_trace.stage1_index) and (logits - ref).abs().max() <= 1e-6


def test_lpm_is_not_built_for_controls(loaded):
    _, model, _ = loaded
    method = apply_pruning(model, PruningConfig("learnpruner", 6, options={"stage1": "cls"}))
    assert method.lpm is None and method.notices == []


@pytest.mark.parametrize("options,match", [
    ({"stage1": "lmp"}, r"stage1 must be one of \['lpm', 'cls', 'random', 'none'\]"),
    ({"stage2": "no"}, "stage2 must be true or false"),
    ({"stage1": "none", "stage2": False}, "prunes nothing"),
])  # fmt: skip
def test_bad_control_options(options, match):
    from learnpruner_ext.methods import plan_method

    with pytest.raises(ValueError, match=match):
        plan_method(PruningConfig("learnpruner", 64, options=options), num_vision_tokens=576, num_layers=32)
