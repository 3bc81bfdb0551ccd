"""PyramidDrop on the tiny random LLaVA (16 vision tokens, 8 LLM layers: boundaries 2/4/6) and on LLaVA-1.5's plan.

Reference: Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a (``pdrop_rank_drop``): at boundary
``k`` the last prompt row's softmax attention of layer ``k`` (its own norm, q/k and RoPE, on the hidden states
entering it), head-averaged, read at the image columns; keep the top ``int(N * lambda**s)``.
"""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from learnpruner_ext import BudgetError, PruningConfig, apply_pruning
from learnpruner_ext.flops import count_flops, kv_cache_bytes
from learnpruner_ext.methods import plan_method
from learnpruner_ext.methods.oracle import FixedIndexOracle
from learnpruner_ext.methods.pyramiddrop import default_layers, resolve_stages, stage_counts
from llava.eval.efficiency import named_config
from llava.inference import build_prompt, prepare_batch

pytestmark = pytest.mark.usefixtures("no_grad")
QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]


def plan(budget, n=576, depth=32, **options):
    return plan_method(PruningConfig("pyramiddrop", budget, options=options), num_vision_tokens=n, num_layers=depth)


def _batch(loaded, images, questions=QUESTIONS):
    tokenizer, model, processor = loaded
    return prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])


# --------------------------------------------------------------------------- plans, worked by hand
def test_paper_setting_by_hand():
    """lambda = 0.5 at 8/16/24 of 32 keeps 576, 288, 144, 72 (the reference README): average
    (576 + 288 + 144 + 72) / 4 = 270, so T = 270 runs the paper's setting exactly."""
    assert default_layers(32) == (8, 16, 24) and default_layers(8) == (2, 4, 6) and default_layers(4) == (1, 2, 3)
    p = plan(270, **{"lambda": 0.5}).plan
    assert p.stages == ((8, 288), (16, 144), (24, 72)) and (p.r1, p.r2, p.layer) == (576, 72, 8)
    assert p.tokens_per_layer == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8 and p.average == 270
    assert plan(270).plan == p  # the solve finds the paper's lambda for its own average


def test_lambda_solved_from_the_budget_by_hand():
    """T = 192: lambda = 146/576 gives int(146) = 146, int(146**2/576 = 37.01) = 37, int(146**3/576**2 = 9.38) = 9,
    average (576 + 146 + 37 + 9) / 4 = 192 exactly; any smaller lambda keeps 145 after layer 8 -> 191.75 < 192."""
    method = plan(192)
    layers, ratio, counts = resolve_stages(method.spec, 576, 32)
    assert counts == (146, 37, 9) and math.isclose(ratio, 146 / 576) and method.plan.average == 192
    assert stage_counts(576, 145.999 / 576, 3)[0] == 145


@pytest.mark.parametrize("n,depth", [(576, 32), (16, 8), (2880, 32)])
def test_solved_average_is_the_budget_within_rounding(n, depth):
    """Every feasible T: average in [T, T + 1) (never below T), counts non-increasing, T = N keeps everything."""
    first = default_layers(depth)[0]
    smallest = math.floor((first * n + depth - first) / depth)  # 1 token per later stage
    for t in range(smallest, n + 1, max(1, n // 97)):
        p = plan(t, n, depth).plan
        counts = [c for _, c in p.stages]
        assert t <= p.average < t + 1, (t, p)
        assert counts == sorted(counts, reverse=True) and counts[0] <= n
    assert [c for _, c in plan(n, n, depth).plan.stages] == [n] * 3
    with pytest.raises(BudgetError, match=f"at least .*budget >= {smallest}"):
        plan(smallest - 1, n, depth)


@pytest.mark.parametrize("budget,options,match", [
    (64, {}, r"infeasible with stage boundaries \[8, 16, 24\].*at least 144.75.*budget >= 144.*layers=\[3,16,24\]"),
    (192, {"lambda": 0.5}, r"lambda=0.5 .*keeps \[288, 144, 72\].*average of 270.00.*--visual-token-budget 270"),
    (None, {"lambda": 0.5}, r"not the budget 576; pass --visual-token-budget 270"),
])  # fmt: skip
def test_budget_errors_say_what_to_pass(budget, options, match):
    with pytest.raises(BudgetError, match=match):
        plan(budget, **options)


def test_earlier_boundaries_reach_small_budgets():
    """The error's suggestion works: layers [3, 16, 24] at T = 64: (3*576 + 13*c1 + 8*c2 + 8*c3) / 32 in [64, 65).
    ``--pruning-layer k`` replaces the first default boundary: 3 -> the same plan, 20 -> [20, 24], 8 -> the
    default."""
    p = plan(64, layers=[3, 16, 24]).plan
    assert [k for k, _ in p.stages] == [3, 16, 24] and 64 <= p.average < 65
    config = PruningConfig("pyramiddrop", 64, layer=3)
    assert plan_method(config, num_vision_tokens=576, num_layers=32).plan == p
    config = PruningConfig("pyramiddrop", 400, layer=20)
    assert [k for k, _ in plan_method(config, num_vision_tokens=576, num_layers=32).plan.stages] == [20, 24]
    assert plan_method(PruningConfig("pyramiddrop", 270, layer=8), num_vision_tokens=576, num_layers=32).plan == plan(270).plan


@pytest.mark.parametrize("config,match", [
    (PruningConfig("pyramiddrop", 192, layer=4, options={"layers": [8, 16]}), r"--pruning-layer 4 contradicts layers=\[8, 16\]"),
    (PruningConfig("pyramiddrop", 192, layer=32), r"stage boundary must satisfy 0 < k < 32"),
    (PruningConfig("pyramiddrop", 192, options={"layers": [16, 8]}), r"strictly ascending"),
    (PruningConfig("pyramiddrop", 192, options={"layers": 8}), r"strictly ascending"),
    (PruningConfig("pyramiddrop", 192, options={"layers": [8, 32]}), r"stage boundary must satisfy 0 < k < 32"),
    (PruningConfig("pyramiddrop", 192, options={"lambda": 0}), r"lambda must be a number in \(0, 1\]"),
    (PruningConfig("pyramiddrop", 192, options={"lambda": 1.5}), r"lambda must be a number in \(0, 1\]"),
    (PruningConfig("pyramiddrop", 192, options={"ratio": 0.5}), r"no option\(s\) \['ratio'\]; valid options: lambda, layers"),
])  # fmt: skip
def test_bad_options_raise_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        plan_method(config, num_vision_tokens=576, num_layers=32)


def test_analytic_kv_cache_and_flops_follow_every_stage():
    """LLaVA-1.5-7B, lambda = 0.5 (T = 270), 60 text tokens: 8 * (60 + 576 + 60 + 288 + 60 + 144 + 60 + 72) = 10560
    token-layers. KV cache: 2 (K, V) * 32 heads * 128 * 2 B = 16384 B each -> 165 MiB (vanilla 32 * 636 -> 318 MiB).
    Decoder linear FLOPs: 2 * 10560 * (4 * 4096**2 + 3 * 4096 * 11008) = 2 * 10560 * 202375168."""
    config = named_config("llava-v1.5-7b")
    tokens = plan(270).plan.tokens_per_layer
    assert kv_cache_bytes(config, tokens, 60) == 10560 * 16384 == 165 * 2**20
    assert count_flops(config, tokens, 60).llm == 2 * 10560 * 202375168


# --------------------------------------------------------------------------- on the tiny model
def test_full_budget_equals_unpruned(loaded, images):
    tokenizer, model, _ = loaded
    batch = _batch(loaded, images)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    apply_pruning(model, PruningConfig("none"))
    ref, ref_tokens = model(**batch).logits, model.generate(**batch, **kw)
    method = apply_pruning(model, PruningConfig("pyramiddrop", model.num_vision_tokens))
    assert method.plan.tokens_per_layer == [16] * 8
    assert (model(**batch).logits - ref)[batch["attention_mask"].bool()].abs().max() <= 1e-5
    assert model.generate(**batch, **kw).tolist() == ref_tokens.tolist()


@pytest.mark.parametrize("budget,expected", [(6, [16, 16, 5, 5, 2, 2, 1, 1]), (10, [16, 16, 11, 11, 8, 8, 5, 5])])
def test_measured_tokens_per_layer_equal_the_plan(loaded, images, budget, expected):
    """Boundaries 2/4/6 of 8. T = 10: the smallest lambda is 1/sqrt(2) (16*lambda**2 reaches 8): int(11.31) = 11,
    8, int(5.66) = 5, average (32 + 22 + 16 + 10) / 8 = 10; any smaller lambda keeps 7 after layer 4 (9.75).
    T = 6: lambda = 1/(2 sqrt(2)) (16*lambda**2 reaches 2): 5, 2, int(0.71) = 0 -> at least 1, average
    (32 + 10 + 4 + 2) / 8 = 6; smaller keeps 1 after layer 4 (5.75)."""
    _, model, _ = loaded
    method = apply_pruning(model, PruningConfig("pyramiddrop", budget))
    assert method.plan.tokens_per_layer == expected and method.decoder_layers == (2, 4, 6)
    model(**_batch(loaded, images))
    trace = model.last_pruning_trace()
    assert trace.vision_tokens_per_layer == expected and trace.vision_tokens_per_sample == [expected] * 3
    assert trace.stage2_index.shape == (3, expected[-1])


@pytest.mark.parametrize("budget", [6, 10])
def test_batch_equals_single_runs(loaded, images, budget):
    tokenizer, model, _ = loaded
    apply_pruning(model, PruningConfig("pyramiddrop", budget))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = _batch(loaded, images)
    assert not batch["attention_mask"].bool().all()  # different lengths -> left padding
    batched = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1] :]
    kept = model.last_pruning_trace().stage2_index
    for i in range(3):
        single = _batch(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        assert model.generate(**single, **kw)[0, single["input_ids"].shape[1] :].tolist() == batched[i].tolist()
        assert model.last_pruning_trace().stage2_index[0].tolist() == kept[i].tolist()


def last_token_attention(layer, hidden, positions, rotary):
    """Hand-rolled eager attention of the last row of ``layer`` on its input ``hidden`` [1, S, D]: softmax of
    q_last . k / sqrt(d) over every key (causal: the last row sees all), head-averaged -> [S]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary(hidden, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q[0, :, -1:] @ k[0].transpose(-1, -2) / math.sqrt(attn.head_dim)  # [H, 1, S]
    return logits.softmax(-1).mean(0)[0]


def reference_forward(eager, embeds, vision, counts, layers):
    """PyramidDrop by hand on one unpadded prompt: run the decoder layers; before each boundary k keep the top
    ``counts`` vision tokens by the last row's attention of layer k (kept tokens keep their position ids, as the
    toolkit's in-LLM cuts do). -> (kept indices into the vision tokens, last-position logits)."""
    lm = eager.model.language_model
    hidden, positions = embeds, torch.arange(embeds.shape[1])
    vision_pos = vision.clone()  # sequence indices of the vision tokens still present
    kept = torch.arange(len(vision))
    for idx, layer in enumerate(lm.layers):
        if idx in layers:
            score = last_token_attention(layer, hidden, positions, lm.rotary_emb)[vision_pos]
            top = score.topk(counts[layers.index(idx)]).indices.sort().values
            keep = torch.ones(hidden.shape[1], dtype=torch.bool)
            keep[vision_pos] = False
            keep[vision_pos[top]] = True
            new_index = keep.cumsum(0) - 1
            vision_pos, kept = new_index[vision_pos[top]], kept[top]
            hidden, positions = hidden[:, keep], positions[keep]
        s = hidden.shape[1]
        mask = torch.full((s, s), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, positions[None]))
    return kept, eager.lm_head(lm.norm(hidden))[0, -1]


@pytest.mark.parametrize("budget", [6, 10])
def test_selection_equals_direct_last_token_attention(loaded, images, eager, budget):
    """Each cut keeps the top vision tokens by the last token's attention in layer k (hand-rolled from q/k, equal
    to HF eager ``output_attentions`` at the first boundary), and the pruned model's logits equal the hand-run."""
    _, model, _ = loaded
    method = apply_pruning(model, PruningConfig("pyramiddrop", budget))
    layers = list(method.decoder_layers)
    counts = [c for _, c in method.plan.stages]
    for i in range(3):
        batch = _batch(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        logits = model(**batch).logits[0, -1]
        kept = model.last_pruning_trace().stage2_index[0]
        out = eager(**batch, output_hidden_states=True, output_attentions=True)
        vision = (batch["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
        lm = eager.model.language_model
        positions = torch.arange(batch["input_ids"].shape[1])
        first = last_token_attention(lm.layers[layers[0]], out.hidden_states[layers[0]], positions, lm.rotary_emb)
        torch.testing.assert_close(first, out.attentions[layers[0]][0, :, -1].mean(0), atol=1e-6, rtol=0)
        ref_kept, ref_logits = reference_forward(eager, out.hidden_states[0], vision, counts, layers)
        assert kept.tolist() == ref_kept.tolist()
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_efficiency_oracle_keeps_the_same_counts(loaded, images):
    """The fixed-index oracle reproduces every cut's count (16, 5, 2, 1 at T = 6) with the first indices."""
    _, model, _ = loaded
    method = apply_pruning(model, PruningConfig("pyramiddrop", 6))
    model.model.set_pruner(FixedIndexOracle(method))
    try:
        model(**_batch(loaded, images))
        trace = model.last_pruning_trace()
    finally:
        model.model.set_pruner(None)
    assert trace.vision_tokens_per_sample == [[16, 16, 5, 5, 2, 2, 1, 1]] * 3
    assert trace.stage2_index.tolist() == [[0]] * 3
