import torch

from learnpruner_ext.selection import importance_plus_diversity, max_min_diversity, topk_indices


def brute_force_max_min(features, selected, num_add):
    """Greedy max-min written directly from the paper's sentence, with Python loops."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    chosen = [i for i in range(len(features)) if selected[i]]
    picks = []
    for _ in range(num_add):
        best, best_val = None, None
        for i in range(len(features)):
            if i in chosen:
                continue
            if chosen:
                val = max(float(unit[i] @ unit[j]) for j in chosen)
            else:
                val = max(float(unit[i] @ unit[j]) for j in range(len(features)) if j != i)
            if best_val is None or val < best_val:
                best, best_val = i, val
        chosen.append(best)
        picks.append(best)
    return picks


def test_max_min_matches_brute_force_batched():
    torch.manual_seed(0)
    feats = torch.randn(4, 30, 8)
    selected = torch.zeros(4, 30, dtype=torch.bool)
    selected[0, [1, 5]] = True
    selected[1, [0]] = True
    selected[3, 10:20] = True  # sample 2 starts empty
    picks = max_min_diversity(feats, selected, 6)
    for b in range(4):
        assert picks[b].tolist() == brute_force_max_min(feats[b], selected[b], 6)


def test_topk_keeps_original_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0]])
    assert topk_indices(scores, 3).tolist() == [[1, 2, 3]]


def test_importance_plus_diversity():
    torch.manual_seed(1)
    scores, feats = torch.rand(2, 20), torch.randn(2, 20, 6)
    index, diverse = importance_plus_diversity(scores, feats, keep=8, num_diverse=2)
    for b in range(2):
        top = set(scores[b].topk(6).indices.tolist())
        selected = torch.zeros(20, dtype=torch.bool)
        selected[list(top)] = True
        expected = top | set(brute_force_max_min(feats[b], selected, 2))
        assert index[b].tolist() == sorted(expected)
        assert set(index[b][diverse[b]].tolist()) == expected - top
