"""ATP-LLaVA's fixed-ratio baseline (``atp_fixed``; atp-llava.txt Sec. 4.3, Table 2) on the tiny random LLaVA (16 vision
tokens, 8 LLM layers: modules before layers 1, 4, 6, scored by layers 0, 3, 5) and on LLaVA-1.5's / the toy's plans.

Count rule: ``c_{j+1} = max(1, round_half_up(c_j * (1 - rate)))``, ``c_1`` the smallest whose average reaches ``T``
(so the average is in ``[T, T + 1)``); selection: the top ``c_k`` present tokens by ``S_redundant = (S_self +
S_cross) / 2`` from layer ``k - 1``, ties to the lower index.
"""

import math
import warnings

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from learnpruner_ext import BudgetError, PruningConfig, apply_pruning, create_method
from learnpruner_ext.atp import ATPModules
from learnpruner_ext.methods import plan_method
from learnpruner_ext.methods.atp import default_layers
from learnpruner_ext.methods.atp_fixed import stage_counts, top_redundant
from llava.inference import build_prompt, prepare_batch

pytestmark = pytest.mark.usefixtures("no_grad")
QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]
N, DEPTH, LAYERS = 16, 8, (1, 4, 6)


def plan(budget, n=576, depth=32, **options):
    return plan_method(PruningConfig("atp_fixed", budget, options=options), num_vision_tokens=n, num_layers=depth).plan


def counts(p):
    return [c for _, c in p.stages]


def _batch(loaded, images, questions=QUESTIONS):
    tokenizer, model, processor = loaded
    return prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])


# --------------------------------------------------------------------------- plans, worked by hand
def test_llava15_counts_are_the_papers_by_hand():
    """LLaVA-1.5-7B (N = 576, L = 32, atp's layers 4/14/24), T = 144 (Table 2):

    * rate 2/3: c_1 = 162 -> 162/3 = 54 -> 54/3 = 18; average (4*576 + 10*162 + 10*54 + 8*18)/32
      = (2304 + 1620 + 540 + 144)/32 = 4608/32 = 144 exactly. c_1 = 161 keeps round(53.67) = 54, 18: 4598/32 = 143.69
      < 144, so 162 is the smallest.
    * rate 1/2: c_1 = 136 -> 68 -> 34; (2304 + 1360 + 680 + 272)/32 = 4616/32 = 144.25. c_1 = 135 keeps round(67.5) =
      68, 34: 4606/32 = 143.94 < 144.
    * --pruning-layer 2 replaces the first layer: 2/14/24, so 12 c_1 + 10 c_2 + 8 c_3 >= 144*32 - 2*576 = 3456:
      c_1 = 213 -> 71 -> round(23.67) = 24: 2556 + 710 + 192 = 3458, average 4610/32 = 144.06; c_1 = 212 ->
      round(70.67) = 71 -> 24: 3446 < 3456.
    """
    p = plan(144)
    assert p.stages == ((4, 162), (14, 54), (24, 18)) and p.average == 144 and (p.r1, p.r2, p.layer) == (576, 18, 4)
    assert p.convention == "average" and p.tokens_per_layer == [576] * 4 + [162] * 10 + [54] * 10 + [18] * 8
    p = plan(144, rate=0.5)
    assert p.stages == ((4, 136), (14, 68), (24, 34)) and p.average == 144.25
    config = PruningConfig("atp_fixed", 144, layer=2)
    p = plan_method(config, num_vision_tokens=576, num_layers=32).plan
    assert p.stages == ((2, 213), (14, 71), (24, 24)) and p.average == 4610 / 32


def test_toy_counts_by_hand():
    """The toy model (N = 144, L = 4) with layers [1, 2, 3]: average = (144 + c_1 + c_2 + c_3)/4.

    * T = 72, rate 2/3: c_1 + c_2 + c_3 >= 144; c_1 = 100 -> round(33.33) = 33 -> 11: 144, average 72 exactly;
      c_1 = 99 -> 33 -> 11: 143.
    * T = 48: >= 48; c_1 = 33 -> 11 -> round(3.67) = 4: 48, average 48; c_1 = 32 -> round(10.67) = 11 -> 4: 47.
    * T = 96: rate 2/3 keeps at most 144 -> 48 -> 16 (average (144 + 208)/4 = 88): infeasible, the error names 88
      and a rate that fits: 0.54 (144 -> round(66.24) = 66 -> round(30.36) = 30, average 96; 0.55: 65 + 29 < 96).
      Rate 1/2: >= 240; c_1 = 137 -> round(68.5) = 69 -> round(34.5) = 35: 241, average 96.25; 136 -> 68 -> 34: 238.
    * The floor: c = 1, 1, 1 averages 147/4 = 36.75, so T >= 36; T = 35 is refused.
    """
    toy = dict(n=144, depth=4, layers=[1, 2, 3])
    assert counts(plan(72, **toy)) == [100, 33, 11] and plan(72, **toy).average == 72
    assert counts(plan(48, **toy)) == [33, 11, 4] and plan(48, **toy).average == 48
    with pytest.raises(BudgetError, match=r"at rate=2/3 .*gives \[144, 48, 16\], an average of at most 88.00. Use a "
                                          r"budget <= 88, a budget of 144 \(no pruning\).*rate=0.54$"):  # fmt: skip
        plan(96, **toy)
    assert counts(plan(96, rate=0.54, **toy)) == [144, 66, 30]
    assert counts(plan(96, rate=0.5, **toy)) == [137, 69, 35] and plan(96, rate=0.5, **toy).average == 96.25
    assert counts(plan(36, **toy)) == [1, 1, 1] and plan(36, **toy).average == 36.75
    with pytest.raises(BudgetError, match=r"infeasible with module layers \[1, 2, 3\].*at least 36.75. Use a budget >= 36$"):
        plan(35, **toy)


def test_rounding_is_half_up_on_the_rate_as_written():
    """13 * 0.5 = 6.5 -> 7, 7 * 0.5 = 3.5 -> 4 (Python's round would give 6, 3); 15 * (1 - 0.9) = 1.5 -> 2 (the float
    1 - 0.9 = 0.0999... gives 1.4999... -> 1); a count never falls below 1; rate 0 keeps c_1 at every module."""
    assert stage_counts(13, 0.5, 3) == (13, 7, 4)
    assert stage_counts(15, 0.9, 2) == (15, 2)
    assert stage_counts(2, 0.9, 3) == (2, 1, 1)
    assert stage_counts(50, 0, 3) == (50, 50, 50)


@pytest.mark.parametrize("n,depth,layers", [(576, 32, None), (16, 8, None), (144, 4, [1, 2, 3]), (2880, 32, [2, 16])])
@pytest.mark.parametrize("rate", [2 / 3, 0.5, 0.75, 0.0])
def test_solved_average_is_in_the_budget_window(n, depth, layers, rate):
    """Every feasible T: the average is in [T, T + 1); counts follow the rule from the smallest c_1 that reaches T;
    one below the floor and one above the ceiling are refused; T = N keeps everything (no cut)."""
    options = {"rate": rate} if layers is None else {"rate": rate, "layers": layers}
    ks = list(layers or default_layers(depth))
    floor_avg = (ks[0] * n + depth - ks[0]) / depth
    ceiling = sum(plan_tokens(n, depth, ks, stage_counts(n, rate, len(ks)))) / depth
    lowest, highest = math.floor(floor_avg), math.floor(ceiling)
    for t in range(lowest, min(highest, n - 1) + 1, max(1, (highest - lowest) // 60)):
        p = plan(t, n, depth, **options)
        c = counts(p)
        assert t <= p.average < t + 1, (t, p)
        assert tuple(c) == stage_counts(c[0], rate, len(ks)) and c == sorted(c, reverse=True)
        if c[0] > 1:  # the smallest c_1: one fewer misses T
            assert sum(plan_tokens(n, depth, ks, stage_counts(c[0] - 1, rate, len(ks)))) < t * depth
    with pytest.raises(BudgetError, match=f"at least {floor_avg:.2f}. Use a budget >= {lowest}"):
        plan(lowest - 1, n, depth, **options)
    if highest + 1 < n:
        with pytest.raises(BudgetError, match=f"at most {ceiling:.2f}. Use a budget <= {highest}"):
            plan(highest + 1, n, depth, **options)
    assert plan(n, n, depth, **options).stages == () and plan(n, n, depth, **options).average == n


def plan_tokens(n, depth, layers, c):
    """Tokens per layer of cuts at ``layers`` keeping ``c``, written out: N before the first, then each count."""
    bounds = list(layers) + [depth]
    return [n] * bounds[0] + sum(([count] * (end - k) for k, count, end in zip(layers, c, bounds[1:])), [])


def test_explicit_keep_must_meet_the_budget():
    """keep=[162, 54, 18] is the rate-2/3 plan at T = 144; keep=[160, 54, 18] averages (2304 + 1600 + 540 + 144)/32 =
    143.38, so the error names 143; without a budget (T = N) the counts must keep everything."""
    assert plan(144, keep=[162, 54, 18]) == plan(144)
    assert counts(plan(143, keep=[160, 54, 18])) == [160, 54, 18]
    with pytest.raises(BudgetError, match=r"keep=\[160, 54, 18\] .*averages 143.38 per layer, not the budget 144; "
                                          r"pass --visual-token-budget 143"):  # fmt: skip
        plan(144, keep=[160, 54, 18])
    with pytest.raises(BudgetError, match=r"not the budget 576; pass --visual-token-budget 144"):
        plan(None, keep=[162, 54, 18])
    assert plan(576, keep=[576, 576, 576]).average == 576


@pytest.mark.parametrize("options,match", [
    ({"rate": 1}, r"atp_fixed: option rate must be a number in \[0, 1\)"),
    ({"rate": -0.1}, r"option rate must be a number in \[0, 1\)"),
    ({"rate": "2/3"}, r"option rate must be a number in \[0, 1\)"),
    ({"rate": True}, r"option rate must be a number in \[0, 1\)"),
    ({"keep": [18, 54, 162]}, r"option keep must be a non-increasing list of positive token counts"),
    ({"keep": [162, 0, 0]}, r"option keep must be a non-increasing list of positive token counts"),
    ({"keep": 162}, r"option keep must be a non-increasing list"),
    ({"keep": [162, 54]}, r"keep=\[162, 54\] needs one count per module layer \[4, 14, 24\]"),
    ({"keep": [600, 54, 18]}, r"keeps 600 at layer 4, more than the 576 vision tokens"),
    ({"layers": [14, 4]}, r"option layers must be a strictly ascending list of decoder layers"),
    ({"layers": [4, 40]}, r"atp_fixed module layer must satisfy 0 < k < 32 .*got 40"),
    ({"self_score": "softmax"}, r"option self_score must be one of \['logits', 'attention'\], got 'softmax'"),
    ({"hidden_features": 256}, r"no option\(s\) \['hidden_features'\]; valid options: keep, layers, rate, self_score"),
])  # fmt: skip
def test_bad_options_raise_one_clear_error(options, match):
    with pytest.raises(ValueError, match=match):
        plan(144, **options)
    with pytest.raises(ValueError, match=match):  # the same when the method is built
        create_method(PruningConfig("atp_fixed", 144, options=options), num_vision_tokens=576, num_layers=32,
                      vision_dim=1024)  # fmt: skip


def test_layers_from_an_atp_folder_without_building_modules(tmp_path, monkeypatch):
    """--atp-path gives the layers recorded in its atp_config.json (2, 5 here; only the config is read, no module
    built); the layers option wins over it; a grid is not needed (N = 20 is no square, which atp refuses)."""
    ATPModules((2, 5), N).save_pretrained(tmp_path / "atp")
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: pytest.fail("an nn.Module was built"))
    config = PruningConfig("atp_fixed", 6, atp_path=str(tmp_path / "atp"))
    assert [k for k, _ in plan_method(config, num_vision_tokens=N, num_layers=DEPTH).plan.stages] == [2, 5]
    config = PruningConfig("atp_fixed", 6, atp_path=str(tmp_path / "atp"), options={"layers": [1, 4]})
    assert [k for k, _ in plan_method(config, num_vision_tokens=N, num_layers=DEPTH).plan.stages] == [1, 4]
    monkeypatch.undo()
    method = create_method(PruningConfig("atp_fixed", 10), num_vision_tokens=20, num_layers=DEPTH, vision_dim=8)
    assert method.decoder_layers == LAYERS and not list(method.parameters())


def test_stable_top_by_score():
    """Ties go to the lower index; the kept indices come back ascending."""
    scores = torch.tensor([[0.5, 2.0, 1.0, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    assert top_redundant(scores, 2).tolist() == [[1, 3], [0, 1]]
    assert top_redundant(scores, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]
    assert top_redundant(scores, 0).shape == (2, 0)


# --------------------------------------------------------------------------- on the tiny model
def test_no_module_and_no_warning(loaded):
    _, model, _ = loaded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method = apply_pruning(model, PruningConfig("atp_fixed", 6))
    assert not caught and method.notices == []
    assert list(method.modules()) == [method] and not list(method.parameters())
    assert method.decoder_layers == LAYERS and [method.score_layer_for(k) for k in LAYERS] == [0, 3, 5]


def test_full_budget_equals_unpruned(loaded, images):
    tokenizer, model, _ = loaded
    batch = _batch(loaded, images)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    apply_pruning(model, PruningConfig("none"))
    ref, ref_tokens = model(**batch).logits, model.generate(**batch, **kw)
    method = apply_pruning(model, PruningConfig("atp_fixed", N))
    assert method.plan.stages == () and method.plan.tokens_per_layer == [N] * DEPTH
    assert (model(**batch).logits - ref)[batch["attention_mask"].bool()].abs().max() <= 1e-5
    assert model.last_pruning_trace().vision_tokens_per_sample == [[N] * DEPTH] * 3
    assert model.generate(**batch, **kw).tolist() == ref_tokens.tolist()


@pytest.mark.parametrize("budget,options,expected", [
    (6, {}, [16, 8, 8, 8, 3, 3, 1, 1]),
    (8, {}, [16, 13, 13, 13, 4, 4, 1, 1]),
    (10, {"rate": 0.5}, [16, 14, 14, 14, 7, 7, 4, 4]),
    (7, {"keep": [10, 5, 2]}, [16, 10, 10, 10, 5, 5, 2, 2]),
])  # fmt: skip
def test_measured_tokens_per_layer_equal_the_plan(loaded, images, budget, options, expected):
    """Modules before 1/4/6 of 8: average (16 + 3 c_1 + 2 c_2 + 2 c_3)/8.
    T = 6, rate 2/3: c_1 = 8 -> round(2.67) = 3 -> 1: 16 + 24 + 6 + 2 = 48 = 6 * 8; c_1 = 7 -> 2 -> 1: 43.
    T = 8: c_1 = 13 -> round(4.33) = 4 -> round(1.33) = 1: 16 + 39 + 8 + 2 = 65 (8.125); c_1 = 12 -> 4 -> 1: 62 < 64.
    T = 10, rate 1/2 (2/3 keeps at most 16, 5, 2: 9.75): c_1 = 14 -> 7 -> round(3.5) = 4: 80 = 10 * 8; 13 -> 7 -> 4: 77.
    keep [10, 5, 2]: (16 + 30 + 10 + 4)/8 = 7.5, so T = 7."""
    _, model, _ = loaded
    method = apply_pruning(model, PruningConfig("atp_fixed", budget, options=options))
    assert method.plan.tokens_per_layer == expected and method.decoder_layers == LAYERS
    model(**_batch(loaded, images))
    trace = model.last_pruning_trace()
    assert trace.vision_tokens_per_layer == expected and trace.vision_tokens_per_sample == [expected] * 3
    assert trace.stage2_index.shape == (3, expected[-1]) and trace.convention == "average"


def record(method):
    """Wrap the selection: [(stage layer, kept indices into the present tokens [B, c], S_redundant [B, Nv])]."""
    calls, select = [], method.select_decoder

    def select_decoder(ctx):
        keep = select(ctx)
        calls.append((ctx.stage_layer, keep, ctx.extras["scores"]))
        return keep

    method.select_decoder = select_decoder
    return calls


def hand_scores(layer, hidden, positions, rotary, vision_pos, self_score):
    """S_redundant by hand on one unpadded prompt: eager q.k/sqrt(d) of ``layer`` on its input ``hidden`` [1, S, D];
    S_self = the vision -> vision logits (or causal softmax), S_cross = the softmax rows of the text after the image,
    each averaged over its query rows and the heads, read at the vision columns. -> ([S_r], [H, S, S] softmax)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary(hidden, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q[0] @ k[0].transpose(-1, -2) / math.sqrt(attn.head_dim)  # [H, S, S], no mask
    s = logits.shape[-1]
    probs = logits.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    text = torch.arange(int(vision_pos[-1]) + 1, s)
    s_self = (logits if self_score == "logits" else probs)[:, vision_pos][:, :, vision_pos].mean(dim=(0, 1))
    s_cross = probs[:, text][:, :, vision_pos].mean(dim=(0, 1))
    return (s_self + s_cross) / 2, probs


def reference_forward(eager, embeds, vision, stage_counts_, layers, self_score):
    """atp_fixed by hand on one unpadded prompt: run the decoder layers; layer k - 1 scores the vision tokens on its
    input (after any cut there), and before layer k the top c_k by S_redundant stay (sorted by (-score, index): ties
    to the lower index), keeping their position ids. -> (per stage: kept indices into the present tokens, S_r),
    the final kept indices into the vision tokens, last-position logits, the first scoring layer's softmax."""
    lm = eager.model.language_model
    hidden, positions = embeds, torch.arange(embeds.shape[1])
    vision_pos, kept, stages, pending, first_probs = vision.clone(), torch.arange(len(vision)), [], None, None
    for idx, layer in enumerate(lm.layers):
        if idx in layers:
            s_r = pending
            c = stage_counts_[layers.index(idx)]
            top = torch.tensor(sorted(sorted(range(len(s_r)), key=lambda i: (-float(s_r[i]), i))[:c]))
            stages.append((top, s_r))
            keep = torch.ones(hidden.shape[1], dtype=torch.bool)
            keep[vision_pos] = False
            keep[vision_pos[top]] = True
            new_index = keep.cumsum(0) - 1
            vision_pos, kept = new_index[vision_pos[top]], kept[top]
            hidden, positions = hidden[:, keep], positions[keep]
        if idx + 1 in layers:
            pending, probs = hand_scores(layer, hidden, positions, lm.rotary_emb, vision_pos, self_score)
            first_probs = probs if first_probs is None else first_probs
        s = hidden.shape[1]
        mask = torch.full((s, s), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, positions[None]))
    return stages, kept, eager.lm_head(lm.norm(hidden))[0, -1], first_probs


@pytest.mark.parametrize("budget,self_score", [(6, "logits"), (8, "logits"), (6, "attention")])
def test_kept_tokens_are_the_top_by_s_redundant(loaded, images, eager, budget, self_score):
    """At every module the kept tokens are the top c_k by S_redundant computed by hand from layer k - 1's eager
    attention on its input; the scores (the trace's stage2_scores) and the pruned logits equal the hand-run's."""
    _, model, _ = loaded
    method = apply_pruning(model, PruningConfig("atp_fixed", budget, options={"self_score": self_score}))
    calls = record(method)
    layers, plan_counts = list(method.decoder_layers), counts(method.plan)
    for i in range(3):
        calls.clear()
        batch = _batch(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        logits = model(**batch).logits[0, -1]
        trace = model.last_pruning_trace()
        out = eager(**batch, output_hidden_states=True, output_attentions=True)
        vision = (batch["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
        stages, ref_kept, ref_logits, first_probs = reference_forward(eager, out.hidden_states[0], vision, plan_counts,
                                                                      layers, self_score)  # fmt: skip
        torch.testing.assert_close(first_probs, out.attentions[layers[0] - 1][0], atol=1e-6, rtol=0)  # HF eager
        assert [layer for layer, _, _ in calls] == layers
        for (_, keep, scores), (ref_top, ref_scores) in zip(calls, stages):
            torch.testing.assert_close(scores[0], ref_scores, atol=1e-5, rtol=1e-5)
            assert keep[0].tolist() == ref_top.tolist()
        assert trace.stage2_index[0].tolist() == ref_kept.tolist()
        torch.testing.assert_close(trace.stage2_scores[0], stages[-1][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("budget,options", [(6, {}), (8, {"self_score": "attention"})])
def test_batch_equals_single_runs(loaded, images, budget, options):
    """A left-padded batch: prefill logits, kept tokens, scores and 3 greedy decode steps equal each prompt alone."""
    tokenizer, model, _ = loaded
    apply_pruning(model, PruningConfig("atp_fixed", budget, options=options))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = _batch(loaded, images)
    assert not batch["attention_mask"].bool().all()  # different lengths -> left padding
    logits = model(**batch).logits[:, -1]
    trace = model.last_pruning_trace()
    batched = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1] :]
    assert model.last_pruning_trace().stage2_index.tolist() == trace.stage2_index.tolist()
    for i in range(3):
        single = _batch(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        torch.testing.assert_close(model(**single).logits[0, -1], logits[i], atol=1e-4, rtol=0)
        one = model.last_pruning_trace()
        assert one.stage2_index[0].tolist() == trace.stage2_index[i].tolist()
        torch.testing.assert_close(one.stage2_scores[0], trace.stage2_scores[i], atol=1e-5, rtol=1e-4)
        assert model.generate(**single, **kw)[0, single["input_ids"].shape[1] :].tolist() == batched[i].tolist()
