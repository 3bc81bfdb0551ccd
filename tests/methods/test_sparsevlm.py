"""SparseVLM on the tiny random LLaVA (16 vision tokens, 8 LLM layers: cut boundaries 1/2/4) and on LLaVA-1.5's plan.

Reference: Gumpest/SparseVLMs @ 26a5f48813c46cd1c7364160354e7fdd3febaa67 (``modelling_sparse_llama.py``: raters from
the input embeddings, ``pruning_loc = [2, 6, 15]``, the deleted tokens' top 30 % clustered into ``// 10 + 1``
recycled tokens; ``score.py``: ``sparse_token_dict``; ``utils.py``: ``cluster_and_merge``).
"""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from learnpruner_ext import BudgetError, PruningConfig, apply_pruning
from learnpruner_ext.methods import plan_method
from learnpruner_ext.methods.oracle import FixedIndexOracle
from learnpruner_ext.methods.sparsevlm import (
    REFERENCE_KEEP, default_layers, dpc_knn_merge, floor_average, keep_for_total, recycle_candidates, recycled_count,
    select_raters, sparsevlm_select, stage_total,
)  # fmt: skip
from llava.inference import build_prompt, prepare_batch

pytestmark = pytest.mark.usefixtures("no_grad")
QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]
TINY_PLANS = {10: [16, 12, 10, 10, 8, 8, 8, 8], 6: [16, 9, 6, 6, 3, 3, 3, 3]}
TINY_KEEP = {10: (11, 9, 7), 6: (8, 5, 2)}  # top-scored tokens kept per cut (each plus one recycled token)


def plan(budget, n=576, depth=32, **options):
    return plan_method(PruningConfig("sparsevlm", budget, options=options), num_vision_tokens=n, num_layers=depth)


def _batch(loaded, images, questions=QUESTIONS):
    tokenizer, model, processor = loaded
    return prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])


# --------------------------------------------------------------------------- counts, worked by hand
def test_recycled_counts_follow_the_reference_arithmetic():
    """d deleted -> int(0.3 d) + 1 candidates -> // 10 + 1 clusters. 576 -> 300 deletes 276: 83 candidates, 9
    recycled; d = 29: 9 candidates, 1 recycled; d = 30: 10, 2. The reference's float int(0.3 d) is 3d // 10."""
    assert (recycle_candidates(276), recycled_count(276)) == (83, 9)
    assert (recycle_candidates(29), recycled_count(29)) == (9, 1)
    assert (recycle_candidates(30), recycled_count(30)) == (10, 2)
    assert all(recycle_candidates(d) == 3 * d // 10 + 1 for d in range(1, 3000))
    assert (recycle_candidates(1), recycled_count(1), recycled_count(0)) == (1, 1, 0)
    assert (recycle_candidates(575), recycled_count(575)) == (173, 18)
    assert stage_total(576, 300) == 309 and stage_total(576, 576) == 576 and stage_total(576, 300, recycle=False) == 300
    # the largest keep giving a total: 16 -> 12 keeps 11 (+1), 12 -> 10 keeps 9, 576 -> 309 keeps 300
    assert keep_for_total(16, 12) == 11 and keep_for_total(12, 10) == 9 and keep_for_total(576, 309) == 300
    assert keep_for_total(16, 16) == 16 and keep_for_total(16, 12, recycle=False) == 12


@pytest.mark.parametrize("retained,totals,ours", [
    (192, (309, 204, 113), 206.5), (128, (312, 117, 39), 145.40625), (96, (249, 55, 27), 114.09375),
    (64, (82, 32, 18), 82.25),
])  # fmt: skip
def test_reference_lists_by_hand(retained, totals, ours):
    """The reference's lists for its "192": keep 300 of 576 (+9 recycled = 309), 200 of 309 (d = 109: 33 candidates,
    +4 = 204), 110 of 204 (d = 94: 29, +3 = 113). Layers 0-2 see 576 (layer 2 scores, the drop follows it), so our
    average is (3*576 + 4*309 + 9*204 + 16*113)/32 = 206.5; the reference's log counts each pruning layer at its
    output (2*576 + 4*309 + 9*204 + 17*113)/32 = 192.03, its nominal budget."""
    keep = list(REFERENCE_KEEP[retained])
    method = plan(math.floor(ours), keep=keep)
    assert method.plan.stages == tuple(zip((3, 7, 16), totals)) and method.plan.average == ours
    tokens = method.plan.tokens_per_layer
    assert abs(sum(tokens[1:] + tokens[-1:]) / 32 - retained) < 1  # the reference's own accounting
    with pytest.raises(BudgetError, match=rf"average of {ours:.2f} per layer, not the budget {retained}; pass "
                                          rf"--visual-token-budget {math.floor(ours)}"):  # fmt: skip
        plan(retained, keep=keep)


def test_tiny_plans_by_hand():
    """Boundaries 1/2/4 of 8 (3/7/16 of 32 scaled). T = 10: ratio 0.5**(1/3) gives int(12.70) = 12, int(10.08) = 10,
    int(8.0) = 8: (16 + 12 + 2*10 + 4*8)/8 = 10 exactly; less keeps 7 at the end (9.5). T = 6: 9, 6, 3 -> 6.125."""
    assert default_layers(32) == (3, 7, 16) and default_layers(8) == (1, 2, 4) and default_layers(4) == (1, 2)
    for budget, expected in TINY_PLANS.items():
        p = plan(budget, 16, 8).plan
        assert p.tokens_per_layer == expected and p.layer == 1 and p.r1 == 16 and p.r2 == expected[-1]
        totals = [c for _, c in p.stages]
        assert [keep_for_total(a, b) for a, b in zip([16] + totals, totals)] == list(TINY_KEEP[budget])


@pytest.mark.parametrize("n,depth", [(576, 32), (16, 8), (2880, 32), (144, 4)])
def test_solved_average_is_the_budget_within_rounding(n, depth):
    """Every feasible T: average in [T, T + 1), totals non-increasing, T = N keeps everything; below the floor
    (one kept token plus its recycled ones per stage) a BudgetError names the smallest budget."""
    floor = math.floor(floor_average(n, depth, default_layers(depth)))
    for t in range(floor, n + 1, max(1, n // 97)):
        p = plan(t, n, depth).plan
        counts = [c for _, c in p.stages]
        assert t <= p.average < t + 1, (t, p)
        assert counts == sorted(counts, reverse=True) and counts[0] <= n
    assert [c for _, c in plan(n, n, depth).plan.stages] == [n] * len(default_layers(depth))
    with pytest.raises(BudgetError, match=f"at least .*budget >= {floor}"):
        plan(floor - 1, n, depth)


def test_small_budgets_need_an_earlier_first_boundary():
    """LLaVA-1.5 at 3/7/16: 3*576/32 = 54 plus 19/2/2 -> floor 57.94, so the tables' 32 is infeasible; the error's
    suggestion (first boundary 1, i.e. scoring with layer 0) reaches it, as does --pruning-layer 1."""
    with pytest.raises(BudgetError, match=r"at least 57.94. Use a budget >= 57, or .*layers=\[1,7,16\]"):
        plan(32)
    p = plan(32, layers=[1, 7, 16]).plan
    assert [k for k, _ in p.stages] == [1, 7, 16] and 32 <= p.average < 33
    assert plan_method(PruningConfig("sparsevlm", 32, layer=1), num_vision_tokens=576, num_layers=32).plan == p
    assert 64 <= plan(64).plan.average < 65 and 128 <= plan(128).plan.average < 129


@pytest.mark.parametrize("config,match", [
    (PruningConfig("sparsevlm", 192, layer=4, options={"layers": [8, 16]}), r"--pruning-layer 4 contradicts"),
    (PruningConfig("sparsevlm", 192, layer=32), r"cut boundary must satisfy 0 < k < 32"),
    (PruningConfig("sparsevlm", 192, options={"layers": [16, 8]}), r"strictly ascending"),
    (PruningConfig("sparsevlm", 192, options={"layers": [3, 32]}), r"cut boundary must satisfy 0 < k < 32"),
    (PruningConfig("sparsevlm", 192, options={"keep": [300, 0, 110]}), r"keep must be a list of positive"),
    (PruningConfig("sparsevlm", 192, options={"keep": [300, 200]}), r"keep=\[300, 200\] needs one count per cut"),
    (PruningConfig("sparsevlm", 192, options={"recycle": 1}), r"recycle must be true or false"),
    (PruningConfig("sparsevlm", 192, options={"lambda": 0.5}), r"no option\(s\) \['lambda'\]; valid options: keep, "),
])  # fmt: skip
def test_bad_options_raise_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        plan_method(config, num_vision_tokens=576, num_layers=32)


def test_without_recycling_totals_are_the_kept_counts():
    p = plan(6, 16, 8, recycle=False).plan
    assert 6 <= p.average < 7 and all(c >= 1 for _, c in p.stages)


# --------------------------------------------------------------------------- pure functions vs the reference
def cluster_and_merge_reference(x, clusters):
    """The reference's ``cluster_and_merge`` for one row, loop by loop (exact mean instead of / (count + 1e-6); equal
    densities: the earlier token counts as denser, in place of its 1e-6 random noise)."""
    m, dim = x.shape
    dist = torch.stack([(x[i] - x).norm(dim=-1) for i in range(m)]) / dim**0.5
    density = [math.exp(-float((dist[i].sort().values[:clusters] ** 2).mean())) for i in range(m)]
    dist_max = float(dist.max())
    parent = []
    for i in range(m):
        denser = [j for j in range(m) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        parent.append(min(float(dist[i, j]) for j in denser) if denser else dist_max)
    score = [parent[i] * density[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: -score[i])[:clusters]
    assign = [centres.index(i) if i in centres else min(range(clusters), key=lambda c: float(dist[centres[c], i]))
              for i in range(m)]  # fmt: skip
    merged = torch.stack([x[[i for i in range(m) if assign[i] == c]].mean(0) for c in range(clusters)])
    return centres, merged


@pytest.mark.parametrize("m,clusters", [(12, 2), (30, 3), (83, 9), (5, 1), (2, 1)])
def test_dpc_knn_matches_the_reference_loops(m, clusters):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(3, m, 16, generator=gen)
    centres, merged = dpc_knn_merge(x, clusters)
    for b in range(3):
        ref_centres, ref_merged = cluster_and_merge_reference(x[b], clusters)
        assert centres[b].tolist() == ref_centres
        torch.testing.assert_close(merged[b], ref_merged, atol=1e-6, rtol=0)


def test_dpc_knn_merges_separated_groups_into_their_means():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=gen) * 0.01 + 5, torch.randn(6, 8, generator=gen) * 0.01 - 5
    x = torch.cat([a, b])[None]
    centres, merged = dpc_knn_merge(x, 2)
    means = {tuple(torch.round(mu, decimals=4).tolist()) for mu in (a.mean(0), b.mean(0))}
    assert {tuple(torch.round(mu, decimals=4).tolist()) for mu in merged[0]} == means
    assert sorted(int(c) < 6 for c in centres[0]) == [False, True]  # one centre per group


def test_raters_are_the_text_tokens_above_mean_relevance():
    """Hand-checkable: 2 vision tokens and 3 text tokens after them; softmax over the text of v . t, averaged over
    the vision tokens, the raters are the text tokens above 1/3 (the mean); padding and text before the image
    are never raters; one text token after the image is its own rater."""
    d = 4
    v = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    t = torch.tensor([[2.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.5, 0, 0]])
    pad, before = torch.zeros(1, d), torch.tensor([[9.0, 9, 9, 9]])
    embeddings = torch.cat([pad, before, v, t])[None]
    vision = torch.tensor([[False, False, True, True, False, False, False]])
    valid = torch.tensor([[False, True, True, True, True, True, True]])
    relevance = (v @ t.T).softmax(-1).mean(0)
    expected = (relevance > relevance.mean()).tolist()
    assert expected == [True, False, True]
    assert select_raters(embeddings, vision, valid)[0].tolist() == [False, False, False, False, *expected]
    single = select_raters(torch.cat([before, v, t[:1]])[None], torch.tensor([[False, True, True, False]]), None)
    assert single[0].tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="text after the image"):
        select_raters(embeddings[:, :4], vision[:, :4], valid[:, :4])


def test_select_keeps_top_and_writes_cluster_means_at_centres():
    """12 vision tokens, keep 5: 7 deleted -> int(2.1) + 1 = 3 most relevant of them clustered into 1 token (at the
    slot of its centre, whose hidden state becomes the mean of the 3)."""
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.05, 0.5, 0.4, 0.01, 0.02]])
    hidden = torch.arange(12 * 3, dtype=torch.float32).view(1, 12, 3)
    index, centres, merged = sparsevlm_select(scores, hidden, 5)
    top, candidates = [0, 2, 4, 6, 8], [9, 5, 3]
    assert centres[0, 0].item() in candidates and index[0].tolist() == sorted(top + centres[0].tolist())
    torch.testing.assert_close(merged[0, 0], hidden[0, candidates].mean(0))
    index, centres, merged = sparsevlm_select(scores, hidden, 5, recycle=False)
    assert index[0].tolist() == top and centres.shape == (1, 0)


# --------------------------------------------------------------------------- on the tiny model
def test_full_budget_equals_unpruned(loaded, images):
    tokenizer, model, _ = loaded
    batch = _batch(loaded, images)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    apply_pruning(model, PruningConfig("none"))
    ref, ref_tokens = model(**batch).logits, model.generate(**batch, **kw)
    method = apply_pruning(model, PruningConfig("sparsevlm", model.num_vision_tokens))
    assert method.plan.tokens_per_layer == [16] * 8
    assert (model(**batch).logits - ref)[batch["attention_mask"].bool()].abs().max() <= 1e-5
    assert model.generate(**batch, **kw).tolist() == ref_tokens.tolist()


@pytest.mark.parametrize("budget", [10, 6])
def test_measured_tokens_per_layer_equal_the_plan(loaded, images, budget):
    _, model, _ = loaded
    method = apply_pruning(model, PruningConfig("sparsevlm", budget))
    expected = TINY_PLANS[budget]
    assert method.plan.tokens_per_layer == expected and method.decoder_layers == (1, 2, 4)
    model(**_batch(loaded, images))
    trace = model.last_pruning_trace()
    assert trace.vision_tokens_per_layer == expected and trace.vision_tokens_per_sample == [expected] * 3
    assert trace.stage2_index.shape == (3, expected[-1])


@pytest.mark.parametrize("budget,options", [(6, {}), (10, {}), (6, {"recycle": False})])
def test_batch_equals_single_runs(loaded, images, budget, options):
    tokenizer, model, _ = loaded
    apply_pruning(model, PruningConfig("sparsevlm", budget, options=options))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = _batch(loaded, images)
    assert not batch["attention_mask"].bool().all()  # different lengths -> left padding
    batched = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1] :]
    kept = model.last_pruning_trace().stage2_index
    for i in range(3):
        single = _batch(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        assert model.generate(**single, **kw)[0, single["input_ids"].shape[1] :].tolist() == batched[i].tolist()
        assert model.last_pruning_trace().stage2_index[0].tolist() == kept[i].tolist()


def all_rows_attention(layer, hidden, positions, rotary):
    """Hand-rolled eager causal attention probabilities of ``layer`` on its input [1, S, D], head-averaged: [S, S]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary(hidden, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q[0] @ k[0].transpose(-1, -2) / math.sqrt(attn.head_dim)
    logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1).mean(0)


def reference_forward(eager, embeds, vision, boundaries, keeps, extra=None):
    """SparseVLM by hand on one unpadded prompt (optionally with one more token ``extra`` [1, 1, D] after it, which
    is never a rater and, being last, changes nothing before it): raters from the input embeddings; after layer
    ``k - 1`` for each boundary ``k``, keep the top vision tokens by the raters' attention in that layer, cluster
    the most relevant deleted ones (the reference's loops) and write each cluster's mean at its centre; kept tokens
    keep their positions. -> (kept slots of the 16 vision tokens, logits of the last prompt row, of ``extra``)."""
    lm = eager.model.language_model
    prompt = embeds.shape[1]
    text = torch.arange(int(vision[-1]) + 1, prompt)
    relevance = (embeds[0, vision] @ embeds[0, text].T).softmax(-1).mean(0)
    raters = text[relevance > relevance.mean()]
    hidden = embeds if extra is None else torch.cat([embeds, extra], dim=1)
    positions = torch.arange(hidden.shape[1])
    vision_pos, slots = vision.clone(), torch.arange(len(vision))
    for idx, layer in enumerate(lm.layers):
        if idx + 1 in boundaries:
            score = all_rows_attention(layer, hidden, positions, lm.rotary_emb)[raters][:, vision_pos].mean(0)
        s = hidden.shape[1]
        mask = torch.full((s, s), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, positions[None]))
        if idx + 1 in boundaries:
            keep = keeps[boundaries.index(idx + 1)]
            top = score.topk(keep).indices
            deleted = [int(i) for i in score.argsort(descending=True) if int(i) not in top.tolist()]
            candidates = deleted[: int(len(deleted) * 0.3) + 1]
            centres, merged = cluster_and_merge_reference(hidden[0, vision_pos[candidates]], len(candidates) // 10 + 1)
            centres = [candidates[c] for c in centres]
            hidden = hidden.clone()
            hidden[0, vision_pos[centres]] = merged
            chosen = sorted(top.tolist() + centres)
            keep_seq = torch.ones(hidden.shape[1], dtype=torch.bool)
            keep_seq[vision_pos] = False
            keep_seq[vision_pos[chosen]] = True
            new_index = keep_seq.cumsum(0) - 1
            vision_pos, slots = new_index[vision_pos[chosen]], slots[chosen]
            raters = new_index[raters]
            hidden, positions = hidden[:, keep_seq], positions[keep_seq]
    logits = eager.lm_head(lm.norm(hidden))[0]
    return (slots, logits[-1], None) if extra is None else (slots, logits[-2], logits[-1])


@pytest.mark.parametrize("budget", [6, 10])
def test_selection_and_logits_equal_a_hand_run(loaded, images, eager, budget):
    """Each cut keeps the top vision tokens by the raters' attention in layer k-1 and writes the recycled cluster
    means at the centres: kept slots, prefill logits and one cached decode step equal the hand-run."""
    _, model, _ = loaded
    method = apply_pruning(model, PruningConfig("sparsevlm", budget))
    boundaries = list(method.decoder_layers)
    for i in range(3):
        batch = _batch(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        out = model(**batch, use_cache=True)
        kept = model.last_pruning_trace().stage2_index[0]
        token = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=token, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(token)], 1),
                     past_key_values=out.past_key_values, use_cache=True).logits[0, -1]  # fmt: skip
        ref = eager(**batch, output_hidden_states=True)
        vision = (batch["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
        extra = eager.model.language_model.embed_tokens(token)
        ref_kept, ref_logits, ref_step = reference_forward(eager, ref.hidden_states[0], vision, boundaries,
                                                           TINY_KEEP[budget], extra)  # fmt: skip
        assert kept.tolist() == sorted(ref_kept.tolist())
        torch.testing.assert_close(out.logits[0, -1], ref_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(step, ref_step, atol=1e-4, rtol=0)


def test_efficiency_oracle_keeps_the_same_counts(loaded, images):
    """The fixed-index oracle reproduces every cut's count (16, 9, 6, 3 at T = 6) with the first indices."""
    _, model, _ = loaded
    method = apply_pruning(model, PruningConfig("sparsevlm", 6))
    model.model.set_pruner(FixedIndexOracle(method))
    try:
        model(**_batch(loaded, images))
        trace = model.last_pruning_trace()
    finally:
        model.model.set_pruner(None)
    assert trace.vision_tokens_per_sample == [TINY_PLANS[6]] * 3
    assert trace.stage2_index.tolist() == [[0, 1, 2]] * 3
