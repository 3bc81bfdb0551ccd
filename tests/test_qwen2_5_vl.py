"""Qwen2.5-VL on a tiny random checkpoint (window-attention ViT, 2x2 merger, M-RoPE) with Qwen2-VL's real image
processor, for every registered method.

The tiny processor resizes to 4-24 merged tokens; the test images get N_i = 16, 7 and 12
(``test_images_have_different_token_counts``), so every batch mixes sizes (and left padding).
"""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from learnpruner_ext import PruningConfig, apply_pruning, available_methods
from learnpruner_ext.cut import left_pad
from learnpruner_ext.methods import get_method_class
from learnpruner_ext.modeling import PrunableQwen2_5_VLForConditionalGeneration
from family_checks import assert_batch_equals_singles
from learnpruner_ext.tiny import random_image, save_tiny_checkpoint

QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]
SIZES = [(112, 112), (200, 30), (112, 84)]  # (width, height)
N_I = [16, 7, 12]
METHODS = [m for m in available_methods() if m != "none" and not get_method_class(m).requires]
BUDGET = {"learnpruner": 12, "fastv": 16, "dart": 16, "sparsevlm": 16, "atp_fixed": 12}  # in-LLM methods need T > K*N/L (N = 24, K = 1 here)
LAYER = 1  # the stage-2 layer of the 4-layer tiny LLM for every method that has one
GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from transformers import AutoImageProcessor, AutoTokenizer

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen") / "model", family="qwen2_5_vl", seed=0)
    model = PrunableQwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(path), model, AutoImageProcessor.from_pretrained(path), path


@pytest.fixture(scope="module")
def hf(loaded):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(loaded[3], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def images():
    return [random_image(i + 1, size) for i, size in enumerate(SIZES)]


def batch_for(loaded, images, questions):
    """Prompts as Qwen's processor builds them: each image is <|vision_start|> N_i x <|image_pad|> <|vision_end|>;
    left padding; mm_token_type_ids marks the image tokens (1)."""
    tokenizer, model, processor, _ = loaded
    vision = processor(images=images, return_tensors="pt")
    counts = model.image_token_counts(vision["image_grid_thw"])
    cfg, words = model.config, lambda text: tokenizer(text, add_special_tokens=False).input_ids
    rows = [torch.tensor([tokenizer.bos_token_id, *words("USER:"), cfg.vision_start_token_id, *[cfg.image_token_id] * n,
                          cfg.vision_end_token_id, *words(q + " ASSISTANT:")]) for n, q in zip(counts, questions)]  # fmt: skip
    ids = left_pad(rows, tokenizer.pad_token_id)
    mask = left_pad([torch.ones_like(r) for r in rows], 0)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == cfg.image_token_id).int(), **vision)


def use(model, method, budget=None, **kw):
    kw.setdefault("budget_scope", "scaled")
    kw.setdefault("position_mode", "original")  # the only mode Qwen2.5-VL has (test_contiguous_positions_are_refused)
    if get_method_class(method).acts_at in ("decoder", "vision+decoder"):
        kw.setdefault("layer", LAYER)
    if method == "learnpruner":
        with pytest.warns(UserWarning, match="UNTRAINED"):
            return apply_pruning(model, PruningConfig(method, budget, **kw))
    return apply_pruning(model, PruningConfig(method, budget, **kw))


def _budget(method):
    return BUDGET.get(method, 8)


def test_images_have_different_token_counts(loaded, images):
    """N_i = t * h * w / 4 of the processor's image_grid_thw: 112x112 -> 8x8 patches -> 16; 200x30 -> 2x14 -> 7;
    112x84 -> 6x8 -> 12 (smart resize to multiples of 28 px within 4-24 merged tokens)."""
    _, model, _, _ = loaded
    batch = batch_for(loaded, images, QUESTIONS)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 2, 14], [1, 6, 8]]
    assert model.image_token_counts(batch["image_grid_thw"]) == N_I
    assert model.num_vision_tokens == 24 and model.family == "qwen2_5_vl"


@pytest.mark.parametrize("method", ["none", *METHODS])
def test_full_budget_equals_unpruned_hf(loaded, hf, images, method):
    """T = N (24) scales to T_i = N_i for every image: logits and generate() equal transformers' Qwen2.5-VL."""
    tokenizer, model, _, _ = loaded
    use(model, method, None if method == "none" else model.num_vision_tokens)
    batch = batch_for(loaded, images, QUESTIONS)
    assert (model(**batch).logits - hf(**batch).logits).abs().max() <= 1e-5
    kw = dict(GEN, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(**batch, **kw), hf.generate(**batch, **kw))
    assert model.last_pruning_trace().vision_tokens_per_sample == [[n] * 4 for n in N_I]


def test_a_real_budget_changes_the_logits(loaded, hf, images):
    """The equality above can fail: a pruned run differs from the unpruned model."""
    _, model, _, _ = loaded
    use(model, "vispruner", 4)
    batch = batch_for(loaded, images, QUESTIONS)
    assert (model(**batch).logits[:, -1] - hf(**batch).logits[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_tokens_per_layer_equal_the_per_sample_plan(loaded, images, method):
    """Scaled scope: T_i = round(T * N_i / 24); each prompt's measured per-layer counts are its own plan's."""
    _, model, _, _ = loaded
    pruner = use(model, method, _budget(method))
    model(**batch_for(loaded, images, QUESTIONS))
    trace = model.last_pruning_trace()
    for n, measured, planned in zip(N_I, trace.vision_tokens_per_sample, trace.image_plans):
        plan = pruner.plan_for(n)
        assert measured == plan.tokens_per_layer and planned == {"r1": plan.r1, "r2": plan.r2}


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_sizes_equals_single_runs(loaded, images, method):
    """Tokens and kept slots of a mixed-size, left-padded batch equal each image run alone."""
    tokenizer, model, _, _ = loaded
    use(model, method, _budget(method))
    make = lambda ims, qs: batch_for(loaded, ims, qs)  # noqa: E731
    assert_batch_equals_singles(model, make, images, QUESTIONS, dict(GEN, pad_token_id=tokenizer.pad_token_id))


def _reduced_logits(model, hf, batch, trace, ids):
    """Plain Qwen layers (no cache, no pruning code) on the physically reduced prompt: text + the kept merged tokens
    in the trace's order, each at its own M-RoPE position from get_rope_index on the full prompt; generated tokens
    continue after the full prompt; at layer k only stage 2's kept slots stay."""
    lm = model.model.language_model
    prompt = batch["input_ids"]
    types = (ids == model.config.image_token_id).int()
    positions, _ = hf.model.get_rope_index(prompt, types[:, : prompt.shape[1]], image_grid_thw=batch["image_grid_thw"])
    extra = ids.shape[1] - prompt.shape[1]
    positions = torch.cat([positions, positions.amax(-1, keepdim=True) + 1 + torch.arange(extra).view(1, 1, -1)], -1)
    vision = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    first, n = int(vision[0]), len(vision)
    stage1 = trace.stage1_index[0][trace.stage1_index[0] >= 0]
    group = model.model.adapter.image_groups(model.model, batch["pixel_values"], batch["image_grid_thw"])[0]
    tokens = group.full_tokens()[0]  # [N_i, D] unpruned merged tokens by slot (gather methods keep these)
    columns = torch.cat([torch.arange(first), first + stage1, torch.arange(first + n, ids.shape[1])])
    embeds = lm.embed_tokens(ids[:, columns]).clone()
    embeds[0, first : first + len(stage1)] = tokens[stage1]
    h, pos = embeds, positions[:, :, columns]
    slots = torch.full((len(columns),), -1)
    slots[first : first + len(stage1)] = stage1
    for i, layer in enumerate(lm.layers):
        if i == trace.layer and trace.stage2_index is not None:
            keep2 = set(trace.stage2_index[0].tolist()) - {-1}
            kept = [j for j in range(h.shape[1]) if slots[j] < 0 or int(slots[j]) in keep2]
            h, pos, slots = h[:, kept], pos[:, :, kept], slots[kept]
        causal = torch.full((h.shape[1], h.shape[1]), float("-inf")).triu(1)[None, None]
        h = layer(h, attention_mask=causal, position_embeddings=lm.rotary_emb(h, pos))
    return model.lm_head(lm.norm(h))[:, -1]


@pytest.mark.parametrize("method", ["learnpruner", "fastv", "vispruner"])
def test_cached_decode_equals_recomputation_on_reduced_sequence(loaded, hf, images, method):
    """generate() with the KV cache = greedy recomputation on the physically reduced sequence at the kept tokens'
    original M-RoPE positions, per image (decode continues through rope_deltas from the unpruned length)."""
    tokenizer, model, _, _ = loaded
    use(model, method, _budget(method))
    for sample in range(3):
        batch = batch_for(loaded, images[sample : sample + 1], QUESTIONS[sample : sample + 1])
        out = model.generate(**batch, **dict(GEN, pad_token_id=tokenizer.pad_token_id))
        trace = model.last_pruning_trace()
        generated, ids = out[0, batch["input_ids"].shape[1] :].tolist(), batch["input_ids"]
        for step, token in enumerate(generated):
            expected = int(_reduced_logits(model, hf, batch, trace, ids).argmax())
            assert expected == token, f"image {sample} step {step}"
            ids = torch.cat([ids, torch.tensor([[expected]])], dim=1)


def test_vit_importance_equals_direct_eager_attention(loaded, images):
    """The [CLS]-free importance: mean attention each merged token receives in the last full-attention ViT block,
    recomputed here by plain eager softmax (HF's own vision RoPE, per image over all its patches), averaged over
    queries, heads and the token's 4 patches, in merger-output order (window permutation undone)."""
    _, model, processor, _ = loaded
    vision = processor(images=images, return_tensors="pt")
    grid, visual = vision["image_grid_thw"], model.model.visual
    out = visual(vision["pixel_values"], grid_thw=grid, output_hidden_states=True)
    f = visual.fullatt_block_indexes[-1]
    block, x = visual.blocks[f], out.hidden_states[f]
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=visual.window_size,
                                              patch_size=visual.patch_size, kwargs={})  # fmt: skip
    cos, sin = visual.rotary_pos_emb(x, get_vision_position_ids(grid, 2, kwargs={}))
    cos, sin = (visual.permute_input_for_window_attn(t, window_index, x.shape[0]) for t in (cos, sin))
    q, k, _ = block.attn.qkv(block.norm1(x)).view(x.shape[0], 3, block.attn.num_heads, -1).unbind(1)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [P, H, d]
    cu, _ = get_vision_attention_seqlens(grid, visual.config, kwargs={})
    received = torch.zeros(x.shape[0])
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        probs = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]).mul(block.attn.scaling).softmax(-1)
        received[s:e] = probs.mean(dim=(0, 1))
    expected = received.view(-1, 4).mean(-1)[torch.argsort(window_index)]
    groups = model.model.adapter.image_groups(model.model, vision["pixel_values"], grid)
    got = torch.zeros_like(expected)
    starts = torch.tensor([0, *N_I]).cumsum(0)
    for group in groups:
        for j, image in enumerate(group.images):
            got[starts[image] : starts[image] + group.num_tokens] = group.importance()[j]
    assert (got - expected).abs().max() <= 1e-6 and expected.std() > 0


def test_methods_that_need_one_grid_are_refused(loaded):
    """`downsample` pools one fixed raster grid; Qwen2.5-VL images are grids of any size: one clear error."""
    _, model, _, _ = loaded
    with pytest.raises(ValueError, match="method 'downsample' needs single_grid, which qwen2_5_vl images do not have"):
        apply_pruning(model, PruningConfig("downsample", 8, position_mode="original"))


def test_contiguous_positions_are_refused(loaded):
    """Renumbering kept tokens (LLaVA's default ``contiguous``) has no meaning for M-RoPE: one clear error, so a
    run never records a position mode it did not use."""
    _, model, _, _ = loaded
    with pytest.raises(ValueError, match="position_mode 'contiguous' is not defined for qwen2_5_vl.*--position-mode original"):
        apply_pruning(model, PruningConfig("vispruner", 8))
