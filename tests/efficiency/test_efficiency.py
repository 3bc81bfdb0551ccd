"""llava.eval.efficiency: analytic Table-5 numbers, KV cache read from the cache tensors, and the analytic
FLOP counter against torch's FlopCounterMode on a tiny model. No timing assertions."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.flops import count_flops, estimate_tflops, kv_cache_bytes, learnpruner_overhead_flops
from learnpruner_ext.tiny import build_tiny_model
from llava.eval import efficiency as eff

# Paper Table 5 (LLaVA-1.5-7B, 60 text tokens): (TFLOPs, KV "MB" = MiB)
TABLE5 = {("none", None): (8.6, 318.9), ("learnpruner", 128): (2.8, 95.0), ("learnpruner", 32): (1.6, 47.0)}


def _check_table5(rows):
    got = {(r["method"], r["budget"]): r for r in rows}
    assert set(TABLE5) <= set(got)
    for key, (tflops, kv) in TABLE5.items():
        assert abs(got[key]["tflops"] - tflops) <= 0.1, (key, got[key]["tflops"])
        assert abs(got[key]["kv_cache_mb"] - kv) <= 0.015 * kv, (key, got[key]["kv_cache_mb"])


def test_analytic_table5_function():
    config = eff.named_config("llava-v1.5-7b")
    rows = [eff.analytic_row(config, m, b, 60) for m, b in TABLE5]
    _check_table5(rows)
    # the rough demo helper agrees with the exact counter
    assert estimate_tflops(config, [576] * 32, 60) == pytest.approx(rows[0]["tflops"])
    # CLIP ViT-L/14-336 alone is ~0.35 TFLOPs
    vision = count_flops(config, [576] * 32, 60).vision / 1e12
    assert 0.33 < vision < 0.37


def test_analytic_cli_json_exact_command():
    cmd = [sys.executable, "-m", "llava.eval.efficiency", "--analytic", "--config-only", "llava-v1.5-7b",
           "--methods", "none,learnpruner", "--budgets", "128,32", "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = json.loads(out)
    for r in rows:
        assert {"method", "budget", "tflops", "kv_cache_mb"} <= set(r)
    _check_table5(rows)


def test_pruning_flags_reach_the_rows(capsys):
    """The generated pruning flags: --pruning-layer 8 gives Table 7a's k=8 row (R1/R2 = 129/43 at T=64, not k=12's
    111/37); --method-option budget_mode=after_layer makes FastV's T=32 feasible (R2 = T); no --layer alias."""
    base = ["--analytic", "--config-only", "llava-v1.5-7b", "--json"]
    rows = eff.main(base + ["--methods", "learnpruner", "--budgets", "64", "--pruning-layer", "8"])
    got = {r["method"]: (r["r1"], r["r2"], r["layer"]) for r in rows}
    assert got["learnpruner"] == (129, 43, 8)
    assert [r["method"] for r in eff.main(base + ["--methods", "fastv", "--budgets", "32"])] == ["none"]  # infeasible
    rows = eff.main(base + ["--methods", "fastv", "--budgets", "32", "--method-option", "budget_mode=after_layer"])
    assert [(r["method"], r["r1"], r["r2"]) for r in rows if r["method"] == "fastv"] == [("fastv", 576, 32)]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        eff.main(base + ["--layer", "8"])
    assert "unrecognized arguments: --layer 8" in capsys.readouterr().err


def test_analytic_every_registered_method():
    from learnpruner_ext.methods import available_methods

    config = eff.named_config("llava-v1.5-7b")
    pairs = eff.method_budgets(available_methods(), [192, 128, 64], config)
    rows = [eff.analytic_row(config, m, b, 60) for m, b in pairs]
    assert len(rows) >= len(available_methods())
    vanilla = eff.analytic_row(config, "none", None, 60)
    for r in rows:
        assert 0 < r["tflops"] <= vanilla["tflops"] + 1e-9
        assert 0 < r["kv_cache_mb"] <= vanilla["kv_cache_mb"] + 1e-9


@pytest.fixture(scope="module")
def tiny():
    model, _, _ = build_tiny_model(seed=0, text_layers=8, image_size=56, patch_size=14)
    sample = eff.synthetic_samples(model.config, 1, 24, torch.device("cpu"), torch.float32)[0]
    return model.eval(), sample


def _prefill(model, sample):
    ids = sample.input_ids(model.config)
    cache = DynamicCache(config=model.config.text_config)
    with torch.inference_mode():
        model(input_ids=ids, pixel_values=sample.pixel_values, attention_mask=torch.ones_like(ids),
              past_key_values=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
    return cache


def _counted(model, sample) -> int:
    with FlopCounterMode(display=False) as counter:
        _prefill(model, sample)
    return counter.get_total_flops()


def _set_attn(model, impl):
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg._attn_implementation = impl


@pytest.mark.parametrize("method,budget", [("none", None), ("learnpruner", 8), ("learnpruner", 4)])
def test_kv_cache_matches_cache_tensors(tiny, method, budget):
    model, sample = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_pruning(model, PruningConfig(method, budget))
    with torch.inference_mode():
        r = eff.run_generation(model, sample, 2, torch.device("cpu"))
    cache = _prefill(model, sample)
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert r["kv_bytes"] == nbytes
    text = sample.prefix.shape[1] + sample.suffix.shape[1]
    assert nbytes == kv_cache_bytes(model.config, model.pruner.plan.tokens_per_layer, text, bytes_per_value=4)


def test_flops_none_equal_flop_counter(tiny):
    model, sample = tiny
    model.model.set_pruner(None)
    text = sample.prefix.shape[1] + sample.suffix.shape[1]
    fl = count_flops(model.config, [model.num_vision_tokens] * 8, text)
    assert _counted(model, sample) == round(fl.tflops * 1e12)  # SDPA on CPU: attention products not counted
    _set_attn(model, "eager")
    try:
        assert _counted(model, sample) == round((fl.tflops + fl.attn_tflops) * 1e12)
    finally:
        _set_attn(model, "sdpa")


@pytest.mark.parametrize("budget", [8, 4])
def test_flops_learnpruner_match_flop_counter(tiny, budget):
    model, sample = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = apply_pruning(model, PruningConfig("learnpruner", budget))
    text = sample.prefix.shape[1] + sample.suffix.shape[1]
    overhead = learnpruner_overhead_flops(model.config, method.plan, text, sample.suffix.shape[1])
    assert overhead > 0 and method.overhead_flops(model.config, text, sample.suffix.shape[1]) == overhead
    fl = count_flops(model.config, method.plan.tokens_per_layer, text, overhead=overhead)
    counted = _counted(model, sample)
    # exact with the scoring overhead included; the model-only figure (Table 5 convention) is within 10%
    assert counted == round((fl.tflops + fl.overhead_tflops) * 1e12)
    assert abs(counted - fl.tflops * 1e12) <= 0.10 * counted
    row = eff.analytic_row(model.config, "learnpruner", budget, text, sample.suffix.shape[1])
    assert row["tflops"] == pytest.approx(fl.tflops) and row["overhead_tflops"] == pytest.approx(fl.overhead_tflops)


def test_measured_cli_on_tiny_checkpoint(tiny_hf, capsys):
    rows = eff.main(["--model-path", str(tiny_hf), "--methods", "none,learnpruner,fastv", "--budgets", "8,4",
                     "--warmup", "0", "--reps", "1", "--max-new-tokens", "3", "--json"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["budget"]) for r in printed] == [(r["method"], r["budget"]) for r in rows]
    assert ("fastv", 4) not in {(r["method"], r["budget"]) for r in rows}  # infeasible budget skipped
    for r in rows:
        for key in ("tflops", "kv_cache_mb", "prefill_s", "oracle_prefill_s", "total_s", "decode_ms_per_token", "peak_mem_mb"):
            assert r[key] is not None and r[key] >= 0, key
        assert r["kv_cache_mb_measured"] == pytest.approx(r["kv_cache_mb"])
        assert 0 < r["min_cpu_share"] <= 1.5, r["min_cpu_share"]  # process CPU time / (wall x threads), on CPU
        if r["method"] == "none":  # vanilla is its own oracle: one run, not two
            assert r["oracle_runs_s"] == r["prefill_runs_s"]
        if r["method"] != "none":
            assert "breakdown" in r
        if r["method"] == "learnpruner":  # every section timed by the core's hooks (no wrapper can go stale)
            parts = ("vision_tower_s", "lpm_s", "diversity_s", "projector_s", "stage2_scoring_s", "slicing_cache_s")
            assert all(r["breakdown"][k] > 0 for k in parts), r["breakdown"]


@pytest.mark.parametrize("method,budget", [("learnpruner", 8), ("fastv", 8), ("visionzip", 4)])
def test_oracle_fixed_indices_same_counts(tiny, method, budget):
    """The efficiency oracle keeps the method's counts in every layer with the first indices: slots 0..R1-1 enter
    the LLM and the first R2 of them stay from layer k on (so pruned - oracle = scoring and selection only)."""
    from learnpruner_ext.methods.oracle import FixedIndexOracle

    model, sample = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = apply_pruning(model, PruningConfig(method, budget))
    eff.run_generation(model, sample, 1, torch.device("cpu"))
    real_trace = model.last_pruning_trace()
    model.model.set_pruner(FixedIndexOracle(real))
    try:
        eff.run_generation(model, sample, 1, torch.device("cpu"))
        trace = model.last_pruning_trace()
    finally:
        model.model.set_pruner(None)
    plan = real.plan
    assert trace.vision_tokens_per_sample == real_trace.vision_tokens_per_sample == [plan.tokens_per_layer]
    assert trace.stage1_index[0].tolist() == list(range(plan.r1))
    if plan.layer is not None:
        assert trace.stage2_index[0].tolist() == list(range(plan.r2))


def test_cpu_share_and_starved_warning(capsys):
    """cpu_share = CPU seconds / (wall seconds x torch threads): 3 CPU-s in 2 s on 2 threads = 0.75 (a quarter of the
    cores went to other processes); None on GPU; a row's min_cpu_share is its lowest timed run's."""
    import torch

    threads = torch.get_num_threads()
    assert eff.cpu_share(1.5 * threads, 2.0, torch.device("cpu")) == pytest.approx(0.75)
    assert eff.cpu_share(1.0, 1.0, torch.device("cuda")) is None
    assert eff._min_share([{"prefill_cpu_share": 0.9}, {"prefill_cpu_share": 0.6}, {}]) == 0.6
