"""Every method of the zoo on a tiny random LLaVA (16 vision tokens, 8 LLM layers): exactness at full budget,
token accounting, batch invariance, references computed with eager attention, and error messages."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from learnpruner_ext import BudgetError, PruningConfig, apply_pruning, available_methods, create_method
from learnpruner_ext.cli import add_pruning_args, pruning_config_from_args
from llava.inference import build_prompt, prepare_batch

from test_zoo_selection import dart_reference, visionzip_reference



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]
ZOO = ["vispruner", "fastv", "visionzip", "divprune", "dart", "random", "cls"]
IN_LLM = {"fastv", "dart"}
METHODS = ZOO + ["learnpruner", "pyramiddrop", "sparsevlm", "atp", "atp_fixed"]
ADAPTIVE = {"atp"}  # the thresholds decide each sample's count: the plan holds only the target (tests/methods/test_atp.py)


def use(model, name, budget=None, **kw):
    if name == "atp_fixed":  # its default rate 2/3 keeps at most 9.75 of 16 tokens at 1/4/6 of 8 (T = 10 infeasible)
        kw.setdefault("options", {"rate": 0.5})
    if name in ("learnpruner", "atp"):  # an untrained LPM / untrained ATP modules
        with pytest.warns(UserWarning, match="UNTRAINED"):
            return apply_pruning(model, PruningConfig(name, budget, **kw))
    return apply_pruning(model, PruningConfig(name, budget, **kw))


def batch_for(loaded, images, questions):
    tokenizer, model, processor = loaded
    return prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])


# --------------------------------------------------------------------------- exactness at full budget
@pytest.mark.parametrize("name", METHODS)
def test_full_budget_equals_unpruned(loaded, images, name):
    _, model, _ = loaded
    batch = batch_for(loaded, images, QUESTIONS)
    use(model, "none")
    ref = model(**batch).logits
    method = use(model, name, model.num_vision_tokens)
    assert method.plan.r1 == model.num_vision_tokens and method.plan.r2 in (None, model.num_vision_tokens)
    out = model(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (out - ref)[mask].abs().max() <= 1e-5


# --------------------------------------------------------------------------- token accounting
def plan_576(name, budget, **kw):
    return create_method(PruningConfig(name, budget, **kw), num_vision_tokens=576, num_layers=32, vision_dim=1024).plan


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("budget", [128, 64, 32])
def test_planned_average_llava15(name, budget):
    if name in IN_LLM and budget == 32:  # K=2: layers 0-1 already average 2*576/32 = 36 tokens
        with pytest.raises(BudgetError, match="infeasible.*budget >= 37.*after_layer"):
            plan_576(name, budget)
        plan = plan_576(name, budget, options={"budget_mode": "after_layer"})
        assert (plan.r1, plan.r2, plan.layer, plan.convention) == (576, 32, 2, "after_layer")
        assert plan.average == (2 * 576 + 30 * 32) / 32  # reported honestly, not as 32
        return
    plan = plan_576(name, budget)
    assert abs(plan.average - budget) <= 1 and plan.convention == "average"
    assert len(plan.tokens_per_layer) == 32
    if name in IN_LLM:
        assert plan.layer == 2 and plan.r1 == 576 and plan.r2 == math.ceil((budget * 32 - 2 * 576) / 30)


@pytest.mark.parametrize("budget,expected", [(128, (222, 74)), (64, (111, 37)), (32, (57, 19))])
def test_planned_learnpruner_follows_spec(budget, expected):
    """LearnPruner's R1 = 3*R2 with R2 rounded up (SPEC Table 7a) overshoots T by up to rho*k/L = 1.125 + rounding:
    129.5 / 64.75 / 33.25 at 128 / 64 / 32 -- within +2, never below T."""
    with pytest.warns(UserWarning, match="UNTRAINED"):
        plan = plan_576("learnpruner", budget)
    assert (plan.r1, plan.r2, plan.layer) == (*expected, 12)
    assert budget <= plan.average < budget + 2


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("budget", [10, 6])
def test_measured_average_tiny(loaded, images, name, budget):
    if name in ADAPTIVE:
        pytest.skip("adaptive counts: the plan carries only the target T, so plan = measured does not hold; ATP's "
                    "measured per-sample counts are checked in test_atp.py")
    _, model, _ = loaded
    method = use(model, name, budget)
    model(**batch_for(loaded, images, QUESTIONS))
    trace = model.last_pruning_trace()
    assert trace.vision_tokens_per_layer == method.plan.tokens_per_layer
    assert abs(trace.average_vision_tokens - budget) <= 1
    assert trace.stage1_index.shape == (3, method.plan.r1)
    if name in IN_LLM:
        assert trace.stage2_index.shape == (3, method.plan.r2) and trace.layer == 2


# --------------------------------------------------------------------------- batching
@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_single_runs(loaded, images, name):
    tokenizer, model, _ = loaded
    use(model, name, 6)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = batch_for(loaded, images, QUESTIONS)  # different lengths -> left padding
    assert not batch["attention_mask"].bool().all()
    batched = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    trace = model.last_pruning_trace()
    for i in range(3):
        single_batch = batch_for(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        single = model.generate(**single_batch, **kwargs)[:, single_batch["input_ids"].shape[1] :]
        assert single[0].tolist() == batched[i].tolist()
        single_trace = model.last_pruning_trace()
        assert single_trace.stage1_index[0].tolist() == trace.stage1_index[i].tolist()
        if trace.stage2_index is not None:
            assert single_trace.stage2_index[0].tolist() == trace.stage2_index[i].tolist()


# --------------------------------------------------------------------------- references with eager attention
def vision_positions(model, batch):
    vision = batch["input_ids"] == model.config.image_token_id
    return vision.nonzero()[:, 1].view(vision.shape[0], -1)


@pytest.mark.parametrize("options,row_mode,attn_layer", [({}, "last", 1), ({"query": "all"}, "all", 1),
                                                         ({"score_with": "current"}, "last", 2)])  # fmt: skip
def test_fastv_keeps_top_attended_of_previous_layer(loaded, images, eager, options, row_mode, attn_layer):
    """FastV at K=2 ranks with layer K-1's attention weights (eager `output_attentions`), last row or all rows."""
    _, model, _ = loaded
    method = use(model, "fastv", 6, options=options)
    batch = batch_for(loaded, images, QUESTIONS)
    model(**batch)
    kept = model.last_pruning_trace().stage2_index
    attn = eager(**batch, output_attentions=True).attentions[attn_layer]  # [B, H, S, S]
    vis = vision_positions(model, batch)
    valid = batch["attention_mask"].bool()
    for b in range(3):
        rows = [attn.shape[-1] - 1] if row_mode == "last" else valid[b].nonzero()[:, 0].tolist()
        score = attn[b][:, rows][:, :, vis[b]].mean(dim=(0, 1))
        assert kept[b].tolist() == sorted(score.topk(method.plan.r2).indices.tolist())


def test_dart_matches_reference_on_model(loaded, images, eager):
    """Pivots by L1 norm of layer K-1's post-RoPE keys, similarity on final-norm(hidden states entering K)."""
    _, model, _ = loaded
    method = use(model, "dart", 8)
    batch = batch_for(loaded, images, QUESTIONS)
    model(**batch)
    kept = model.last_pruning_trace().stage2_index
    out = eager(**batch, output_hidden_states=True)
    lm = eager.model.language_model
    k = method.plan.layer
    h_prev, h_stage = out.hidden_states[k - 1], out.hidden_states[k]
    attn = lm.layers[k - 1].self_attn
    keys = attn.k_proj(lm.layers[k - 1].input_layernorm(h_prev))
    keys = keys.view(*keys.shape[:2], -1, attn.head_dim).transpose(1, 2)
    positions = torch.arange(h_prev.shape[1])[None]
    cos, sin = lm.rotary_emb(h_prev, positions)
    _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
    key_norm = keys.abs().sum(dim=(1, 3))  # [B, S]
    normed = lm.norm(h_stage)
    vis = vision_positions(model, batch)
    for b in range(3):
        text = list(range(int(vis[b, -1]) + 1, h_prev.shape[1]))
        ref = dart_reference(normed[b, vis[b]], key_norm[b, vis[b]], normed[b, text], key_norm[b, text],
                             [True] * len(text), method.plan.r2, 4, 4)  # fmt: skip
        assert kept[b].tolist() == ref


def eager_vision(eager, batch):
    tower = eager.model.vision_tower
    out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = eager.config.vision_feature_layer  # -2: the penultimate layer's output
    feats = out.hidden_states[layer][:, 1:]
    cls_att = out.attentions[layer].mean(1)[:, 0, 1:]  # attention of the layer that produced `feats`
    layers = getattr(tower, "vision_model", tower).encoder.layers
    enc = layers[len(layers) + layer + 1]
    keys = enc.self_attn.k_proj(enc.layer_norm1(out.hidden_states[layer - 1]))
    keys = keys.view(*keys.shape[:2], -1, enc.self_attn.head_dim).mean(2)[:, 1:]
    return feats, cls_att, keys, out.hidden_states[layer][:, 0]


@pytest.mark.parametrize("name", ["cls", "vispruner"])
def test_cls_attention_methods_match_eager_clip(loaded, images, eager, name):
    from test_zoo_selection import algorithm1_reference

    _, model, _ = loaded
    use(model, name, 6)
    batch = batch_for(loaded, images, QUESTIONS)
    model(**batch)
    index = model.last_pruning_trace().stage1_index
    feats, cls_att, _, _ = eager_vision(eager, batch)
    for b in range(3):
        order = cls_att[b].argsort(descending=True).tolist()
        n_imp = 6 if name == "cls" else 3
        residual = order[n_imp:]
        diverse = [] if name == "cls" else [residual[i] for i in algorithm1_reference(feats[b, residual], 3, 8)]
        assert index[b].tolist() == sorted(order[:n_imp] + diverse)


@pytest.mark.parametrize("cls_dominant", [True, False])
def test_visionzip_tokens_match_eager_reference(loaded, images, eager, cls_dominant):
    """Tokens entering the LLM = projector(official VisionZip tokens) computed from eager CLIP outputs:
    [CLS] + 4 patches + 1 contextual at T = 6 (or 5 patches + 1 with cls_dominant=False)."""
    _, model, _ = loaded
    method = use(model, "visionzip", 6, options={"cls_dominant": cls_dominant})
    batch = batch_for(loaded, images, QUESTIONS)
    out = model(**batch)
    index = model.last_pruning_trace().stage1_index
    feats, cls_att, keys, cls = eager_vision(eager, batch)
    dominant, contextual = method.split
    assert (dominant, contextual) == (5, 1)
    for b in range(3):
        ref_index, ref_tokens = visionzip_reference(cls_att[b], keys[b], feats[b], dominant, contextual,
                                                    cls[b] if cls_dominant else None)  # fmt: skip
        assert index[b].tolist() == ref_index
        projected = eager.model.multi_modal_projector(ref_tokens[None])[0]
        assert (out.image_hidden_states[b] - projected).abs().max() <= 1e-5
        if cls_dominant:  # the first token is the projected [CLS] of the feature layer
            assert (out.image_hidden_states[b, 0] - eager.model.multi_modal_projector(cls[b])).abs().max() <= 1e-5


@pytest.mark.parametrize("budget", [1, 2, 5, 9, 15])
def test_visionzip_keeps_exactly_t_tokens_in_every_layer(loaded, images, budget):
    """[CLS] takes one of the T slots: T tokens enter the LLM and every layer sees exactly T."""
    _, model, _ = loaded
    method = use(model, "visionzip", budget)
    out = model(**batch_for(loaded, images, QUESTIONS))
    trace = model.last_pruning_trace()
    assert sum(method.split) == budget and out.image_hidden_states.shape[1] == budget
    assert trace.vision_tokens_per_layer == [budget] * model.config.text_config.num_hidden_layers
    assert trace.stage1_index.shape == (3, budget) and trace.average_vision_tokens == budget


def test_divprune_uses_projected_features(loaded, images, eager):
    from test_zoo_selection import divprune_reference

    _, model, _ = loaded
    use(model, "divprune", 5)
    batch = batch_for(loaded, images, QUESTIONS)
    model(**batch)
    index = model.last_pruning_trace().stage1_index
    feats, _, _, _ = eager_vision(eager, batch)
    projected = eager.model.multi_modal_projector(feats)
    for b in range(3):
        assert index[b].tolist() == divprune_reference(projected[b], 5)


# --------------------------------------------------------------------------- errors
def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="unknown pruning method 'fastvv'.*valid methods: .*vispruner"):
        create_method(PruningConfig("fastvv", 64), num_vision_tokens=576, num_layers=32, vision_dim=1024)
    import argparse

    parser = argparse.ArgumentParser()
    add_pruning_args(parser)
    with pytest.raises((ValueError, SystemExit), match="valid methods: " + ", ".join(available_methods())):
        pruning_config_from_args(parser.parse_args(["--pruning-method", "fastvv"]))
    for name in ZOO:
        assert name in available_methods()


@pytest.mark.parametrize("config,match", [
    (PruningConfig("vispruner", 64, options={"important_ratio": 1.5}), r"important_ratio must be a number in \[0, 1\]"),
    (PruningConfig("vispruner", 64, options={"important_ratio": -0.1}), r"important_ratio must be a number in \[0, 1\]"),
    (PruningConfig("vispruner", 64, options={"ratio": 0.5}), r"no option\(s\) \['ratio'\]; valid options: important_ratio"),
    (PruningConfig("fastv", 64, layer=32), r"0 < k < 32"),
    (PruningConfig("fastv", 64, layer=40), r"0 < k < 32"),
    (PruningConfig("dart", 64, layer=32), r"0 < k < 32"),
    (PruningConfig("fastv", 64, options={"query": "first"}), r"query must be one of \['last', 'all'\]"),
    (PruningConfig("fastv", 64, options={"budget_mode": "max"}), r"budget_mode must be one of"),
    (PruningConfig("fastv", 64, options={"k": 3}), r"no option\(s\) \['k'\]"),
    (PruningConfig("dart", 64, options={"image_pivots": 0}), r"image_pivots must be an integer >= 1"),
    (PruningConfig("visionzip", 64, options={"dominant": 50, "contextual": 10}), r"must add up to the budget 64"),
    (PruningConfig("visionzip", 64, options={"dominant": 70}), r"must add up to the budget 64"),
    (PruningConfig("cls", 64, layer=2), r"prunes before the LLM"),
    (PruningConfig("divprune", 600), r"exceeds the 576 vision tokens"),
    (PruningConfig("random", 64, options={"seed": 1}), r"no option\(s\) \['seed'\]; valid options: none"),
])  # fmt: skip
def test_bad_options_raise_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        create_method(config, num_vision_tokens=576, num_layers=32, vision_dim=1024)
