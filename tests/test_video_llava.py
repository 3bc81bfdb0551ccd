"""Video-LLaVA on a tiny random checkpoint (two CLIP towers, 8-frame videos), for every registered method in both
vision-stage modes (``video_stage1``: joint, per_frame).

Geometry: 56 px frames of P = 16 patches; a video fills 8 x (16 + 1) = 136 ``<video>`` placeholders (each frame's
[CLS] row included, as transformers and the original Video-LLaVA feed the LLM), an image 16 ``<image>``
placeholders; the reference N is 8 x 16 = 128 patches. Batches mix two videos and one image.
"""

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from family_checks import assert_batch_equals_singles
from learnpruner_ext import PruningConfig, apply_pruning, available_methods
from learnpruner_ext.methods import get_method_class
from learnpruner_ext.tiny import random_image, save_tiny_checkpoint
from llava.inference import build_prompt, prepare_batch
from llava.model.builder import load_pretrained_model

FRAMES, P = 8, 16
N_VIDEO, N_IMAGE = FRAMES * (P + 1), P
QUESTIONS = ["Which way does the red circle move?", "What appears in the video?", "What color is the square?"]
METHODS = [m for m in available_methods() if m != "none" and not get_method_class(m).requires]
MODES = ["joint", "per_frame"]
BUDGET = {"learnpruner": 40, "fastv": 80, "dart": 80, "pyramiddrop": 40, "sparsevlm": 40, "atp_fixed": 80}  # in-LLM methods need T > K*N_i/L
GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_video_llava") / "model", family="video_llava", seed=0)
    tokenizer, model, processor, _ = load_pretrained_model(str(path), None, None, device="cpu", dtype="float32")
    return tokenizer, model, processor, path


@pytest.fixture(scope="module")
def items():
    """Two videos (8 frames each, different content) and one image."""
    videos = [[random_image(100 * v + f, (64, 48)) for f in range(FRAMES)] for v in (1, 2)]
    return [videos[0], videos[1], random_image(7, (40, 56))]


def batch_for(loaded, items, questions):
    tokenizer, model, processor, _ = loaded
    return prepare_batch(model, tokenizer, processor, items, [build_prompt(q) for q in questions])


def use(model, method, budget=None, **kw):
    if method == "learnpruner":
        with pytest.warns(UserWarning, match="UNTRAINED"):
            return apply_pruning(model, PruningConfig(method, budget, **kw))
    return apply_pruning(model, PruningConfig(method, budget, **kw))


def _budget(method):
    return BUDGET.get(method, 20)


def _hf(path):
    return VideoLlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def test_geometry_counts_every_frame_row_and_candidates_are_patches(loaded, items):
    """N_i = 8 x 17 for a video (the [CLS] rows are placeholders), 16 for an image; reference N = 8 x 16; the
    candidates skip slot 17 f (each frame's [CLS] row)."""
    _, model, _, _ = loaded
    batch = batch_for(loaded, items, QUESTIONS)
    ids = batch["input_ids"]
    assert (ids == model.config.video_token_id).sum(-1).tolist() == [N_VIDEO, N_VIDEO, 0]
    assert (ids == model.config.image_token_id).sum(-1).tolist() == [0, 0, N_IMAGE]
    assert model.num_vision_tokens == FRAMES * P and model.family == "video_llava"
    assert batch["pixel_values_videos"].shape == (2, FRAMES, 3, 56, 56)
    [group] = model.model.adapter.video_groups(model.model, batch["pixel_values_videos"])
    assert group.num_tokens == N_VIDEO and group.features.shape[1] == FRAMES * P
    assert set(group.slots[0].tolist()) == set(range(N_VIDEO)) - {(P + 1) * f for f in range(FRAMES)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["none", *METHODS])
def test_full_budget_equals_unpruned_hf(loaded, items, method, mode):
    """T = N with the scaled scope gives T_i = N_i (136 per video, 16 for the image): logits and generate() of
    the mixed batch equal transformers' Video-LLaVA."""
    tokenizer, model, _, path = loaded
    budget = None if method == "none" else model.num_vision_tokens
    use(model, method, budget, video_stage1=mode, budget_scope="scaled")
    batch = batch_for(loaded, items, QUESTIONS)
    hf = _hf(path)
    assert (model(**batch).logits - hf(**batch).logits).abs().max() <= 1e-5
    kw = dict(GEN, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(**batch, **kw), hf.generate(**batch, **kw))
    layers = model.config.text_config.num_hidden_layers
    assert model.last_pruning_trace().vision_tokens_per_sample == [[N_VIDEO] * layers] * 2 + [[N_IMAGE] * layers]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_tokens_per_layer_equal_the_plan(loaded, items, method, mode):
    """Absolute scope: each video keeps its plan for N_i = 136 (candidates 128), the image min(T, 16)."""
    _, model, _, _ = loaded
    pruner = use(model, method, _budget(method), video_stage1=mode)
    model(**batch_for(loaded, items, QUESTIONS))
    trace = model.last_pruning_trace()
    assert trace.image_tokens == [N_VIDEO, N_VIDEO, N_IMAGE]
    for measured, planned in zip(trace.vision_tokens_per_sample, trace.image_plans):
        assert len(measured) == model.config.text_config.num_hidden_layers
        assert measured[0] == planned["r1"] and (planned["r2"] is None or measured[-1] == planned["r2"])
    assert trace.vision_tokens_per_sample[0] != [N_VIDEO] * 4  # the videos are pruned
    plan = pruner.plan_for(N_VIDEO)
    assert trace.vision_tokens_per_sample[0] == trace.vision_tokens_per_sample[1]
    assert abs(sum(trace.vision_tokens_per_sample[0]) / 4 - min(plan.average, _budget(method))) <= 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_batch_of_videos_and_an_image_equals_single_runs(loaded, items, method, mode):
    """Tokens and kept slots (both stages) of the mixed batch equal each item run alone."""
    tokenizer, model, _, _ = loaded
    use(model, method, _budget(method), video_stage1=mode)
    make = lambda its, qs: batch_for(loaded, its, qs)  # noqa: E731
    assert_batch_equals_singles(model, make, items, QUESTIONS, dict(GEN, pad_token_id=tokenizer.pad_token_id))


def test_per_frame_mode_gives_each_frame_its_share(loaded, items):
    """per_frame, R1 = 20 over 8 frames: 20 // 8 = 2 each and the first 20 % 8 = 4 frames one more
    (3,3,3,3,2,2,2,2); joint mode gives frames unequal counts on random frames, and no mode keeps a [CLS] row."""
    _, model, _, _ = loaded
    batch = batch_for(loaded, items[:2], QUESTIONS[:2])
    use(model, "vispruner", 20, video_stage1="per_frame")
    model(**batch)
    trace = model.last_pruning_trace()
    for row in trace.stage1_index:
        kept = row[row >= 0]
        assert torch.bincount(kept // (P + 1), minlength=FRAMES).tolist() == [3, 3, 3, 3, 2, 2, 2, 2]
        assert not bool((kept % (P + 1) == 0).any())  # [CLS] slots are not candidates
    use(model, "vispruner", 20, video_stage1="joint")
    model(**batch)
    kept = model.last_pruning_trace().stage1_index[0]
    kept = kept[kept >= 0]
    assert len(kept) == 20 and torch.bincount(kept // (P + 1), minlength=FRAMES).tolist() != [3, 3, 3, 3, 2, 2, 2, 2]
    assert not bool((kept % (P + 1) == 0).any())


def test_in_llm_methods_see_the_cls_rows_as_vision_tokens(loaded, items):
    """FastV (R1 = N_i): every placeholder, the 8 [CLS] rows included, enters the LLM; stage 2 keeps R2 of the
    136 (both placeholder kinds count as vision tokens at layer K)."""
    _, model, _, _ = loaded
    pruner = use(model, "fastv", 80)
    model(**batch_for(loaded, items[:1], QUESTIONS[:1]))
    trace = model.last_pruning_trace()
    assert len(trace.stage1_index[0]) == N_VIDEO
    assert len(trace.stage2_index[0][trace.stage2_index[0] >= 0]) == pruner.plan_for(N_VIDEO).r2


def _reduced_logits(model, batch, trace, ids):
    """Plain layers (no cache, no pruning code) on the physically reduced prompt of one video: text + the kept
    tokens of stage 1 (unpruned projected rows, by slot), contiguous positions; at layer k only stage 2's slots."""
    inner, lm = model.model, model.model.language_model
    vision = ids[0] == model.config.video_token_id
    first, n = int(vision.nonzero()[0]), int(vision.sum())
    stage1 = trace.stage1_index[0][trace.stage1_index[0] >= 0]
    [group] = inner.adapter.video_groups(inner, batch["pixel_values_videos"])
    rows = group.full_tokens()[0]  # [N_i, D] every placeholder's unpruned token
    reduced = torch.cat([ids[:, :first], ids[:, first : first + len(stage1)], ids[:, first + n :]], dim=1)
    embeds = lm.embed_tokens(reduced).clone()
    embeds[0, first : first + len(stage1)] = rows[stage1]
    slots = torch.full((reduced.shape[1],), -1)
    slots[first : first + len(stage1)] = stage1
    h, positions = embeds, torch.arange(reduced.shape[1])[None]
    for i, layer in enumerate(lm.layers):
        if i == trace.layer and trace.stage2_index is not None:
            keep2 = set(trace.stage2_index[0].tolist()) - {-1}
            kept = [j for j in range(h.shape[1]) if slots[j] < 0 or int(slots[j]) in keep2]
            h, positions, slots = h[:, kept], positions[:, kept], slots[kept]
        h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, positions), position_ids=positions)
    return model.lm_head(lm.norm(h))[:, -1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["learnpruner", "fastv"])
def test_cached_decode_equals_recomputation_on_reduced_sequence(loaded, items, method, mode):
    """generate() with the KV cache = greedy recomputation on the physically reduced sequence, per video."""
    tokenizer, model, _, _ = loaded
    use(model, method, _budget(method), video_stage1=mode)
    for sample in range(2):
        batch = batch_for(loaded, items[sample : sample + 1], QUESTIONS[sample : sample + 1])
        out = model.generate(**batch, **dict(GEN, pad_token_id=tokenizer.pad_token_id))
        trace = model.last_pruning_trace()
        generated, ids = out[0, batch["input_ids"].shape[1] :].tolist(), batch["input_ids"]
        for step, token in enumerate(generated):
            expected = int(_reduced_logits(model, batch, trace, ids).argmax())
            assert expected == token, f"video {sample} step {step}"
            ids = torch.cat([ids, torch.tensor([[expected]])], dim=1)


def test_methods_that_need_one_grid_are_refused(loaded):
    _, model, _, _ = loaded
    for method in [m for m in available_methods() if get_method_class(m).requires]:
        with pytest.raises(ValueError, match=f"method '{method}' needs single_grid, which video_llava images do not have"):
            apply_pruning(model, PruningConfig(method, 20))


def test_bad_video_batches_are_refused(loaded, items):
    """Videos of different frame counts in one batch, and a video for an image-only checkpoint: one clear error."""
    tokenizer, model, processor, _ = loaded
    with pytest.raises(ValueError, match="same number of frames"):
        prepare_batch(model, tokenizer, processor, [items[0], items[1][:4]], [build_prompt(q) for q in QUESTIONS[:2]])
    from llava.mm_utils import video_inputs

    with pytest.raises(ValueError, match="needs a Video-LLaVA checkpoint"):
        video_inputs([items[0]], processor, type("Config", (), {"model_type": "llava"})())


def test_analytic_rows_of_video_llava_7b():
    """``--config-only video-llava-7b``: one video of 8 x 257 = 2056 tokens. KV cache without pruning, by hand:
    32 layers x 2 (K, V) x 4096 x 2 bytes x (2056 + 60 text) tokens = 1,109,393,408 bytes = 1058.0 MiB. The
    budget 456 is absolute: a vision-only method keeps 456 in every layer (KV x 516/2116); T = N scaled to N_i keeps all."""
    from llava.eval.efficiency import analytic_row, named_config

    config = named_config("video-llava-7b")
    none = analytic_row(config, "none", None, 60)
    assert none["num_vision_tokens"] == 2056 and none["vision_crops"] == 8
    assert none["kv_cache_bytes"] == 32 * 2 * 4096 * 2 * (2056 + 60)
    vis = analytic_row(config, "vispruner", 456, 60)
    assert (vis["r1"], vis["avg_vision_tokens"]) == (456, 456)
    assert vis["kv_cache_bytes"] == 32 * 2 * 4096 * 2 * (456 + 60)
    full = analytic_row(config, "vispruner", 2048, 60, budget_scope="scaled")  # T = N scales to N_i = 2056: all kept
    assert full["r1"] == 2056 and full["kv_cache_bytes"] == none["kv_cache_bytes"]
    assert analytic_row(config, "vispruner", 2048, 60)["r1"] == 2048  # absolute: 2048 patches, the [CLS] rows leave


def test_flops_equal_flop_counter_on_a_video(loaded):
    """The analytic counter (tower on each of the 8 frames, projector on all 8 x 17 rows, LLM on 136 vision
    tokens per layer) equals torch's FlopCounterMode on the tiny model's prefill of one video (SDPA: weight
    matmuls only); the benchmark's checkpoint samples carry a video through <video> placeholders."""
    from torch.utils.flop_counter import FlopCounterMode

    from learnpruner_ext.flops import count_flops
    from llava.eval import efficiency as eff

    tokenizer, model, processor, _ = loaded
    model.model.set_pruner(None)
    sample = eff.checkpoint_samples(model, tokenizer, processor, 1, torch.device("cpu"), torch.float32, (48, 64))[0]
    assert sample.is_video and sample.num_image_tokens == N_VIDEO
    ids = sample.input_ids(model.config)
    assert int((ids == model.config.video_token_id).sum()) == N_VIDEO
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, **sample.vision_inputs())
    text = sample.prefix.shape[1] + sample.suffix.shape[1]
    fl = count_flops(model.config, [N_VIDEO] * 4, text, vision_crops=FRAMES)
    assert counter.get_total_flops() == round(fl.tflops * 1e12)
