"""learnpruner_ext.vision_cache: the tower's output reused across methods gives exactly the uncached answers."""

import pytest
import torch

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.vision_cache import VisionCache, entry_bytes, fingerprint, same_inputs
from llava.inference import build_prompt, prepare_batch
from llava.model.builder import load_pretrained_model

QUESTIONS = ["What is shown?", "Describe the colors.", "Is there a square?"]
RUNS = [("none", None), ("learnpruner", 8), ("vispruner", 6), ("visionzip", 8), ("random", 4), ("none", None)]


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    return tokenizer, model, processor


def _answers(loaded, images, cache):
    """Logits of the first prefill and greedy tokens for every run, with ``cache`` installed (or None)."""
    tokenizer, model, processor = loaded
    batch = prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in QUESTIONS])
    model.model.set_vision_cache(cache)
    out = []
    try:
        with torch.no_grad():
            for method, budget in RUNS:
                torch.manual_seed(0)
                apply_pruning(model, PruningConfig(method=method, budget=budget))
                logits = model(**batch).logits[:, -1]
                tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
                out.append((logits, tokens))
    finally:
        model.model.set_vision_cache(None)
    return out


def test_cached_runs_equal_uncached_runs(loaded, images):
    """Six (method, budget) runs on one batch: with the cache the tower runs once (1 miss, the rest hits) and
    every logit and token is bit-identical to the uncached runs."""
    cache = VisionCache(max_bytes=2**30)
    cached, plain = _answers(loaded, images, cache), _answers(loaded, images, None)
    for (lc, tc), (lp, tp) in zip(cached, plain, strict=True):
        assert torch.equal(lc, lp) and torch.equal(tc, tp)
    # per run: one forward and one generate() prefill see the batch -> 2 x 6 lookups, 1 tower pass
    assert cache.misses == 1 and cache.hits == 2 * len(RUNS) - 1 and len(cache) == 1


def test_a_hit_needs_the_exact_input_and_the_cap_holds(loaded, images):
    """A changed pixel outside the fingerprint's sample has the same fingerprint but is a miss (exact equality
    decides); a cap below one entry stores nothing; with gradients on, the cache is bypassed."""
    tokenizer, model, processor = loaded
    pixels = prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in QUESTIONS])["pixel_values"]
    step = pixels.numel() // 8192
    other = pixels.clone()
    other.view(-1)[step + 1] += 1e-3  # between two sampled elements
    assert fingerprint(pixels) == fingerprint(other) and not same_inputs((pixels,), (other,))
    assert same_inputs((pixels, None), (pixels.clone(), None)) and not same_inputs((pixels,), (pixels.double(),))

    with torch.no_grad():
        groups = model.model.adapter.image_groups(model.model, pixels)
    size = entry_bytes(groups) + pixels.numel() * pixels.element_size()  # the groups and the stored input
    features = groups[0].features
    assert entry_bytes(groups) >= features.numel() * features.element_size()  # at least the candidates' storage

    tiny = VisionCache(max_bytes=size - 1)
    model.model.set_vision_cache(tiny)
    try:
        with torch.no_grad():
            model.model.encode_images(pixels)
            model.model.encode_images(pixels)
        assert (tiny.misses, tiny.hits, len(tiny), tiny.bytes) == (2, 0, 0, 0)
        full = VisionCache(max_bytes=size)
        model.model.set_vision_cache(full)
        model.model.encode_images(pixels)  # gradients enabled (training): not cached
        assert (full.misses, full.hits) == (0, 0)
        with torch.no_grad():
            model.model.encode_images(pixels)
            model.model.encode_images(pixels.clone())
            model.model.encode_images(other)  # same fingerprint, other values: computed, not returned
        assert (full.misses, full.hits, full.bytes, len(full)) == (2, 1, size, 1)
    finally:
        model.model.set_vision_cache(None)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        VisionCache(-1)
