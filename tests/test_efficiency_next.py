"""LLaVA-NeXT (llava-v1.6-vicuna-7b) analytic efficiency rows against the paper's Table 5 (issue 16 item 5)."""

import json
import subprocess
import sys
import types

import pytest

from learnpruner_ext.config import PruningConfig, candidate_plan, image_budget
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from learnpruner_ext.flops import anyres_layout, anyres_num_vision_tokens, count_flops
from llava.eval import efficiency as eff

# Paper Table 5, LLaVA-NeXT-7b rows: budget -> (TFLOPs, KV cache "MB" = MiB)
TABLE5_NEXT = {None: (31.9, 1156.1), 640: (11.4, 369.4), 160: (5.2, 129.4)}
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def config():
    return eff.named_config("llava-v1.6-vicuna-7b")


def _transformers_count(height, width):
    """transformers' own formula: LlavaNextProcessor._get_number_of_features, minus the [CLS] the
    ``default`` feature strategy drops (what the processor inserts as image tokens)."""
    proc = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=eff.NEXT_GRID_PINPOINTS),
        patch_size=14, num_additional_image_tokens=1,
    )  # fmt: skip
    proc._get_unpadded_features = types.MethodType(LlavaNextProcessor._get_unpadded_features, proc)
    return LlavaNextProcessor._get_number_of_features(proc, height, width, 336, 336) - 1


def test_anyres_count_by_hand(config):
    """427x640 (H x W): best pinpoint 672x672 (scale min(672/640, 672/427) = 1.05 -> 448x672 effective, the
    largest; no other pinpoint reaches it) -> 2x2 grid, 48x48 feature map. The image is wider (640/427 = 1.499
    > 1): new height round(427 * 48/640) = 32, padding (48-32)//2 = 8 rows each side -> 32 x 48 = 1536
    features + 32 newlines; base crop 576. N = 576 + 1536 + 32 = 2144, tower runs on 1 + 4 = 5 crops.
    480x640: new height 36 -> 576 + 36*48 + 36 = 2340. 336x336: best pinpoint 336x672 (scale 1, no
    upscaling; fewest wasted pixels) -> 1x2 grid 24x48, width padded to 24 -> 576 + 24*24 + 24 = 1176."""
    assert anyres_num_vision_tokens(config, 427, 640) == (2144, 5)
    assert anyres_num_vision_tokens(config, 480, 640) == (2340, 5)
    assert anyres_num_vision_tokens(config, 336, 336) == (1176, 3)
    for hw in [(427, 640), (480, 640), (640, 480), (336, 336), (1000, 300), (300, 1000), (672, 672)]:
        assert anyres_num_vision_tokens(config, *hw)[0] == _transformers_count(*hw), hw


def test_reference_and_per_image_budget(config):
    assert eff.reference_tokens(config) == 2880  # (1 base + 2x2 grid) x 576
    assert eff.reference_tokens(eff.named_config("llava-v1.5-7b")) == 576
    assert image_budget(2880, 2144, 2880, "scaled") == 2144  # T = N keeps everything
    assert image_budget(640, 2144, 2880, "scaled") == 476  # round(640 * 2144 / 2880) = round(476.4)
    assert image_budget(640, 2144, 2880, "absolute") == 640
    assert image_budget(2880, 2144, 2880, "absolute") == 2144
    assert image_budget(None, 2144, 2880, "scaled") is None
    with pytest.raises(ValueError, match="budget_scope"):
        image_budget(640, 2144, 2880, "relative")


def test_vision_tower_runs_on_every_crop(config):
    one = count_flops(config, [2144] * 32, 99).vision
    assert count_flops(config, [2144] * 32, 99, vision_crops=5).vision == pytest.approx(5 * one)


def test_next_rows_within_5pct_of_paper(config):
    rows = {b: eff.analytic_row(config, "none" if b is None else "learnpruner", b, eff.NEXT_DEFAULT_TEXT_TOKENS,
                                budget_scope=PruningConfig.budget_scope) for b in TABLE5_NEXT}  # fmt: skip
    for b, (tflops, kv) in TABLE5_NEXT.items():
        assert rows[b]["tflops"] == pytest.approx(tflops, rel=TOLERANCE), (b, rows[b]["tflops"])
        assert rows[b]["kv_cache_mb"] == pytest.approx(kv, rel=TOLERANCE), (b, rows[b]["kv_cache_mb"])
    assert rows[None]["num_vision_tokens"] == 2144 and rows[None]["vision_crops"] == 5
    # vanilla KV by hand: (2144 + 99) tokens x 32 layers x 2 (K,V) x 4096 x 2 bytes = 1121.5 MiB
    assert rows[None]["kv_cache_mb"] == pytest.approx(2243 * 32 * 2 * 4096 * 2 / 2**20)
    # the scaled scope keeps T * N_i / 2880 tokens: far below the paper's pruned rows (why the default is absolute)
    scaled = eff.analytic_row(config, "learnpruner", 640, eff.NEXT_DEFAULT_TEXT_TOKENS, budget_scope="scaled")
    assert scaled["image_budget"] == 476 and scaled["kv_cache_mb"] < (1 - TOLERANCE) * TABLE5_NEXT[640][1]


def test_bare_cli_reproduces_paper():
    out = subprocess.run([sys.executable, "-m", "llava.eval.efficiency", "--analytic", "--config-only",
                          "llava-v1.6-vicuna-7b", "--json"], capture_output=True, text=True, check=True)  # fmt: skip
    rows = {r["budget"]: r for r in json.loads(out.stdout)}
    assert set(rows) == set(TABLE5_NEXT)
    for b, (tflops, kv) in TABLE5_NEXT.items():
        assert abs(rows[b]["tflops"] / tflops - 1) <= TOLERANCE and abs(rows[b]["kv_cache_mb"] / kv - 1) <= TOLERANCE


def test_cli_image_size_and_bad_input():
    rows = eff.main(["--analytic", "--config-only", "llava-v1.6-vicuna-7b", "--image-size", "480x640", "--json"])
    assert rows[0]["num_vision_tokens"] == 2340
    with pytest.raises(SystemExit, match="HEIGHTxWIDTH"):
        eff.main(["--analytic", "--config-only", "llava-v1.6-vicuna-7b", "--image-size", "640"])


# -- measured rows on a tiny NeXT (real processor, anyres crops); no timing assertions ------------------------
@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory):
    from learnpruner_ext.tiny import save_tiny_checkpoint

    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("next_eff") / "model", family="llava_next", seed=0))


def test_measured_cli_on_tiny_next(next_ckpt):
    """A 48x64 noise image through the NeXT processor: the measured KV cache equals the analytic count of that
    image's N_i and plan, every row has an oracle, and the header names the image."""
    rows = eff.main(["--model-path", next_ckpt, "--methods", "none,learnpruner,fastv", "--budgets", "40,20",
                     "--image-size", "48x64", "--warmup", "0", "--reps", "1", "--max-new-tokens", "2", "--json",
                     "--pruning-layer", "1"])  # fmt: skip
    got = {(r["method"], r["budget"]) for r in rows}
    assert {("none", None), ("learnpruner", 40), ("learnpruner", 20)} <= got
    n_i = rows[0]["num_vision_tokens"]
    assert n_i < rows[0]["r1"] + 1 and rows[0]["r1"] == n_i  # vanilla keeps the image's N_i, not the reference N
    for r in rows:
        assert r["num_vision_tokens"] == n_i and r["oracle_prefill_s"] is not None
        assert r["kv_cache_mb_measured"] == pytest.approx(r["kv_cache_mb"]), (r["method"], r["budget"])


def test_oracle_keeps_the_methods_counts(next_ckpt):
    """FixedIndexOracle on NeXT: the wrapped method's per-layer counts of this image (trace = plan, both stages)."""
    import torch

    from learnpruner_ext import PruningConfig, apply_pruning
    from learnpruner_ext.methods.oracle import FixedIndexOracle
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(next_ckpt, device="cpu")
    sample = eff.checkpoint_samples(model, tokenizer, processor, 1, torch.device("cpu"), torch.float32, (48, 64))[0]
    for method in ("learnpruner", "fastv"):
        real = apply_pruning(model, PruningConfig(method, 24, layer=1))
        eff.run_generation(model, sample, 1, torch.device("cpu"))
        real_trace = model.last_pruning_trace()
        model.model.set_pruner(FixedIndexOracle(real))
        eff.run_generation(model, sample, 1, torch.device("cpu"))
        trace = model.last_pruning_trace()
        n_i, _, newlines = anyres_layout(model.config, 48, 64)  # R1 capped at the M_i = N_i - newlines candidates
        plan = candidate_plan(real.plan_for(n_i), n_i - newlines)
        assert sample.num_image_tokens == n_i and trace.image_plans == [{"r1": plan.r1, "r2": plan.r2}]
        assert trace.vision_tokens_per_sample == real_trace.vision_tokens_per_sample == [plan.tokens_per_layer]


def test_config_only_path_on_a_tiny_next_config():
    """The ``--config-only llava-v1.6-*`` timing path (random bf16-style construction, synthetic anyres crops) on
    the tiny NeXT geometry: the synthetic sample has the processor's N_i and crop count for its size, and the
    measured KV cache equals the analytic one, vanilla and pruned."""
    import torch

    from learnpruner_ext import PruningConfig, apply_pruning
    from learnpruner_ext.tiny import build_sp_tokenizer, tiny_next_config

    config = tiny_next_config(build_sp_tokenizer())
    model = eff.build_random_model(config, torch.device("cpu"), torch.float32)
    sample = eff.synthetic_samples(config, 1, 30, torch.device("cpu"), torch.float32, image_hw=(48, 64))[0]
    n_i, crops = anyres_num_vision_tokens(config, 48, 64)
    assert sample.num_image_tokens == n_i and sample.pixel_values.shape[:2] == (1, crops)
    assert model.image_token_counts(sample.extra["image_sizes"], 1) == [n_i]
    for method, budget in (("none", None), ("learnpruner", 24)):
        if budget is None:
            model.model.set_pruner(None)
        else:
            apply_pruning(model, PruningConfig(method, budget, layer=1))
        measured = eff.run_generation(model, sample, 2, torch.device("cpu"))["kv_bytes"]
        row = eff.analytic_row(config, method, budget, 30, bytes_per_value=4, image_hw=(48, 64), layer=1)
        assert measured == row["kv_cache_bytes"], (method, measured, row["kv_cache_bytes"])
