"""Selection functions of the method zoo against brute-force references written from the papers' text."""

import re

import pytest
import torch
from transformers import LlavaConfig

from learnpruner_ext import BudgetError, LearnablePruningModule, PruningConfig, available_methods, create_method
from learnpruner_ext.methods import get_method_class, plan_method
from learnpruner_ext.methods.base import VisionContext
from learnpruner_ext.methods.dart import dart_select
from learnpruner_ext.methods.random_pruning import random_indices
from learnpruner_ext.selection import remove_duplicates



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def cos(x, y):
    return float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0))


# --------------------------------------------------------------------------- VisPruner, Algorithm 1
def algorithm1_reference(features, n, step):
    """VisPruner Algorithm 1 with Python lists: split remaining into a = [0::2], b = [1::2]; score each a-token
    by its max cosine similarity to b; drop the r highest-scoring a-tokens; remaining = kept a (by descending
    score) + b; r = min(r, len(remaining) - n)."""
    remaining = list(range(len(features)))
    if n == 0:
        return []
    while True:
        r = min(step, len(remaining) - n, (len(remaining) + 1) // 2)
        if r <= 0:
            return remaining
        a, b = remaining[0::2], remaining[1::2]
        scores = [max(cos(features[i], features[j]) for j in b) for i in a]
        by_score = sorted(range(len(a)), key=lambda i: -scores[i])  # stable: ties keep order
        remaining = [a[i] for i in by_score[r:]] + b


@pytest.mark.parametrize("n_tokens,keep,step", [(20, 6, 8), (21, 5, 8), (17, 16, 8), (12, 1, 3), (9, 3, 8), (30, 0, 8)])
def test_remove_duplicates_matches_algorithm1(n_tokens, keep, step):
    torch.manual_seed(n_tokens + keep)
    feats = torch.randn(3, n_tokens, 5)
    out = remove_duplicates(feats, keep, step)
    assert out.shape == (3, keep)
    for b in range(3):
        assert out[b].tolist() == algorithm1_reference(feats[b], keep, step)


def test_remove_duplicates_drops_the_duplicates():
    """Pairs (A, A'), (B, B'), (C, C') at positions (0,1), (2,3), (4,5) and unique U, V at 6, 7: one round
    compares A, B, C, U with A', B', C', V, and the three duplicated tokens go."""
    basis = torch.eye(8)
    feats = torch.stack([basis[0], basis[0] + 0.01 * basis[5], basis[1], basis[1] + 0.01 * basis[6],
                         basis[2], basis[2] + 0.01 * basis[7], basis[3], basis[4]])[None]  # fmt: skip
    assert sorted(remove_duplicates(feats, 5, step=8)[0].tolist()) == [1, 3, 5, 6, 7]


def fake_vision_context(method, features=None, attention=None, projected=None, keys=None, cls=None):
    ctx = VisionContext(method, features, projected, has_cls=True, project=lambda x: x * 10, cls_token=cls)
    for name, value in (("cls_attention", attention), ("projected_features", projected), ("_keys", keys)):
        if value is not None:
            ctx.__dict__[name] = value
    return ctx


def method(name, budget, n=24, **options):
    return create_method(PruningConfig(name, budget, options=options), num_vision_tokens=n, num_layers=8, vision_dim=6)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.0, 1.0])
def test_vispruner_is_top_cls_plus_algorithm1(ratio):
    torch.manual_seed(1)
    att, feats = torch.rand(2, 24), torch.randn(2, 24, 6)
    m = method("vispruner", 8, important_ratio=ratio)
    sel = m.select_vision(fake_vision_context(m, feats, att))
    for b in range(2):
        order = sorted(range(24), key=lambda i: -float(att[b, i]))  # descending [CLS] attention
        n_imp = int(8 * ratio)
        important, residual = order[:n_imp], order[n_imp:]
        diverse = [residual[i] for i in algorithm1_reference(feats[b, residual], 8 - n_imp, 8)]
        assert sel.index[b].tolist() == sorted(important + diverse)
        assert sorted(sel.index[b][sel.is_diverse[b]].tolist()) == sorted(diverse)


def test_vispruner_keeps_important_and_least_duplicated():
    """T = 9, r = 0.5: the 4 tokens with the top [CLS] attention, then 5 of the other 8, processed in descending
    attention order: duplicate pairs (1st, 2nd), (3rd, 4th), (5th, 6th) and two unique tokens. One round of
    Algorithm 1 removes the first member of every pair, leaving the 5 non-duplicated tokens."""
    basis = torch.eye(16)
    residual_rows = [basis[0], basis[0] + 0.01 * basis[8], basis[1], basis[1] + 0.01 * basis[9],
                     basis[2], basis[2] + 0.01 * basis[10], basis[3], basis[4]]  # fmt: skip
    important_rows = [basis[5], basis[6], basis[7], basis[11]]
    position = [7, 2, 11, 0, 5, 9, 3, 10, 1, 4, 6, 8]  # patch index of important 0-3, then residual 0-7
    feats, att = torch.zeros(1, 12, 16), torch.zeros(1, 12)
    for rank, (row, patch) in enumerate(zip(important_rows + residual_rows, position)):
        feats[0, patch], att[0, patch] = row, 1.0 - 0.05 * rank
    m = method("vispruner", 9, n=12, important_ratio=0.5)
    sel = m.select_vision(fake_vision_context(m, feats, att))
    important = position[:4]
    diverse = [position[4 + k] for k in (1, 3, 5, 6, 7)]
    assert sel.index[0].tolist() == sorted(important + diverse)
    assert sorted(sel.index[0][sel.is_diverse[0]].tolist()) == sorted(diverse)


# --------------------------------------------------------------------------- DivPrune
def divprune_reference(features, keep):
    """DivPrune's greedy max-min (distance 1 - cos): first the token farthest from its nearest neighbour,
    then repeatedly the token whose nearest picked token is farthest."""
    n = len(features)
    dist = [[1 - cos(features[i], features[j]) for j in range(n)] for i in range(n)]
    picked = [max(range(n), key=lambda i: min(dist[i][j] for j in range(n) if j != i))]
    while len(picked) < keep:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: min(dist[i][j] for j in picked)))
    return sorted(picked)


def test_divprune_equals_exhaustive_greedy_max_min():
    torch.manual_seed(2)
    proj = torch.randn(3, 24, 6)
    m = method("divprune", 7)
    sel = m.select_vision(fake_vision_context(m, projected=proj))
    for b in range(3):
        assert sel.index[b].tolist() == divprune_reference(proj[b], 7)


# --------------------------------------------------------------------------- VisionZip
def visionzip_reference(att, keys, feats, dominant, contextual, cls=None):
    """VisionZip's official rule (dvlab-research/VisionZip @ 3151f6d, clip_encoder.py) with Python lists.

    Dominant: [CLS] (when given) plus the top-(dominant - 1) patches by [CLS] attention, ascending; without
    [CLS], the top-dominant patches. The other patches, ascending: every max(1, rest // contextual)-th is a
    target (the first `contextual`), every other one joins the target of highest key cosine (first on ties).
    Contextual token = target + mean(members), or the target alone if it has none. Order: [CLS], dominant
    patches, contextual tokens by target. Returns (representative index list, [CLS] = 0; tokens [T, C])."""
    n = len(att)
    with_cls = cls is not None and dominant > 0
    dom = sorted(sorted(range(n), key=lambda i: -float(att[i]))[: dominant - with_cls])
    rest = [i for i in range(n) if i not in dom]
    index, tokens = ([0], [cls]) if with_cls else ([], [])
    index, tokens = index + dom, tokens + [feats[i] for i in dom]
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = [rest[j] for j in range(0, len(rest), step)][:contextual]
        members = {t: [] for t in targets}
        for i in rest:
            if i not in targets:
                sims = [cos(keys[i], keys[t]) for t in targets]
                members[targets[sims.index(max(sims))]].append(i)
        for t in targets:
            merged = feats[t] + torch.stack([feats[j] for j in members[t]]).mean(0) if members[t] else feats[t]
            index, tokens = index + [t], tokens + [merged]
    return index, torch.stack(tokens)


@pytest.mark.parametrize("cls_dominant", [True, False])
@pytest.mark.parametrize("budget,options", [(8, {}), (10, {"contextual": 3}), (6, {"dominant": 6}), (16, {"contextual_ratio": 0.5}),
                                            (12, {"contextual": 11})])  # fmt: skip
def test_visionzip_matches_reference(budget, options, cls_dominant):
    torch.manual_seed(3)
    att, keys, feats, cls = torch.rand(2, 24), torch.randn(2, 24, 4), torch.randn(2, 24, 6), torch.randn(2, 6)
    m = method("visionzip", budget, cls_dominant=cls_dominant, **options)
    sel = m.select_vision(fake_vision_context(m, feats, att, keys=keys, cls=cls))
    dominant, contextual = m.split
    assert dominant + contextual == budget and sel.tokens.shape == (2, budget, 6)
    for b in range(2):
        index, tokens = visionzip_reference(att[b], keys[b], feats[b], dominant, contextual, cls[b] if cls_dominant else None)
        assert sel.index[b].tolist() == index
        assert torch.allclose(sel.tokens[b], tokens * 10, atol=1e-5)  # projected by ctx.project


def known_groups_case(member_key_of_7):
    """8 patches with features 0..7 and [CLS] feature 100; patch 0 has the top [CLS] attention, patch 7 the second.
    Keys: 1, 2, 3 along e0; 4, 5, 6 along e1; patch 7 along ``member_key_of_7``."""
    e = torch.eye(2)
    keys = torch.stack([e[0], e[0], e[0], e[0], e[1], e[1], e[1], member_key_of_7])[None]
    feats = torch.arange(8.0)[None, :, None]
    att = torch.tensor([[9.0, 1, 1, 1, 1, 1, 1, 2]])
    return att, keys, feats, torch.tensor([[100.0]])


def test_visionzip_contextual_is_target_plus_member_mean():
    """Official default (cls_dominant): T = 4 = 2 dominant ([CLS] + patch 0) + 2 contextual. Remaining patches
    1..7, step 7 // 2 = 3 -> targets 1 and 4; members 2, 3 join 1 and 5, 6, 7 join 4. Contextual tokens:
    1 + mean(2, 3) = 3.5 and 4 + mean(5, 6, 7) = 10 (the old (target + sum) / (1 + n) gave 2 and 5.5).
    Projected x10: [1000, 0, 35, 100]; [CLS] first with representative index 0."""
    att, keys, feats, cls = known_groups_case(torch.tensor([0.0, 1.0]))
    m = method("visionzip", 4, n=8, dominant=2)
    sel = m.select_vision(fake_vision_context(m, feats, att, keys=keys, cls=cls))
    assert sel.index[0].tolist() == [0, 0, 1, 4]
    assert sel.tokens[0, :, 0].tolist() == pytest.approx([1000.0, 0.0, 35.0, 100.0])


def test_visionzip_target_without_members_stays_itself():
    """As above, but every member's key is along e0 (7's too), so target 1 takes 2, 3, 5, 6, 7 and target 4 has
    none. Official: 4 + (sum of nothing) / clamp(0, min=1) = 4; 1 + mean(2, 3, 5, 6, 7) = 1 + 23/5 = 5.6."""
    e = torch.eye(2)
    att, keys, feats, cls = known_groups_case(e[0])
    keys[0, 5:7] = e[0]
    m = method("visionzip", 4, n=8, dominant=2)
    sel = m.select_vision(fake_vision_context(m, feats, att, keys=keys, cls=cls))
    assert sel.index[0].tolist() == [0, 0, 1, 4]
    assert sel.tokens[0, :, 0].tolist() == pytest.approx([1000.0, 0.0, 56.0, 40.0])


def test_visionzip_ties_join_the_first_target():
    """Patch 7's key is at 45 degrees to both targets' keys (equal cosine): it joins target 1, the first."""
    att, keys, feats, cls = known_groups_case(torch.tensor([1.0, 1.0]))
    m = method("visionzip", 4, n=8, dominant=2)
    sel = m.select_vision(fake_vision_context(m, feats, att, keys=keys, cls=cls))
    assert sel.tokens[0, 2:, 0].tolist() == pytest.approx([10 * (1 + 12 / 3), 10 * (4 + 11 / 2)])  # 1+mean(2,3,7), 4+mean(5,6)


def test_visionzip_patch_dominant_convention():
    """cls_dominant=False (the earlier convention): both dominant tokens are patches, 0 and 7 (top attention);
    remaining 1..6, step 3 -> targets 1, 4 with members {2, 3}, {5, 6}: 1 + 2.5 and 4 + 5.5. No [CLS]."""
    att, keys, feats, cls = known_groups_case(torch.tensor([0.0, 1.0]))
    m = method("visionzip", 4, n=8, dominant=2, cls_dominant=False)
    sel = m.select_vision(fake_vision_context(m, feats, att, keys=keys, cls=cls))
    assert sel.index[0].tolist() == [0, 7, 1, 4]
    assert sel.tokens[0, :, 0].tolist() == pytest.approx([0.0, 70.0, 35.0, 95.0])


def test_visionzip_keeps_cls_among_dominant_by_default():
    """At 64 of 576 tokens the official split is 54 dominant = [CLS] + 53 patches, + 10 contextual."""
    torch.manual_seed(4)
    att, keys, feats, cls = torch.rand(2, 576), torch.randn(2, 576, 4), torch.randn(2, 576, 6), torch.randn(2, 6)
    m = create_method(PruningConfig("visionzip", 64), num_vision_tokens=576, num_layers=32, vision_dim=6)
    assert m.options["cls_dominant"] is True and m.split == (54, 10)
    sel = m.select_vision(fake_vision_context(m, feats, att, keys=keys, cls=cls))
    assert sel.tokens.shape == (2, 64, 6)
    assert torch.equal(sel.tokens[:, 0], cls * 10)
    for b in range(2):
        top53 = sorted(att[b].topk(53).indices.tolist())
        assert sel.index[b, :54].tolist() == [0] + top53


def test_visionzip_cls_feature_needs_a_cls_token():
    m = method("visionzip", 8)
    ctx = fake_vision_context(m, torch.randn(1, 24, 6), torch.rand(1, 24), keys=torch.randn(1, 24, 4))
    with pytest.raises(RuntimeError, match="no \\[CLS\\] token"):
        m.select_vision(ctx)
    with pytest.raises(ValueError, match="cls_dominant must be true or false"):
        method("visionzip", 8, cls_dominant="yes")


def test_visionzip_default_split_is_54_10_at_64():
    m = create_method(PruningConfig("visionzip", 64), num_vision_tokens=576, num_layers=32, vision_dim=1024)
    assert m.split == (54, 10)
    m = create_method(PruningConfig("visionzip", 128), num_vision_tokens=576, num_layers=32, vision_dim=1024)
    assert m.split == (108, 20)
    m = create_method(PruningConfig("visionzip", 192), num_vision_tokens=576, num_layers=32, vision_dim=1024)
    assert m.split == (162, 30)


# --------------------------------------------------------------------------- DART
def dart_reference(vh, vnorm, th, tnorm, tvalid, keep, n_img, n_txt):
    n = len(vnorm)
    img = sorted(range(n), key=lambda i: -float(vnorm[i]))[: min(n_img, keep)]
    valid_text = [q for q in range(len(tnorm)) if tvalid[q]]
    txt = sorted(valid_text, key=lambda q: -float(tnorm[q]))[:n_txt]
    pivots = [vh[i] for i in img] + [th[q] for q in txt]
    free = keep - len(img)
    quotas = [free // len(pivots) + (p < free % len(pivots)) for p in range(len(pivots))]
    kept = list(img)
    for pivot, quota in zip(pivots, quotas):
        candidates = sorted((i for i in range(n) if i not in kept), key=lambda i: cos(vh[i], pivot))
        kept += candidates[:quota]
    return sorted(kept)


@pytest.mark.parametrize("keep,n_img,n_txt", [(9, 4, 4), (5, 4, 4), (3, 4, 4), (11, 2, 0), (20, 1, 6)])
def test_dart_matches_reference(keep, n_img, n_txt):
    torch.manual_seed(keep)
    vh, th = torch.randn(3, 24, 8), torch.randn(3, 7, 8)
    vnorm, tnorm = torch.rand(3, 24), torch.rand(3, 7)
    tvalid = torch.ones(3, 7, dtype=torch.bool)
    tvalid[1, :4] = False  # padding / vision rows of a shorter prompt
    tvalid[2, :6] = False  # only one valid text token: fewer text pivots than asked
    out = dart_select(vh, vnorm, th, tnorm, tvalid, keep, n_img, n_txt)
    for b in range(3):
        assert out[b].tolist() == dart_reference(vh[b], vnorm[b], th[b], tnorm[b], tvalid[b], keep, n_img, n_txt)


def test_dart_removes_duplicates_of_the_pivot():
    """Token 0 has the largest key norm (the only pivot); tokens 1-3 duplicate it, so they are dropped."""
    e = torch.eye(8)
    vh = torch.stack([e[0], e[0] + 0.01 * e[1], e[0] + 0.02 * e[2], e[0] + 0.01 * e[3], e[4], e[5], e[6], e[7]])[None]
    vnorm = torch.tensor([[5.0, 1, 1, 1, 1, 1, 1, 1]])
    empty = torch.zeros(1, 0, 8)
    out = dart_select(vh, vnorm, empty, torch.zeros(1, 0), torch.zeros(1, 0, dtype=torch.bool), 5, 1, 0)
    assert out[0].tolist() == [0, 4, 5, 6, 7]


# --------------------------------------------------------------------------- random, cls
def test_random_is_seeded_and_batch_independent():
    a, b, c = random_indices(576, 64, 0), random_indices(576, 64, 0), random_indices(576, 64, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 64 and 0 <= int(a.min()) and int(a.max()) < 576
    m = create_method(PruningConfig("random", 5, seed=3), num_vision_tokens=24, num_layers=8, vision_dim=6)
    sel = m.select_vision(fake_vision_context(m, torch.randn(4, 24, 6)))
    assert all(row.tolist() == random_indices(24, 5, 3).tolist() for row in sel.index)


def test_cls_keeps_top_attention():
    att = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.0, 0.7]])
    m = method("cls", 3, n=6)
    assert m.select_vision(fake_vision_context(m, attention=att)).index.tolist() == [[1, 3, 5]]


# ------------------------------------------------------------------------ plans without building the method
@pytest.mark.parametrize("name", [m for m in available_methods()])
@pytest.mark.parametrize("budget", [1, 7, 64, 128, 576])
def test_plan_method_equals_the_built_methods_plan(name, budget):
    """``plan_method`` resolves the same TokenPlan (and the same errors) as constructing the nn.Module."""
    config = PruningConfig(name, None if name == "none" else budget)
    try:
        built = create_method(config, num_vision_tokens=576, num_layers=32, vision_dim=1024).plan
    except BudgetError as err:  # e.g. FastV at an average it cannot reach
        with pytest.raises(BudgetError, match=re.escape(str(err))):
            plan_method(config, num_vision_tokens=576, num_layers=32)
        return
    planned = plan_method(config, num_vision_tokens=576, num_layers=32)
    assert planned.plan == built and planned.spec.options == {**get_method_class(name).defaults}


def test_plan_method_builds_no_module_and_loads_no_lpm(tmp_path, monkeypatch):
    """LearnPruner's plan needs no LPM: a path that does not exist fails only when the method is built."""
    config = PruningConfig("learnpruner", 64, lpm_path=str(tmp_path / "missing"))
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: pytest.fail("an nn.Module was built"))
    planned = plan_method(config, num_vision_tokens=576, num_layers=32)
    assert (planned.plan.r1, planned.plan.r2, planned.plan.layer) == (111, 37, 12)  # Table 7a, k = 12
    assert planned.overhead_flops(LlavaConfig(), 60, 40) > 0  # the LPM's MLP and the stage-2 scoring rows
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no LPM at"):
        create_method(config, num_vision_tokens=576, num_layers=32, vision_dim=1024)


def test_untrained_lpm_is_a_notice(tmp_path):
    with pytest.warns(UserWarning, match="UNTRAINED"):
        method = create_method(PruningConfig("learnpruner", 64), num_vision_tokens=576, num_layers=32, vision_dim=32)
    assert len(method.notices) == 1 and "UNTRAINED" in method.notices[0]
    lpm = LearnablePruningModule(32)
    lpm.trained = True
    lpm.save_pretrained(tmp_path / "lpm")
    trained = create_method(PruningConfig("learnpruner", 64, lpm_path=str(tmp_path / "lpm")), num_vision_tokens=576,
                            num_layers=32, vision_dim=32)  # fmt: skip
    assert trained.notices == []
    assert create_method(PruningConfig("vispruner", 64), num_vision_tokens=576, num_layers=32, vision_dim=32).notices == []
