"""The downsampling baseline on the tiny random LLaVA (a 4 x 4 grid of 16 patches, 8 LLM layers)."""

import pytest
import torch
import torch.nn.functional as F

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.methods import plan_method
from learnpruner_ext.methods.downsample import pooled_shape
from llava.inference import build_prompt, prepare_batch
from llava.model.builder import load_pretrained_model

pytestmark = pytest.mark.usefixtures("no_grad")
QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    return tokenizer, model, processor


def _batch(loaded, images, questions=QUESTIONS):
    tokenizer, model, processor = loaded
    return prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])


def test_pooled_shapes_by_hand():
    """h = floor(sqrt(T)), w = min(floor(T/h), cols): 24x24 -> 12x12 at 144, 8x8 at 64, 5x6 = 30 at 32, 3x3 at 10."""
    assert [pooled_shape(t, 24, 24) for t in (144, 64, 32)] == [(12, 12), (8, 8), (5, 6)]
    assert pooled_shape(575, 24, 24) == (23, 24) and pooled_shape(10, 4, 4) == (3, 3)
    plan = plan_method(PruningConfig("downsample", 32), num_vision_tokens=576, num_layers=32).plan
    assert plan.tokens_per_layer == [30] * 32  # the achieved count, not the requested 32


def test_full_budget_equals_unpruned(loaded, images):
    _, model, _ = loaded
    batch = _batch(loaded, images)
    apply_pruning(model, PruningConfig("none"))
    ref = model(**batch).logits
    apply_pruning(model, PruningConfig("downsample", 16))
    assert (model(**batch).logits - ref)[batch["attention_mask"].bool()].abs().max() <= 1e-5


def test_tokens_are_the_projected_pooled_grid(loaded, images):
    """T = 4: the 4 x 4 grid of projector-input features average-pooled 2 x 2 -> 4 tokens, projected; the trace's
    representative patches are the cells' centres (1,1), (1,3), (3,1), (3,3) -> 5, 7, 13, 15."""
    _, model, _ = loaded
    batch = _batch(loaded, images[:1], QUESTIONS[:1])
    apply_pruning(model, PruningConfig("downsample", 4))
    out = model(**batch)
    trace = model.last_pruning_trace()
    assert trace.stage1_index.tolist() == [[5, 7, 13, 15]] and trace.vision_tokens_per_layer == [4] * 8
    features = model.model.vision_features(batch["pixel_values"])  # [1, 16, Dv]
    pooled = F.avg_pool2d(features.transpose(1, 2).reshape(1, -1, 4, 4), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(out.image_hidden_states[0], model.model.multi_modal_projector(pooled)[0], atol=1e-6)


@pytest.mark.parametrize("budget", [10, 6])
def test_batch_equals_single_runs_and_plan(loaded, images, budget):
    tokenizer, model, _ = loaded
    method = apply_pruning(model, PruningConfig("downsample", budget))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = _batch(loaded, images)
    batched = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1] :]
    assert model.last_pruning_trace().vision_tokens_per_layer == method.plan.tokens_per_layer
    for i in range(3):
        single = _batch(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        assert model.generate(**single, **kw)[0, single["input_ids"].shape[1] :].tolist() == batched[i].tolist()
