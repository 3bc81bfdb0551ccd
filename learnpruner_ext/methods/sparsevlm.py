"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
ICML 2025, arXiv 2410.04417): text-guided, progressive pruning inside the LLM with token recycling.

1. **Raters.** Once per prompt, from the LLM's input embeddings: ``softmax_text(V @ T^T)`` over the text tokens after
   the image, averaged over the vision tokens, gives each text token's relevance to the image; the text tokens above
   the mean relevance are the raters (all text tokens after the image if none is above it, e.g. a single one).
2. **Progressive sparsification.** At each cut boundary ``k`` (LLaVA-1.5: 3, 7, 16, i.e. after the reference's
   pruning layers 2, 6, 15) the vision tokens are ranked by the attention they receive from the raters in layer
   ``k-1`` (the exact causal softmax rows from that layer's q/k, head-averaged, then averaged over the raters;
   ``score_layer_for(k) = k - 1``) and the top ``c_k`` are kept (``torch.topk``).
3. **Recycling.** Of the ``d`` deleted tokens, the ``int(0.3 d) + 1`` most relevant are clustered (DPC-KNN on their
   hidden states leaving layer ``k-1``) into ``that // 10 + 1`` clusters; each cluster's mean hidden state is a
   recycled token. It takes the slot (and position id) of its cluster's centre, so layers ``[k, L)`` see
   ``c_k + recycled`` vision tokens; later cuts rank, keep and recycle them like any vision token.

**Budget.** ``T`` is the average number of vision tokens per layer, recycled tokens included. The stage totals
``t_s = min(t_{s-1}, max(floor_s, int(N * lambda**s)))`` (``floor_s``: one kept token plus its recycled ones) are solved
from ``T`` (the smallest ``lambda`` with an average of at least ``T``, so it is in ``[T, T + 1)``); each stage keeps the
largest ``c_s`` with ``c_s + recycled(t_{s-1} - c_s) = t_s``. Option ``keep`` gives the reference's per-stage keep
counts instead (e.g. ``[300, 200, 110]``, its "192"); their average must then be in ``[T, T + 1)`` (that one is 206.5:
``--visual-token-budget 206``). The floor: layers ``[0, k_1)`` process all ``N``, and every stage keeps ``floor_s``.

Reference: Gumpest/SparseVLMs @ 26a5f48813c46cd1c7364160354e7fdd3febaa67 (main, default ``USE_VERSION=1_0``, the
v1.5 algorithm), ``llava/model/language_model/modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``: raters,
``pruning_loc = [2, 6, 15]``, recycling), ``score.py`` (``attn_postprocess_topk``, ``sparse_token_dict``),
``utils.py`` (``cluster_and_merge``). Deviations (docs/methods.md): counts solved from the budget (the paper's
rank-based adaptive count and the reference's four fixed lists are replaced); recycled tokens at their centre's
slot and every kept token with its position id (the reference appends the recycled tokens after the kept ones and
renumbers); deterministic density ties (the reference adds 1e-6 noise); exact cluster means; no forced deletion
at a stage that keeps everything; fp32; per-sample spans and padding; KV cache supported.
"""

from __future__ import annotations

import math

import torch

from ..config import BudgetError, TokenPlan, check_budget
from ..cut import gather_seq, right_pad
from ..selection import topk_indices
from ._common import resolve_layers, scaled_layers
from .base import DecoderContext, PruningMethod, register_method

REFERENCE_PRUNING_LAYERS = (2, 6, 15)  # the reference's pruning_loc: these layers score, tokens drop after them
REFERENCE_BOUNDARIES = tuple(k + 1 for k in REFERENCE_PRUNING_LAYERS)  # our cut boundaries: 3, 7, 16
# score.py's sparse_token_dict (USE_VERSION=1_0): the top-c kept at each pruning layer, per "retained" budget
REFERENCE_KEEP = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
RECYCLE_SHARE = 0.3  # the top int(0.3 d) + 1 of the d deleted tokens are recycled ...
CLUSTER_DIVISOR = 10  # ... into (that // 10) + 1 clusters
SOLVE_STEPS = 64


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The reference's boundaries 3/7/16 of 32 at the same relative depth (1/2/4 of 8, 1/2 of 4)."""
    return scaled_layers(REFERENCE_BOUNDARIES, num_layers)


def recycle_candidates(deleted: int) -> int:
    """Deleted tokens that are clustered: ``int(d * 0.3) + 1`` (the reference's float arithmetic), 0 if none."""
    return int(deleted * RECYCLE_SHARE) + 1 if deleted > 0 else 0


def recycled_count(deleted: int) -> int:
    """Recycled tokens from ``deleted`` deleted ones: ``recycle_candidates // 10 + 1`` clusters (0 if none)."""
    return recycle_candidates(deleted) // CLUSTER_DIVISOR + 1 if deleted > 0 else 0


def stage_total(present: int, keep: int, recycle: bool = True) -> int:
    """Vision tokens after a cut that keeps ``keep`` of ``present`` (recycled ones included)."""
    keep = min(keep, present)
    return keep + (recycled_count(present - keep) if recycle else 0)


def keep_for_total(present: int, total: int, recycle: bool = True) -> int:
    """The largest ``c`` with ``stage_total(present, c) == total`` (``stage_total`` grows by 0 or 1 with ``c``)."""
    if not stage_total(present, 1, recycle) <= total <= present:
        raise ValueError(f"sparsevlm: {total} vision tokens cannot follow a cut of {present}")
    keep = total
    while stage_total(present, keep, recycle) > total:
        keep -= 1
    return keep


def stage_totals(num_vision_tokens: int, ratio: float, stages: int, recycle: bool = True) -> tuple[int, ...]:
    """Totals ``t_s = min(t_{s-1}, max(floor_s, int(N * ratio**s)))``, ``floor_s = stage_total(t_{s-1}, 1)``."""
    totals, previous = [], num_vision_tokens
    for s in range(1, stages + 1):
        previous = min(previous, max(stage_total(previous, 1, recycle), int(num_vision_tokens * ratio**s)))
        totals.append(previous)
    return tuple(totals)


def keep_totals(num_vision_tokens: int, keep: tuple[int, ...], recycle: bool = True) -> tuple[int, ...]:
    """Totals of fixed per-stage keep counts (the reference's lists)."""
    totals, previous = [], num_vision_tokens
    for count in keep:
        previous = stage_total(previous, count, recycle)
        totals.append(previous)
    return tuple(totals)


def sparsevlm_plan(num_vision_tokens: int, num_layers: int, layers: tuple[int, ...], totals: tuple[int, ...]) -> TokenPlan:
    return TokenPlan(num_vision_tokens, num_layers, r1=num_vision_tokens, r2=totals[-1], layer=layers[0],
                     stages=tuple(zip(layers, totals)))  # fmt: skip


def floor_average(num_vision_tokens: int, num_layers: int, layers: tuple[int, ...], recycle: bool = True) -> float:
    """The smallest average: one kept token (plus its recycled ones) per stage."""
    totals = stage_totals(num_vision_tokens, 0.0, len(layers), recycle)
    return sparsevlm_plan(num_vision_tokens, num_layers, layers, totals).average


def solve_ratio(budget: int, num_vision_tokens: int, num_layers: int, layers: tuple[int, ...], recycle: bool) -> float:
    """The smallest ratio in (0, 1] whose totals average at least ``budget`` (the average grows with the ratio)."""
    def average(ratio: float) -> float:
        totals = stage_totals(num_vision_tokens, ratio, len(layers), recycle)
        return sparsevlm_plan(num_vision_tokens, num_layers, layers, totals).average

    low, high = 0.0, 1.0
    for _ in range(SOLVE_STEPS):
        mid = (low + high) / 2
        low, high = (low, mid) if average(mid) >= budget else (mid, high)
    return high


def resolve_stages(spec, num_vision_tokens: int, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(boundaries, totals) of ``spec`` for an image of ``num_vision_tokens``; raises for a budget it cannot meet."""
    n, big_l, recycle = num_vision_tokens, num_layers, spec.options["recycle"]
    layers = resolve_layers("sparsevlm", "cut boundary", tuple(spec.options["layers"] or default_layers(big_l)),
                            big_l, spec.config.layer, spec.options["layers"] is not None)  # fmt: skip
    keep = spec.options["keep"]
    if keep is not None and len(keep) != len(layers):
        raise ValueError(f"sparsevlm: keep={list(keep)} needs one count per cut boundary {list(layers)}")
    t = check_budget(spec.config.budget, n)
    if keep is None:
        totals = stage_totals(n, solve_ratio(t, n, big_l, layers, recycle), len(layers), recycle)
    else:
        totals = keep_totals(n, tuple(keep), recycle)
    achieved = sparsevlm_plan(n, big_l, layers, totals).average
    if t <= achieved < t + 1:
        return layers, totals
    if keep is not None:
        raise BudgetError(
            f"sparsevlm: keep={list(keep)} at cut boundaries {list(layers)} gives {list(totals)} of {n} vision tokens "
            f"(recycled ones included), an average of {achieved:.2f} per layer, not the budget {t}; pass "
            f"--visual-token-budget {math.floor(achieved)} to run these counts, or drop the keep option to solve "
            "them from the budget"
        )
    floor_avg = floor_average(n, big_l, layers, recycle)
    def floor_from(k: int) -> int:  # the smallest budget with the first boundary at k
        return math.floor(floor_average(n, big_l, (k,) + tuple(j for j in layers[1:] if j > k), recycle))

    earlier = [k for k in range(1, layers[0]) if floor_from(k) <= t]
    hint = ""
    if earlier:
        suggestion = [earlier[-1]] + [k for k in layers[1:] if k > earlier[-1]]
        hint = f", or an earlier first boundary, e.g. --method-option layers=[{','.join(map(str, suggestion))}]"
    raise BudgetError(
        f"sparsevlm: an average of {t} vision tokens per layer is infeasible with cut boundaries {list(layers)}: "
        f"layers [0, {layers[0]}) process all {n} tokens and every later stage keeps at least one token plus its "
        f"recycled ones, so the average is at least {floor_avg:.2f}. Use a budget >= {math.floor(floor_avg)}{hint}"
    )


# --------------------------------------------------------------------------- pure selection functions
def select_raters(embeddings: torch.Tensor, vision: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The text raters: [B, S] bool over the LLM's input sequence.

    For each prompt, ``softmax_q(v_i . t_q)`` over its text tokens after the image (unscaled dot products of the
    input embeddings), averaged over its vision tokens ``i``; raters are the text tokens above the mean, or all of
    them when none is (e.g. one text token)."""
    batch, seq = vision.shape
    positions = torch.arange(seq, device=vision.device)
    last = torch.where(vision, positions, -1).amax(-1)
    text = (positions[None] > last[:, None]) & (last[:, None] >= 0)
    if valid is not None:
        text = text & valid
    if not bool(text.any(-1).all()):
        raise ValueError("sparsevlm rates vision tokens with the text after the image; put <image> before the question")
    vision_idx = right_pad([row.nonzero()[:, 0] for row in vision], 0)
    vision_ok = right_pad([torch.ones(int(row.sum()), dtype=torch.bool, device=vision.device) for row in vision], False)
    text_idx = right_pad([row.nonzero()[:, 0] for row in text], 0)
    text_ok = right_pad([torch.ones(int(row.sum()), dtype=torch.bool, device=vision.device) for row in text], False)
    v, t = gather_seq(embeddings, vision_idx).float(), gather_seq(embeddings, text_idx).float()
    relation = (v @ t.transpose(1, 2)).masked_fill(~text_ok[:, None], float("-inf")).softmax(-1)  # [B, Nv, Q]
    relation = (relation * vision_ok[..., None]).sum(1) / vision_ok.sum(-1, keepdim=True)  # [B, Q]
    mean = (relation * text_ok).sum(-1, keepdim=True) / text_ok.sum(-1, keepdim=True)
    raters = (relation > mean) & text_ok
    raters = torch.where(raters.any(-1, keepdim=True), raters, text_ok)
    out = torch.zeros(batch, seq, dtype=torch.bool, device=vision.device)
    rows = torch.arange(batch, device=vision.device)[:, None].expand_as(text_idx)
    out[rows[text_ok], text_idx[text_ok]] = raters[text_ok]
    return out


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering and merging (the reference's ``cluster_and_merge``, from TCFormer).

    Distances ``||x_i - x_j|| / sqrt(D)``; density ``exp(-mean of the squared distances to the `clusters` nearest
    tokens, itself included)``; each token's distance to the nearest denser token (the densest: the largest
    distance); centres: the ``clusters`` largest ``distance * density``; every token joins its nearest centre (a
    centre itself); a cluster's token is its members' mean. Equal densities: the earlier token counts as denser
    (the reference breaks ties with 1e-6 random noise).

    Args:
        x: [B, m, D] the tokens to cluster, in rank order (the reference: descending relevance).
        clusters: centres per row, 1 <= clusters <= m.
    Returns:
        centres [B, clusters] (indices into m, in score order) and merged [B, clusters, D] (fp32).
    """
    batch, m, dim = x.shape
    if not 1 <= clusters <= m:
        raise ValueError(f"cannot form {clusters} clusters of {m} tokens")
    x = x.float()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(dim)  # [B, m, m]
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()  # [B, m]
    order = torch.arange(m, device=x.device)
    higher = density[:, None, :] > density[:, :, None]  # [B, i, j]: j denser than i
    higher = higher | ((density[:, None, :] == density[:, :, None]) & (order[None, None, :] < order[None, :, None]))
    dist_max = dist.flatten(1).amax(-1)[:, None, None]
    parent = torch.where(higher, dist, dist_max).amin(-1)  # [B, m]
    score = parent * density
    centres = score.sort(dim=-1, descending=True, stable=True).indices[:, :clusters]  # [B, c]
    assign = dist.gather(1, centres[..., None].expand(-1, -1, m)).argmin(1)  # [B, m] nearest centre (first on ties)
    assign.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(batch, -1))
    sums = x.new_zeros(batch, clusters, dim).scatter_add_(1, assign[..., None].expand(-1, -1, dim), x)
    sizes = torch.zeros(batch, clusters, device=x.device).scatter_add_(1, assign, torch.ones(batch, m, device=x.device))
    return centres, sums / sizes[..., None]


def sparsevlm_select(scores: torch.Tensor, hidden: torch.Tensor, keep: int, recycle: bool = True):
    """One SparseVLM cut: keep the top ``keep`` vision tokens by ``scores`` and recycle the deleted ones.

    Args:
        scores: [B, Nv] rater -> vision attention.
        hidden: [B, Nv, D] the vision tokens' hidden states leaving the scoring layer.
        keep: top-scored tokens kept, 1 <= keep <= Nv.
    Returns:
        (index [B, R] ascending into the Nv tokens: the kept ones and the recycled tokens' centres,
        centres [B, M] into the Nv tokens, merged [B, M, D] fp32 hidden states written at the centres),
        ``R = keep + M``, ``M = recycled_count(Nv - keep)`` (0 without recycling).
    """
    batch, n = scores.shape
    if not 1 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} vision tokens")
    top = topk_indices(scores, keep)
    deleted = n - keep
    if not recycle or deleted == 0:
        return top, top[:, :0], hidden.new_zeros(batch, 0, hidden.shape[-1], dtype=torch.float32)
    kept = torch.zeros(batch, n, dtype=torch.bool, device=scores.device).scatter_(1, top, True)
    ranked = scores.float().masked_fill(kept, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    candidates = ranked[:, : recycle_candidates(deleted)]  # the most relevant deleted tokens
    centres, merged = dpc_knn_merge(gather_seq(hidden, candidates), recycled_count(deleted))
    centres = candidates.gather(1, centres)
    return torch.cat([top, centres], dim=1).sort(dim=-1).values, centres, merged


@register_method
class SparseVLM(PruningMethod):
    name = "sparsevlm"
    paper = "SparseVLM (Zhang et al., ICML 2025)"
    acts_at = "decoder"
    signals = ("text_attention", "hidden_states")
    defaults = {"layers": None, "keep": None, "recycle": True}

    @classmethod
    def validate_options(cls, options) -> None:
        layers, keep = options["layers"], options["keep"]
        if layers is not None and (
            not isinstance(layers, (list, tuple)) or not layers
            or any(isinstance(k, bool) or not isinstance(k, int) for k in layers)
            or any(a >= b for a, b in zip(layers, layers[1:]))
        ):  # fmt: skip
            raise ValueError(f"sparsevlm: option layers must be a strictly ascending list of cut boundaries, "
                             f"e.g. layers=[3,7,16], got {layers!r}")  # fmt: skip
        if keep is not None and (
            not isinstance(keep, (list, tuple)) or not keep
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in keep)
        ):  # fmt: skip
            raise ValueError(f"sparsevlm: option keep must be a list of positive token counts, one per cut, "
                             f"e.g. keep=[300,200,110], got {keep!r}")  # fmt: skip
        if not isinstance(options["recycle"], bool):
            raise ValueError(f"sparsevlm: option recycle must be true or false, got {options['recycle']!r}")

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        layers, totals = resolve_stages(spec, num_vision_tokens, num_layers)
        return sparsevlm_plan(num_vision_tokens, num_layers, layers, totals)

    @property
    def decoder_layers(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.plan.stages)

    def score_layer_for(self, stage_layer: int) -> int:
        """Layer ``k-1``: the reference scores with a pruning layer's own attention and drops after it."""
        return stage_layer - 1

    def stage_keep(self, stage: int, present: int, total: int) -> int:
        """Top-scored tokens the ``stage``-th cut keeps of ``present``, so that ``total`` remain with the recycled."""
        recycle = self.options["recycle"]
        keep = self.options["keep"]
        count = min(keep[stage], present) if keep is not None else keep_for_total(present, total, recycle)
        if stage_total(present, count, recycle) != total:
            raise RuntimeError(f"sparsevlm: keeping {count} of {present} does not give the plan's {total} tokens")
        return count

    def rater_rows(self, ctx: DecoderContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The raters' rows in the current sequence: (index [B, Q], valid [B, Q])."""
        embeddings, vision, valid, origin = ctx.input_embeddings()
        raters = select_raters(embeddings, vision, valid).gather(1, origin)
        if ctx.key_valid is not None:
            raters = raters & ctx.key_valid
        index = right_pad([row.nonzero()[:, 0] for row in raters], 0)
        ok = right_pad([torch.ones(int(row.sum()), dtype=torch.bool, device=raters.device) for row in raters], False)
        return index, ok

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        plan = ctx.plan
        stage = [k for k, _ in plan.stages].index(ctx.stage_layer)
        present = ctx.vision_index.shape[1]
        total = plan.tokens_per_layer[ctx.stage_layer]
        keep = self.stage_keep(stage, present, total)
        if keep >= present:
            return torch.arange(present, device=ctx.vision_index.device).expand(ctx.vision_index.shape[0], -1)
        scores = ctx.text_attention(self.rater_rows(ctx))
        hidden = gather_seq(ctx.stage_hidden_states(), ctx.vision_index)
        index, centres, merged = sparsevlm_select(scores, hidden, keep, self.options["recycle"])
        if centres.shape[1]:
            ctx.extras["merged"] = (centres, merged)
        return index
