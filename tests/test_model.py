"""Numerical guarantees of the pruned model on tiny random checkpoints (CPU, fp32)."""

import contextlib

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.methods.base import DecoderContext
from learnpruner_ext.scoring import text_to_vision_attention
from llava.inference import build_prompt, prepare_batch
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import load_pretrained_model

QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    return tokenizer, model, processor


def batch_for(loaded, images, questions):
    tokenizer, model, processor = loaded
    return prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])


def with_method(model, method, budget=None, **kw):
    apply_pruning(model, PruningConfig(method, budget, **kw))
    return model


def test_none_equals_plain_transformers(loaded, images, tiny_hf):
    _, model, _ = loaded
    with_method(model, "none")
    batch = batch_for(loaded, images, QUESTIONS)
    plain = LlavaForConditionalGeneration.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    ours = model(**batch).logits
    ref = plain(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (ours - ref)[mask].abs().max() <= 1e-5


def test_full_budget_learnpruner_equals_unpruned(loaded, images):
    _, model, _ = loaded
    batch = batch_for(loaded, images, QUESTIONS)
    ref = with_method(model, "none")(**batch).logits
    with pytest.warns(UserWarning, match="UNTRAINED"):
        with_method(model, "learnpruner", model.num_vision_tokens)
    assert model.pruner.plan.r1 == model.pruner.plan.r2 == model.num_vision_tokens
    out = model(**batch_for(loaded, images, QUESTIONS)).logits
    mask = batch["attention_mask"].bool()
    assert (out - ref)[mask].abs().max() <= 1e-5


def test_stage2_scores_equal_eager_attention(loaded, images, tiny_hf):
    tokenizer, model, processor = loaded
    with_method(model, "none")
    batch = batch_for(loaded, images[:2], QUESTIONS[:2])  # different lengths -> left padding
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_hf, dtype=torch.float32, attn_implementation="eager").eval()
    out = eager(**batch, output_attentions=True, output_hidden_states=True)
    k = 3
    attn = out.attentions[k]  # [B, H, S, S]
    hidden_in = out.hidden_states[k]
    vision = batch["input_ids"] == model.config.image_token_id
    batch_size, seq = vision.shape
    vision_index = vision.nonzero()[:, 1].view(batch_size, -1)
    lm = model.model.language_model
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    pos_emb = lm.rotary_emb(hidden_in, positions)
    valid = batch["attention_mask"].bool()
    ctx = DecoderContext(model.pruner, lm.layers[k], hidden_in, pos_emb, vision_index, valid)
    ctx.method.signals = ("text_attention",)  # the reference check reads the signal directly
    rows, rows_valid = ctx.query_rows("after_image")
    ours = text_to_vision_attention(lm.layers[k], hidden_in, pos_emb, rows, rows_valid, vision_index, valid)
    for b in range(batch_size):
        last_vision = int(vision_index[b, -1])
        text_rows = [i for i in range(last_vision + 1, seq) if valid[b, i]]
        ref = attn[b][:, text_rows][:, :, vision_index[b]].mean(dim=(0, 1))
        assert (ours[b] - ref).abs().max() <= 1e-5
    del ctx.method.signals


def reduced_reference_logits(model, batch, trace, sample=0, position_mode="contiguous"):
    """Physically reduced sequence, run layer by layer with plain transformers layers (no pruning code)."""
    lm, llava = model.model.language_model, model.model
    ids = batch["input_ids"][sample : sample + 1]
    keep = batch["attention_mask"][sample].bool()
    ids = ids[:, keep]  # drop left padding
    image_id = model.config.image_token_id
    stage1 = trace.stage1_index[sample]
    r1 = len(stage1)
    first = int((ids[0] == image_id).nonzero()[0])
    # the prompt carries N placeholders; the physically reduced one has only the R1 that stage 1 filled
    ids = torch.cat([ids[:, : first + r1], ids[:, first + model.num_vision_tokens :]], dim=1)
    vision = ids[0] == image_id
    assert int(vision.sum()) == r1
    pixel = batch["pixel_values"][sample : sample + 1]
    feats = llava.vision_tower(pixel, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
    tokens = llava.multi_modal_projector(feats[0, stage1])
    embeds = lm.embed_tokens(ids).clone()
    embeds[0, vision] = tokens
    seq = ids.shape[1]
    positions = torch.arange(seq)
    if position_mode == "original":
        positions = positions.clone()
        positions[first : first + r1] = first + stage1
        positions[first + r1 :] += model.num_vision_tokens - r1
    positions = positions[None]
    h = embeds
    k = trace.layer
    for i, layer in enumerate(lm.layers):
        if k is not None and i == k:
            stage2 = set(trace.stage2_index[sample].tolist())
            kept = [j for j in range(seq) if not vision[j] or int(stage1[j - first]) in stage2]
            h, positions = h[:, kept], positions[:, kept]
        h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, positions), position_ids=positions)
    return model.lm_head(lm.norm(h))[:, -1]


@pytest.mark.parametrize("position_mode", ["contiguous", "original"])
def test_pruned_forward_equals_physically_reduced_reference(loaded, images, position_mode):
    _, model, _ = loaded
    with pytest.warns(UserWarning):
        with_method(model, "learnpruner", 6, position_mode=position_mode)
    plan = model.pruner.plan
    assert plan.r2 < plan.r1 < model.num_vision_tokens
    batch = batch_for(loaded, images, QUESTIONS)
    logits = model(**batch).logits[:, -1]
    trace = model.last_pruning_trace()
    assert trace.vision_tokens_per_layer == plan.tokens_per_layer
    for sample in range(3):
        ref = reduced_reference_logits(model, batch, trace, sample, position_mode)
        assert (logits[sample] - ref[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("position_mode", ["contiguous", "original"])
def test_cached_generate_equals_recomputation(loaded, images, position_mode):
    tokenizer, model, _ = loaded
    with pytest.warns(UserWarning):
        with_method(model, "learnpruner", 6, position_mode=position_mode)
    batch = batch_for(loaded, images[:1], QUESTIONS[:1])
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    assert isinstance(out, torch.Tensor)
    trace = model.last_pruning_trace()
    generated = out[0, batch["input_ids"].shape[1] :].tolist()
    ids = batch["input_ids"]
    for step in range(len(generated)):
        step_batch = dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids))
        next_token = int(reduced_reference_logits(model, step_batch, trace, 0, position_mode).argmax())
        assert next_token == generated[step], f"step {step}"
        ids = torch.cat([ids, torch.tensor([[next_token]])], dim=1)


@pytest.mark.parametrize("method,budget", [("none", None), ("learnpruner", 6)])
def test_batch_equals_single_runs(loaded, images, method, budget):
    tokenizer, model, _ = loaded
    with _maybe_warns(method):
        with_method(model, method, budget)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = batch_for(loaded, images, QUESTIONS)
    width = batch["input_ids"].shape[1]
    batched = model.generate(**batch, **kwargs)[:, width:]
    batch_trace = model.last_pruning_trace()
    for i in range(3):
        single_batch = batch_for(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        single = model.generate(**single_batch, **kwargs)[:, single_batch["input_ids"].shape[1] :]
        assert single[0].tolist() == batched[i].tolist()
        if batch_trace.stage2_index is not None:
            assert model.last_pruning_trace().stage2_index[0].tolist() == batch_trace.stage2_index[i].tolist()


def _maybe_warns(method):
    return pytest.warns(UserWarning) if method == "learnpruner" else contextlib.nullcontext()


def test_both_formats_load_identically(tiny_hf, tiny_llava, images):
    outs = []
    for path in (tiny_hf, tiny_llava):
        tokenizer, model, processor, ctx = load_pretrained_model(str(path), None, None, device="cpu", dtype="float32")
        assert ctx == 2048
        batch = prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in QUESTIONS])
        outs.append((batch["input_ids"], model(**batch).logits))
    assert torch.equal(outs[0][0], outs[1][0])
    assert (outs[0][1] - outs[1][1]).abs().max() == 0


def test_prompts_do_not_depend_on_the_method(loaded, images):
    """Prompts carry N placeholders whatever the method (stage 1 cuts inside forward); a prompt tokenized for R1
    placeholders, as the old shortened-prompt path did, is refused with the fix."""
    tokenizer, model, processor = loaded
    with_method(model, "none")
    plain = batch_for(loaded, images[:2], QUESTIONS[:2])
    with pytest.warns(UserWarning):
        with_method(model, "learnpruner", 4)
    pruned = batch_for(loaded, images[:2], QUESTIONS[:2])
    assert torch.equal(plain["input_ids"], pruned["input_ids"]) and model.num_image_tokens == model.num_vision_tokens
    short = tokenizer_image_token(build_prompt(QUESTIONS[0]), tokenizer, model.config.image_token_id,
                                  num_image_tokens=model.pruner.plan.r1, return_tensors="pt")[None]  # fmt: skip
    with pytest.raises(ValueError, match=r"images need \[16\], the prompts hold \[9\].*num_image_tokens"):
        model(input_ids=short, pixel_values=plain["pixel_values"][:1])
