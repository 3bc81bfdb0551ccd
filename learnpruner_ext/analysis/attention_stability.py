"""Is layer k's text->vision attention still predictive after stage 1 has pruned the sequence?

For one prompt, the *full* scores are the exact text->vision attention at layer ``k`` when every vision token
enters the LLM; the *pruned* scores are the same quantity when only stage 1's ``R1`` tokens enter. Over the
surviving tokens we report Spearman's rho, Kendall's tau-b and the top-``R2`` overlap (the share of stage 2's
picks on the pruned sequence that the full-sequence scores would also pick among the survivors). Scores come
from the model's own decoder stage (``PruningTrace.stage2_scores``), i.e. exact softmax rows, not eager attention.
Stage 1 is LearnPruner's (``stage1`` option: the LPM, [CLS], random, or none, which is the full run itself).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import PruningConfig
from ..modeling import apply_pruning

STAGE1_CHOICES = ("lpm", "cls", "random", "none")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based; ties share their mean rank), float64."""
    x = x.double()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def kendall_tau_b(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_a) (n0 - ties_b)) over all pairs."""
    da = (a.double()[:, None] - a.double()[None]).sign().triu(1)
    db = (b.double()[:, None] - b.double()[None]).sign().triu(1)
    n = len(a)
    pairs = n * (n - 1) / 2
    ties_a = pairs - float((da != 0).sum())
    ties_b = pairs - float((db != 0).sum())
    denom = ((pairs - ties_a) * (pairs - ties_b)) ** 0.5
    return float((da * db).sum() / denom) if denom > 0 else float("nan")


def top_overlap(full: torch.Tensor, pruned: torch.Tensor, k: int) -> float:
    """Share of the top-``k`` of ``pruned`` that are also in the top-``k`` of ``full`` (same token order)."""
    k = min(k, len(full))
    if k == 0:
        return float("nan")
    a, b = set(full.topk(k).indices.tolist()), set(pruned.topk(k).indices.tolist())
    return len(a & b) / k


@dataclass
class Stability:
    stage1: str
    layer: int
    budget: int
    r1: int
    r2: int
    spearman: float
    kendall: float
    overlap: float


def prompt_stability(model, batch: dict, stage1: str, budget: int, layer: int, base: PruningConfig | None = None) -> list[Stability]:
    """Per prompt of ``batch`` (a prepared model input): the agreement of layer ``layer``'s scores on the
    stage-1-pruned sequence with those on the full sequence. ``base`` carries LPM path, ratio, seed, ..."""
    if stage1 not in STAGE1_CHOICES:
        raise ValueError(f"stage1 must be one of {STAGE1_CHOICES}, got {stage1!r}")
    base = base or PruningConfig("learnpruner")
    n = model.num_vision_tokens
    # the full run: every token enters the LLM; T = N - 1 makes stage 2 run (and read its scores) at layer k
    full = _run(model, batch, replace(base, method="learnpruner", budget=n - 1, layer=layer,
                                      options={**base.options, "stage1": "none"}))
    if stage1 != "none":  # stage 1 = none is the full run itself: 1.0 by construction
        pruned = replace(base, method="learnpruner", budget=budget, layer=layer, options={**base.options, "stage1": stage1})
        trace = _run(model, batch, pruned)
    else:
        trace = full
    plan = model.pruner.plan
    out = []
    for b in range(trace.stage1_index.shape[0]):
        kept = trace.stage1_index[b][trace.stage1_index[b] >= 0]  # patch slots of the pruned run's vision tokens
        pruned = trace.stage2_scores[b][: len(kept)]
        reference = full.stage2_scores[b][kept]  # the full run's vision tokens are the slots 0..N-1 in order
        out.append(Stability(stage1, layer, budget, plan.r1, plan.r2, spearman(reference, pruned),
                             kendall_tau_b(reference, pruned), top_overlap(reference, pruned, plan.r2)))  # fmt: skip
    return out


def _run(model, batch, config):
    apply_pruning(model, config)
    with torch.no_grad():
        model(**batch)
    trace = model.last_pruning_trace()
    if trace.stage2_scores is None:
        raise RuntimeError("the decoder stage recorded no text->vision scores (is the layer inside the LLM?)")
    return trace
