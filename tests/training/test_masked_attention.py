"""Eq. 6 masked attention: the custom autograd function, and equivalence with physical token removal."""

from __future__ import annotations

import pytest
import torch

import learnpruner_ext.training.masked_attention as MA
from learnpruner_ext.lpm import LearnablePruningModule
from learnpruner_ext.tiny import build_tiny_model
from learnpruner_ext.training import (
    KEEP_KWARG,
    LPMTrainingModel,
    contiguous_positions,
    with_masked_attention,
)

N = 16  # vision tokens of the tiny model (56 / 14)^2


def _inputs(batch=2, heads=3, seq=7, dim=4, soft=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.rand(batch, seq, generator=g, dtype=torch.float64) + 0.1 if soft else (torch.rand(batch, seq, generator=g) > 0.5).double()
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].repeat(batch, 1, 1, 1)
    if batch > 1:
        allowed[1, :, :, :2] = False  # sample 1 is left-padded by two tokens ...
        allowed[1, :, :2, :] = False  # ... whose query rows see nothing
    return q, k, v, keep.requires_grad_(True), allowed


@pytest.mark.parametrize("soft", [True, False])
def test_function_matches_plain_autograd(soft, monkeypatch):
    q, k, v, keep, allowed = _inputs(soft=soft)
    reference = MA.masked_attention_reference(q, k, v, allowed, keep, 0.5)
    grad = torch.randn_like(reference)
    expected = torch.autograd.grad((reference * grad).sum(), (q, k, v, keep))
    for chunk in (MA.CHUNK_ELEMENTS, 2 * 7 * 7 * 2):  # all heads at once, and head groups of 2 (+1)
        monkeypatch.setattr(MA, "CHUNK_ELEMENTS", chunk)
        out = MA.MaskedSoftmaxAttention.apply(q, k, v, allowed, keep, 0.5)
        assert torch.allclose(out, reference, atol=1e-12)
        got = torch.autograd.grad((out * grad).sum(), (q, k, v, keep))
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, atol=1e-10)
    assert expected[3].abs().sum() > 0
    assert torch.autograd.gradcheck(lambda *x: MA.MaskedSoftmaxAttention.apply(*x[:3], allowed, x[3], 0.5), (q, k, v, keep))


def test_hard_mask_equals_dropping_keys():
    """Kept queries attend exactly over the kept keys, as if the dropped tokens were not there."""
    q, k, v, _, _ = _inputs(batch=1, seed=3)
    keep = torch.tensor([[1.0, 0, 1, 1, 0, 0, 1]], dtype=torch.float64)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    out = MA.MaskedSoftmaxAttention.apply(q, k, v, causal, keep, 0.5)[0]
    kept = keep[0].bool()
    n = int(kept.sum())
    assert 2 <= n < 7
    qk, kk, vk = q[0][:, kept], k[0][:, kept], v[0][:, kept]
    scores = (qk @ kk.transpose(-1, -2) * 0.5).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(out[:, kept], scores.softmax(-1) @ vk, atol=1e-12)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, _ = build_tiny_model(text_layers=3)
    return model.float().eval().requires_grad_(False), tokenizer


def _sequence(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = model.config.image_token_id
    ids = torch.cat([torch.randint(5, 300, (batch, 6), generator=g), torch.full((batch, N), img),
                     torch.randint(5, 300, (batch, 9), generator=g)], 1)  # fmt: skip
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -4:] = 0  # right padding
    pixel_values = torch.randn(batch, 3, 56, 56, generator=g)
    return ids, attention_mask, pixel_values


def _embeds(model, ids, pixel_values):
    inner = model.model
    with torch.no_grad():
        features = inner.vision_features(pixel_values)
        tokens = inner.multi_modal_projector(features)
        embeds = inner.get_input_embeddings()(ids).masked_scatter((ids == model.config.image_token_id)[..., None], tokens)
    return features, embeds


def test_masked_forward_equals_physical_removal(tiny):
    """Eq. 6 + contiguous positions == the same model on the sequence with the dropped tokens removed."""
    model, _ = tiny
    ids, attention_mask, pixel_values = _sequence(model)
    _, embeds = _embeds(model, ids, pixel_values)
    g = torch.Generator().manual_seed(1)
    keep_vision = (torch.rand(2, N, generator=g) > 0.5).float()
    keep_vision[0, :3] = 0  # drop the first vision tokens too
    keep_vision.requires_grad_(True)
    image = ids == model.config.image_token_id
    keep = torch.ones(ids.shape).masked_scatter(image, keep_vision)
    before = model.config.text_config._attn_implementation
    with with_masked_attention(model):
        assert model.config.text_config._attn_implementation == MA.ATTN_NAME
        assert model.config.vision_config._attn_implementation == before  # the vision tower is untouched
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=contiguous_positions(keep, attention_mask),
            use_cache=False, **{KEEP_KWARG: keep},
        ).last_hidden_state  # fmt: skip
        logits = model.lm_head(hidden)
        unmasked = model.lm_head(model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state)
    assert model.config.text_config._attn_implementation == before

    for b in range(2):
        kept = keep[b].detach().bool() & attention_mask[b].bool()
        assert 0 < int((kept & image[b]).sum()) < N
        with torch.no_grad():
            reference = model.lm_head(model.model.language_model(inputs_embeds=embeds[b][kept][None]).last_hidden_state)[0]
        assert (logits[b][kept] - reference).abs().max() <= 1e-5
        # negative control: without the mask the same positions differ clearly
        assert (unmasked[b][kept] - reference).abs().max() > 1e-3
    text_after = torch.zeros_like(image)
    text_after[:, 6 + N :] = True
    (logits[text_after & attention_mask.bool()]).logsumexp(-1).sum().backward()
    assert keep_vision.grad is not None and keep_vision.grad.abs().sum() > 0


def test_training_module_gradients_reach_only_the_lpm(tiny):
    model, _ = tiny
    ids, attention_mask, pixel_values = _sequence(model, seed=2)
    labels = ids.masked_fill(ids == model.config.image_token_id, -100).masked_fill(attention_mask == 0, -100)
    torch.manual_seed(0)
    lpm = LearnablePruningModule(model.config.vision_config.hidden_size, 64)
    wrapper = LPMTrainingModel(model, lpm, prune_loss_weight=1.0)
    try:
        out = wrapper(ids, attention_mask, labels, pixel_values)
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lpm.parameters())
        assert wrapper.frozen_parameters_with_grad() == []
        assert 0.0 <= float(out["kept_ratio"]) <= 1.0
        features, _ = _embeds(model, ids, pixel_values)
        with torch.no_grad():
            keep = lpm.keep_mask(features)
        assert float(out["kept_ratio"]) == pytest.approx(float(keep.mean()))
        assert float(out["prune_loss"]) == pytest.approx(float(((keep.mean(-1)) ** 2).mean()))
        # activation checkpointing (--gradient_checkpointing) recomputes the layers with the same masked attention
        grads = [p.grad.clone() for p in lpm.parameters()]
        lpm.zero_grad()
        wrapper.activation_checkpointing_enable()
        wrapper(ids, attention_mask, labels, pixel_values)["loss"].backward()
        assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(lpm.parameters(), grads))
        assert wrapper.frozen_parameters_with_grad() == []
    finally:
        model.model.language_model.activation_checkpointing_disable()
        MA.restore_attention(model, wrapper.previous_attn_implementation)


def test_bf16_forward_and_backward(tiny):
    model, _ = tiny
    ids, attention_mask, pixel_values = _sequence(model, seed=4)
    _, embeds = _embeds(model, ids, pixel_values)
    keep_vision = (torch.rand(2, N, generator=torch.Generator().manual_seed(5)) > 0.5).float().requires_grad_(True)
    outputs = {}
    with with_masked_attention(model):
        for dtype in (torch.float32, torch.bfloat16):
            keep = torch.ones(ids.shape).masked_scatter(ids == model.config.image_token_id, keep_vision)
            positions = contiguous_positions(keep, attention_mask)
            lm = model.model.language_model.to(dtype)
            hidden = lm(inputs_embeds=embeds.to(dtype), attention_mask=attention_mask, position_ids=positions,
                        use_cache=False, **{KEEP_KWARG: keep}).last_hidden_state  # fmt: skip
            outputs[dtype] = hidden.float()
            (grad,) = torch.autograd.grad(hidden.float().square().mean(), keep_vision)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.float()
    valid = attention_mask.bool()
    assert (outputs[torch.bfloat16][valid] - outputs[torch.float32][valid]).abs().max() < 0.1
    # autocast (Trainer --bf16 without DeepSpeed): RoPE leaves q/k in fp32 next to a bf16 v
    with with_masked_attention(model), torch.autocast("cpu", dtype=torch.bfloat16):
        keep = torch.ones(ids.shape).masked_scatter(ids == model.config.image_token_id, keep_vision)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False,
                                            position_ids=contiguous_positions(keep, attention_mask), **{KEEP_KWARG: keep})  # fmt: skip
        (grad,) = torch.autograd.grad(hidden.last_hidden_state.float().square().mean(), keep_vision)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (hidden.last_hidden_state.float()[valid] - outputs[torch.float32][valid]).abs().max() < 0.1


def test_causal_mask_is_built_for_the_registered_name(tiny):
    """Without the mask builder registration create_causal_mask would silently return None."""
    from transformers.masking_utils import create_causal_mask

    model, _ = tiny
    config = model.config.text_config
    embeds = torch.zeros(1, 5, config.hidden_size)
    with with_masked_attention(model):
        mask = create_causal_mask(config, embeds, torch.ones(1, 5, dtype=torch.long), None, position_ids=None)
    assert mask is not None and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
