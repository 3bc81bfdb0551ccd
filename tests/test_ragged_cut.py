"""Ragged cuts: prompts of one batch keep different numbers of tokens at boundary 0 and at layer k.

A test-only method (registered for this module, then removed) keeps an image-dependent number of tokens at
both stages, so a batch is ragged at both cuts. The batch must equal the per-sample runs: the kept sets, and the
logits of prefill plus 3 cached decode steps.
"""

import pytest
import torch

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.config import TokenPlan
from learnpruner_ext.methods import base
from learnpruner_ext.methods.base import PruningMethod, VisionSelection
from learnpruner_ext.selection import topk_indices
from llava.inference import build_prompt, prepare_batch
from llava.model.builder import load_pretrained_model

QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]
SAME = ["What color is the circle?"] * 3  # no padding before the cuts: all new padding comes from the cuts


class RaggedMethod(PruningMethod):
    """Stage 1 keeps ``3 + (argmax of the patch means) % 7`` patches by [CLS] attention (a count that depends on
    the image only); stage 2 at layer 2 keeps the ``ceil(n / 2)`` most text-attended of the ``n`` it got."""

    name = "ragged_test"
    acts_at = "vision+decoder"
    signals = ("cls_attention", "vision_features", "text_attention")

    @classmethod
    def make_plan(cls, spec, num_vision_tokens, num_layers) -> TokenPlan:
        return TokenPlan(num_vision_tokens, num_layers, r1=num_vision_tokens - 1, r2=1, layer=2)

    @staticmethod
    def count(features: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] -> [B]
        return 3 + features.float().mean(-1).argmax(-1) % 7

    def select_vision(self, ctx):
        keep = self.count(ctx.vision_features)
        order = topk_indices(ctx.cls_attention, ctx.plan.num_vision_tokens)  # every patch, ascending index
        ranked = ctx.cls_attention.gather(1, order).argsort(-1, descending=True).argsort(-1)  # rank of each
        chosen = ranked < keep[:, None]
        index = torch.where(chosen, order, -1)
        index = torch.stack([torch.cat([row[row >= 0], row[row < 0]]) for row in index])[:, : int(keep.max())]
        return VisionSelection(index=index)

    def select_decoder(self, ctx):
        n = ctx.vision_index.shape[1]
        return topk_indices(ctx.text_attention("after_image"), (n + 1) // 2)


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    base.register_method(RaggedMethod)
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    apply_pruning(model, PruningConfig("ragged_test", 8))
    yield tokenizer, model, processor
    del base._REGISTRY["ragged_test"]


def _run(loaded, images, questions):
    tokenizer, model, processor = loaded
    batch = prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return out, model.last_pruning_trace(), batch["input_ids"].shape[1]


@pytest.mark.parametrize("questions", [QUESTIONS, SAME], ids=["padded", "unpadded"])
def test_ragged_batch_equals_per_sample_runs(loaded, images, questions):
    out, trace, width = _run(loaded, images, questions)
    counts = [row[0] for row in trace.vision_tokens_per_sample]
    after = [row[-1] for row in trace.vision_tokens_per_sample]
    assert len(set(counts)) > 1 and len(set(after)) > 1, (counts, after)  # ragged at boundary 0 and at k
    assert after == [(c + 1) // 2 for c in counts]
    for i in range(3):
        single, one, single_width = _run(loaded, images[i : i + 1], questions[i : i + 1])
        assert one.vision_tokens_per_sample[0] == trace.vision_tokens_per_sample[i]
        kept1 = trace.stage1_index[i][trace.stage1_index[i] >= 0]
        assert kept1.tolist() == one.stage1_index[0].tolist()
        kept2 = trace.stage2_index[i][trace.stage2_index[i] >= 0]
        assert kept2.tolist() == one.stage2_index[0].tolist()
        assert single.sequences[0, single_width:].tolist() == out.sequences[i, width:].tolist()
        for step in range(4):  # prefill, then 3 cached decode steps
            torch.testing.assert_close(single.scores[step][0], out.scores[step][i], atol=1e-4, rtol=0,
                                       msg=f"sample {i} step {step}")  # (-inf where min_new_tokens masks EOS)


@pytest.mark.parametrize("questions", [QUESTIONS, SAME], ids=["padded", "unpadded"])
def test_manual_decode_without_positions_equals_generate(loaded, images, questions):
    """Cached decoding by hand, passing neither positions nor (for unpadded prompts) a mask, as a plain
    ``model(input_ids, past_key_values=...)`` loop does, gives generate()'s logits."""
    tokenizer, model, processor = loaded
    out, _, _ = _run(loaded, images, questions)
    batch = prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])
    mask = batch["attention_mask"] if questions is QUESTIONS else None
    with torch.no_grad():
        step = model(**dict(batch, attention_mask=mask), use_cache=True)
        cache = step.past_key_values
        for i in range(1, 4):
            token = out.sequences[:, batch["input_ids"].shape[1] + i - 1 : batch["input_ids"].shape[1] + i]
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(step.logits[:, -1], out.logits[i], atol=1e-5, rtol=0)


class TwoCutMethod(RaggedMethod):
    """RaggedMethod's stage 1, then a cut at layer 1 and another at layer 2 (each keeps ceil(n / 2))."""

    name = "two_cut_test"

    @property
    def decoder_layers(self):
        return (1, 2)

    def score_layer_for(self, stage_layer):
        return stage_layer


def test_two_decoder_cuts_ragged_batch_equals_single_runs(tiny_hf, images):
    """Several cuts per prefill (as ATP-LLaVA needs): measured counts c, ceil(c/2), ceil(ceil(c/2)/2) per prompt,
    a ragged batch equals its single runs, and the trace's final kept slots are a subset of stage 1's."""
    base.register_method(TwoCutMethod)
    try:
        tokenizer, model, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
        apply_pruning(model, PruningConfig("two_cut_test", 8))
        loaded = (tokenizer, model, processor)
        out, trace, width = _run(loaded, images, SAME)
        layers = model.config.text_config.num_hidden_layers
        for row in trace.vision_tokens_per_sample:
            c = row[0]
            assert row == [c, (c + 1) // 2] + [((c + 1) // 2 + 1) // 2] * (layers - 2)
        assert len({row[-1] for row in trace.vision_tokens_per_sample}) > 1
        for i in range(3):
            single, one, single_width = _run(loaded, images[i : i + 1], SAME[i : i + 1])
            assert one.vision_tokens_per_sample[0] == trace.vision_tokens_per_sample[i]
            final = trace.stage2_index[i][trace.stage2_index[i] >= 0]
            assert final.tolist() == one.stage2_index[0].tolist()
            assert set(final.tolist()) <= set(trace.stage1_index[i].tolist()) and len(final) == one.vision_tokens_per_sample[0][-1]
            assert single.sequences[0, single_width:].tolist() == out.sequences[i, width:].tolist()
            for step in range(4):
                torch.testing.assert_close(single.logits[step][0], out.logits[step][i], atol=1e-4, rtol=0)
    finally:
        del base._REGISTRY["two_cut_test"]
