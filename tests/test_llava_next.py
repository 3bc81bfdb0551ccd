"""LLaVA-NeXT (anyres) on a tiny random checkpoint with its real processor, for every registered method.

The tiny model has 56 px crops of 16 patches and llava-v1.6's pinpoints scaled to 56 px, so its reference count
is N = 5 x 16 = 80. The three test images get 3, 4 and 5 crops and N_i = 44, 76 and 88 placeholders
(``test_images_have_different_crop_counts``), so every batch below mixes sizes.
"""

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from learnpruner_ext import PruningConfig, apply_pruning, available_methods
from learnpruner_ext.methods import get_method_class
from learnpruner_ext.adapters.llava_next import NEWLINE
from family_checks import assert_batch_equals_singles
from learnpruner_ext.tiny import random_image, save_tiny_checkpoint
from llava.inference import build_prompt, prepare_batch
from llava.model.builder import load_pretrained_model

QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]
SIZES = [(64, 48), (40, 120), (112, 112)]  # (width, height)
N_I = [44, 76, 88]
METHODS = [m for m in available_methods() if m != "none" and not get_method_class(m).requires]  # see the refusal test
BUDGET = {"learnpruner": 40, "fastv": 60, "dart": 60, "sparsevlm": 40, "atp_fixed": 56}  # pruning budgets of T (in-LLM methods need T > K*N/L)
GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_next") / "model", family="llava_next", seed=0)
    tokenizer, model, processor, _ = load_pretrained_model(str(path), None, None, device="cpu", dtype="float32")
    return tokenizer, model, processor, path


@pytest.fixture(scope="module")
def images():
    return [random_image(i + 1, size) for i, size in enumerate(SIZES)]


def batch_for(loaded, images, questions):
    tokenizer, model, processor, _ = loaded
    return prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])


def use(model, method, budget=None, **kw):
    kw.setdefault("budget_scope", "scaled")  # the mixed-size tests below use per-image budgets T * N_i / N
    if method == "learnpruner":
        with pytest.warns(UserWarning, match="UNTRAINED"):
            return apply_pruning(model, PruningConfig(method, budget, **kw))
    return apply_pruning(model, PruningConfig(method, budget, **kw))


def test_images_have_different_crop_counts(loaded, images):
    """Crops by transformers' ``image_size_to_num_patches`` (best pinpoint + 1 base): 64x48 -> 56x112 grid of
    1x2 crops + base = 3; 40x120 -> 168x56, 3x1 + 1 = 4; 112x112 -> 2x2 + 1 = 5. N_i = the processor's count."""
    _, model, processor, _ = loaded
    batch = batch_for(loaded, images, QUESTIONS)
    sizes = batch["image_sizes"].tolist()
    assert model.model.adapter.crops_per_image(model.config, sizes) == [3, 4, 5]
    assert model.image_token_counts(sizes) == N_I
    assert (batch["input_ids"] == model.config.image_token_id).sum(-1).tolist() == N_I
    assert model.num_vision_tokens == 80 and model.family == "llava_next"


def test_packing_map_rebuilds_hf_packed_features(loaded, images):
    """The index map (integer ids packed by transformers' own pack_image_features) gathers the projected crop
    features + image_newline into exactly HF's packed features, for each image size."""
    _, model, _, path = loaded
    batch = batch_for(loaded, images, QUESTIONS)
    hf = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    packed = hf.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    groups = model.model.adapter.image_groups(model.model, batch["pixel_values"], batch["image_sizes"])
    maps = model.model.adapter.packing_maps(model.model, batch["image_sizes"])
    for i, (group, source) in enumerate(zip(groups, maps)):
        assert torch.equal(group.full_tokens()[0], packed[i])
        newlines = int((source == NEWLINE).sum())
        assert group.features.shape[1] == N_I[i] - newlines and newlines > 0  # newlines are not candidates
        assert sorted(source[source != NEWLINE].tolist()) == source[source != NEWLINE].unique().tolist()  # no repeats


@pytest.mark.parametrize("method", ["none", *METHODS])
def test_full_budget_equals_unpruned_hf(loaded, images, method):
    """T = N (80) scales to T_i = N_i for every image: logits and generate() equal transformers' LLaVA-NeXT."""
    tokenizer, model, _, path = loaded
    use(model, method, None if method == "none" else model.num_vision_tokens)
    batch = batch_for(loaded, images, QUESTIONS)
    hf = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    assert (model(**batch).logits - hf(**batch).logits).abs().max() <= 1e-5
    kw = dict(GEN, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(**batch, **kw), hf.generate(**batch, **kw))
    assert model.last_pruning_trace().vision_tokens_per_sample == [[n] * model.config.text_config.num_hidden_layers
                                                                    for n in N_I]  # fmt: skip


def _budget(method):
    return BUDGET.get(method, 20)


@pytest.mark.parametrize("method", METHODS)
def test_tokens_per_layer_equal_the_per_sample_plan(loaded, images, method):
    """Scaled scope: T_i = round(T * N_i / 80); each prompt's measured per-layer counts are its own plan's."""
    _, model, _, _ = loaded
    pruner = use(model, method, _budget(method))
    model(**batch_for(loaded, images, QUESTIONS))
    trace = model.last_pruning_trace()
    for n, measured, planned in zip(N_I, trace.vision_tokens_per_sample, trace.image_plans):
        plan = pruner.plan_for(n)
        assert measured == plan.tokens_per_layer and planned == {"r1": plan.r1, "r2": plan.r2}
        assert plan.scope == "scaled" and abs(plan.average - _budget(method) * n / 80) <= 1.0
    assert len({tuple(m) for m in trace.vision_tokens_per_sample}) == 3  # the three prompts differ


def test_absolute_scope_keeps_t_per_image(loaded, images):
    """budget_scope='absolute' (the default): every image keeps T = 30 (vision-only method: R1 = T in every layer)."""
    _, model, _, _ = loaded
    apply_pruning(model, PruningConfig("vispruner", 30))
    model(**batch_for(loaded, images, QUESTIONS))
    trace = model.last_pruning_trace()
    assert [row[0] for row in trace.vision_tokens_per_sample] == [30, 30, 30] and trace.budget_scope == "absolute"


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_sizes_equals_single_runs(loaded, images, method):
    """Tokens and kept slots of a mixed-size batch equal each image run alone."""
    tokenizer, model, _, _ = loaded
    use(model, method, _budget(method))
    make = lambda ims, qs: batch_for(loaded, ims, qs)  # noqa: E731
    assert_batch_equals_singles(model, make, images, QUESTIONS, dict(GEN, pad_token_id=tokenizer.pad_token_id))


def _reduced_logits(model, batch, trace, sample, ids):
    """Plain layers (no cache, no pruning code) on the physically reduced prompt: text + the kept packed tokens
    of stage 1 in the trace's order, contiguous positions; at layer k only stage 2's kept slots stay."""
    inner, lm = model.model, model.model.language_model
    image_id = model.config.image_token_id
    vision = ids[0] == image_id
    first, n = int(vision.nonzero()[0]), int(vision.sum())
    stage1 = trace.stage1_index[sample][trace.stage1_index[sample] >= 0]
    groups = inner.adapter.image_groups(inner, batch["pixel_values"][sample : sample + 1], batch["image_sizes"][sample : sample + 1])
    packed = groups[0].full_tokens()[0]  # [N_i, D] the unpruned tokens by slot (gather methods keep these)
    reduced = torch.cat([ids[:, :first], ids[:, first : first + len(stage1)], ids[:, first + n :]], dim=1)
    embeds = lm.embed_tokens(reduced).clone()
    embeds[0, first : first + len(stage1)] = packed[stage1]
    slots = torch.full((reduced.shape[1],), -1)
    slots[first : first + len(stage1)] = stage1
    h, positions = embeds, torch.arange(reduced.shape[1])[None]
    for i, layer in enumerate(lm.layers):
        if i == trace.layer and trace.stage2_index is not None:
            keep2 = set(trace.stage2_index[sample].tolist()) - {-1}
            kept = [j for j in range(h.shape[1]) if slots[j] < 0 or int(slots[j]) in keep2]
            h, positions, slots = h[:, kept], positions[:, kept], slots[kept]
        h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, positions), position_ids=positions)
    return model.lm_head(lm.norm(h))[:, -1]


@pytest.mark.parametrize("method", ["learnpruner", "fastv"])
def test_cached_decode_equals_recomputation_on_reduced_sequence(loaded, images, method):
    """generate() with the KV cache = greedy recomputation on the physically reduced sequence, per image."""
    tokenizer, model, _, _ = loaded
    use(model, method, _budget(method))
    for sample in range(3):
        batch = batch_for(loaded, images[sample : sample + 1], QUESTIONS[sample : sample + 1])
        out = model.generate(**batch, **dict(GEN, pad_token_id=tokenizer.pad_token_id))
        trace = model.last_pruning_trace()
        generated, ids = out[0, batch["input_ids"].shape[1] :].tolist(), batch["input_ids"]
        for step, token in enumerate(generated):
            expected = int(_reduced_logits(model, batch, trace, 0, ids).argmax())
            assert expected == token, f"image {sample} step {step}"
            ids = torch.cat([ids, torch.tensor([[expected]])], dim=1)


def test_newlines_are_vision_tokens_kept_only_at_full_budget(loaded, images):
    """Stage 1 picks among patch slots: a pruned image keeps no newline slot; FastV (R1 = N_i) keeps them
    all before layer K and may keep any of them after it."""
    _, model, _, _ = loaded
    batch = batch_for(loaded, images, QUESTIONS)
    maps = model.model.adapter.packing_maps(model.model, batch["image_sizes"])
    use(model, "vispruner", 20)
    model(**batch)
    for i, source in enumerate(maps):
        kept = model.last_pruning_trace().stage1_index[i]
        assert not bool((source[kept[kept >= 0]] == NEWLINE).any())
    use(model, "fastv", 60)
    model(**batch)
    trace = model.last_pruning_trace()
    assert [len(row[row >= 0]) for row in trace.stage1_index] == N_I  # every slot, newlines included


def test_answers_through_the_shared_inference_path(loaded, images):
    """run_llava's and the eval scripts' code path (prepare_batch + generate) answers on NeXT with pruning, and
    a batch equals the single answers."""
    from llava.inference import GenerationSettings, generate_answers

    tokenizer, model, processor, _ = loaded
    use(model, "visionzip", 20)
    settings = GenerationSettings(max_new_tokens=3)
    batched = generate_answers(model, tokenizer, processor, images, QUESTIONS, settings=settings)
    singles = [generate_answers(model, tokenizer, processor, [im], [q], settings=settings)[0] for im, q in zip(images, QUESTIONS)]
    assert batched == singles and len(batched) == 3


@pytest.mark.parametrize("method", ["learnpruner", "vispruner"])
def test_original_positions_batch_equals_single_runs(loaded, images, method):
    """position_mode='original' (each kept token keeps its packed slot's position) on a mixed-size batch."""
    tokenizer, model, _, _ = loaded
    use(model, method, _budget(method), position_mode="original")
    kw = dict(GEN, pad_token_id=tokenizer.pad_token_id)
    batch = batch_for(loaded, images, QUESTIONS)
    batched = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1] :]
    for i in range(3):
        single_batch = batch_for(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        assert model.generate(**single_batch, **kw)[0, single_batch["input_ids"].shape[1] :].tolist() == batched[i].tolist()


def test_methods_that_need_one_grid_are_refused(loaded):
    """`downsample` pools one raster grid; LLaVA-NeXT's tiles are not one: one clear error at attach time."""
    _, model, _, _ = loaded
    needing = [m for m in available_methods() if get_method_class(m).requires]
    assert "downsample" in needing
    for method in needing:
        with pytest.raises(ValueError, match=f"method '{method}' needs single_grid, which llava_next images do not have"):
            apply_pruning(model, PruningConfig(method, 20))
