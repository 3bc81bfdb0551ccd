"""Qwen2.5-VL efficiency rows (issue 17 item 7): the analytic counter against torch's FlopCounterMode on the tiny
Qwen2.5-VL (window-attention ViT, merger, M-RoPE LLM), the Qwen2.5-VL-7B rows at 1280 tokens, and the measured
path (KV cache read from the cache tensors = analytic). No timing assertions."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.flops import count_flops, qwen_vision_flops
from learnpruner_ext.tiny import save_tiny_checkpoint
from llava.eval import efficiency as eff


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("qwen_eff") / "model", family="qwen2_5_vl", seed=0))


@pytest.fixture(scope="module")
def tiny(qwen_ckpt):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(qwen_ckpt, device="cpu", dtype="float32")
    sample = eff.checkpoint_samples(model, tokenizer, processor, 1, torch.device("cpu"), torch.float32, (84, 140))[0]
    return model, sample


def _counted(model, sample) -> int:
    ids = sample.input_ids(model.config)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, **sample.vision_inputs())
    return counter.get_total_flops()


def _set_attn(model, impl):
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg._attn_implementation = impl


def test_window_sizes_by_hand():
    """A 6x10-patch image (3x5 merged) with 56 px windows (2x2 merged = 4x4 patches a side): windows of merged
    sizes 2x2, 2x2, 2x1, 1x2, 1x2, 1x1 -> 16, 16, 8, 8, 8, 4 patches. Attention per window block: 4 n^2 Dv;
    per full block: 4 * 60^2 * Dv. With Dv = 32, 4 blocks of which 2 full: 2 * 4 * 3600 * 32 + 2 * 4 * 32 *
    (256 + 256 + 64 + 64 + 64 + 16) = 921600 + 184320 = 1105920."""
    vc = dict(hidden_size=32, intermediate_size=64, depth=4, patch_size=14, spatial_merge_size=2, in_channels=3,
              temporal_patch_size=2, fullatt_block_indexes=[1, 3], window_size=56, out_hidden_size=64)  # fmt: skip
    assert qwen_vision_flops(vc, (1, 6, 10))[1] == 1105920


def test_flops_equal_flop_counter(tiny):
    """SDPA on CPU: the counter sees exactly the weight matmuls (`tflops`); eager attention adds `attn_tflops`
    (the ViT's per-image and per-window products and the LLM's S x S)."""
    model, sample = tiny
    model.model.set_pruner(None)
    grid = tuple(sample.extra["image_grid_thw"][0].tolist())
    text = sample.prefix.shape[1] + sample.suffix.shape[1]
    fl = count_flops(model.config, [sample.num_image_tokens] * 4, text, vision_grid=grid)
    assert _counted(model, sample) == round(fl.tflops * 1e12)
    _set_attn(model, "eager")
    try:
        assert _counted(model, sample) == round((fl.tflops + fl.attn_tflops) * 1e12)
    finally:
        _set_attn(model, "sdpa")


@pytest.mark.parametrize("method,budget", [("random", 6), ("fastv", 12)])
def test_pruned_flops_and_kv_equal_measured(tiny, method, budget):
    """The analytic KV cache equals the cache tensors; a vision method without scoring (random) projects only its
    R1 tokens through the merger, counted exactly (scoring methods add matmuls the counter sees and the Table-5
    convention leaves out, as on LLaVA)."""
    model, sample = tiny
    apply_pruning(model, PruningConfig(method, budget, layer=1 if method == "fastv" else None, position_mode="original"))
    text = sample.prefix.shape[1] + sample.suffix.shape[1]
    hw = sample.image_hw
    row = eff.analytic_row(model.config, method, budget, text, sample.suffix.shape[1], 4, hw,
                           layer=1 if method == "fastv" else None, position_mode="original")  # fmt: skip
    if method == "random":
        assert _counted(model, sample) == round(row["tflops"] * 1e12)
    measured = eff.run_generation(model, sample, 2, torch.device("cpu"))["kv_bytes"]
    assert measured == row["kv_cache_bytes"] and row["num_vision_tokens"] == sample.num_image_tokens == 15


def test_qwen_7b_rows():
    """Qwen2.5-VL-7B at its 1280-token input (896x1120 px = 64x80 patches): vanilla keeps 1280 tokens in all 28 LLM
    layers; LearnPruner's plans at 426/284/142 average within one token of T; FLOPs fall with the budget."""
    rows = eff.main(["--analytic", "--config-only", "qwen2.5-vl-7b", "--methods", "none,learnpruner", "--json"])
    assert [(r["method"], r["budget"]) for r in rows] == [("none", None), ("learnpruner", 426), ("learnpruner", 284),
                                                          ("learnpruner", 142)]  # fmt: skip
    assert rows[0]["num_vision_tokens"] == 1280 and rows[0]["avg_vision_tokens"] == 1280
    assert rows[1]["layer"] == 10  # k = 12/32 of 28 layers
    for r in rows[1:]:
        assert abs(r["avg_vision_tokens"] - r["budget"]) < 1
    flops = [r["tflops"] for r in rows]
    assert flops == sorted(flops, reverse=True)


def test_measured_cli_on_tiny_qwen(qwen_ckpt):
    rows = eff.main(["--model-path", qwen_ckpt, "--methods", "none,learnpruner,vispruner", "--budgets", "12,6",
                     "--image-size", "84x140", "--warmup", "0", "--reps", "1", "--max-new-tokens", "2", "--json",
                     "--position-mode", "original"])  # fmt: skip
    assert {(r["method"], r["budget"]) for r in rows} >= {("none", None), ("learnpruner", 12), ("vispruner", 6)}
    for r in rows:
        assert r["num_vision_tokens"] == 15 and r["oracle_prefill_s"] is not None
        assert r["kv_cache_mb_measured"] == pytest.approx(r["kv_cache_mb"]), (r["method"], r["budget"])
