"""CI-sized run of scripts/toy/train_all.sh: generate -> vision pretrain -> base (full mode) -> LPM -> sweep -> table.

Small data and a few optimiser steps per stage (SMOKE_STEPS); asserts file formats and the table's shape,
not accuracy. About 2 minutes on 2 CPU cores (most of it model loading and DeepSpeed start-up).
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toyworld.report import TYPES

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["none", "learnpruner", "vispruner", "fastv", "visionzip", "divprune", "dart", "random", "cls", "downsample", "pyramiddrop"]
BUDGETS = [32, 16, 8]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy_pipeline")
    env = dict(os.environ, OUT_MODEL=str(tmp / "model"), DATA_ROOT=str(tmp / "data"), WORK=str(tmp / "work"),
               NUM_TRAIN="24", NUM_TEST="28", SMOKE_STEPS="2", PYTHON=sys.executable, MASTER_PORT="29533")
    proc = subprocess.run(["bash", str(ROOT / "scripts/toy/train_all.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc.stdout


def test_data_and_checkpoints(run):
    tmp, _ = run
    data = tmp / "data" / "toy"
    for name in ("train.json", "train_scenes.jsonl", "test_questions.jsonl", "test_answers.jsonl", "meta.json"):
        assert (data / name).is_file(), name
    assert len(json.loads((data / "train.json").read_text())) == 24
    model = tmp / "model"
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "preprocessor_config.json",
                 "train_full.json", "lpm/lpm.safetensors", "lpm/lpm_config.json"):
        assert (model / name).is_file(), name
    lpm = json.loads((model / "lpm" / "lpm_config.json").read_text())
    assert lpm["trained"] is True and lpm["prune_loss_weight"] == 1.0 and lpm["prune_target_ratio"] == 0.0
    config = json.loads((model / "config.json").read_text())
    assert config["vision_config"]["image_size"] // config["vision_config"]["patch_size"] == 12  # 144 tokens


def test_answers_and_results(run):
    tmp, _ = run
    sweep = tmp / "work" / "sweep"
    results = json.loads((sweep / "results.json").read_text())
    assert results["num_vision_tokens"] == 144 and results["benchmarks"] == ["toy"]
    rows = {(r["method"], r["budget"]): r for r in results["rows"]}
    assert set(rows) == {("none", None)} | {(m, b) for m in METHODS[1:] for b in BUDGETS}
    for (method, budget), r in rows.items():
        assert r["status"] in ("ok", "infeasible"), r
        if r["status"] == "ok":
            assert set(r["extra"]["by_type"]) <= set(TYPES)
            answers = [json.loads(line) for line in open(r["answers_file"])]
            assert len(answers) == 28
            assert {"question_id", "prompt", "text", "vision_tokens_per_layer"} <= set(answers[0])
    # 4 LLM layers, K=2: FastV/DART need T >= ceil((2*144 + 2) / 4) = 73 under the average convention
    assert all(rows[(m, b)]["status"] == "infeasible" for m in ("fastv", "dart") for b in BUDGETS)
    assert all(rows[(m, b)]["status"] == "ok" for m in ("learnpruner", "vispruner", "random") for b in BUDGETS)
    with open(sweep / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_table_and_figures(run):
    tmp, stdout = run
    sweep = tmp / "work" / "sweep"
    table = (sweep / "table_toy.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| Method"))
    assert header.split("|")[1:-1] == [f" {c} " for c in ["Method", "Avg. tokens", *TYPES, "Overall", "RelAcc.",
                                                            "Loyalty", "R→W", "W→R"]]  # fmt: skip
    width = len(header.split("|"))
    body = [line for line in table if line.startswith("| ") and not line.startswith("| Method")]
    assert all(len(line.split("|")) == width for line in body)
    labels = [line.split("|")[1].strip() for line in body]
    assert labels.count("*Upper Bound, 144 Tokens (100%)*") == 1
    for b in BUDGETS:
        assert any(label.startswith(f"*Retain Averaged {b} Tokens") for label in labels)
    assert labels.count("learnpruner") == 3 and labels.count("fastv (after_layer)") == 3
    vanilla = next(line for line in body if line.split("|")[1].strip() == "Vanilla (none)")
    assert [c.strip() for c in vanilla.split("|")[-4:-1]] == ["100.0", "0.0", "0.0"]  # loyal to itself
    verdicts = [line for line in table if line.startswith("- T=") and "beat" in line]
    paired = [line for line in table if line.startswith("- T=") and "paired-bootstrap" in line]
    assert len(verdicts) == 3 and len(paired) == 3  # per budget: the verdict and LearnPruner's paired differences
    for line in paired:  # one difference per feasible baseline
        parts = line.split("CI]: ", 1)[1].split("; ")
        assert [p.split(" ")[0] for p in parts] == ["vispruner", "visionzip", "divprune", "random", "cls", "downsample"], line
    for name in ("accuracy_vs_budget.png", "accuracy_by_type.png", "kept_patches.png"):
        assert (sweep / name).stat().st_size > 1000, name
    assert "done:" in stdout


def test_vision_probe_on_the_pretrained_tower(run):
    from toyworld.probe_vision import PROBED, probe

    tmp, _ = run
    result = probe(str(tmp / "work" / "init"), str(tmp / "data" / "toy"), train_images=24, steps=3)
    assert result["train_images"] == 24 and result["test_images"] == 28
    acc = result["accuracy"]
    for name in PROBED:
        assert 0.0 <= acc[name] <= 100.0 and 0.0 <= acc[name + "@obj"] <= 100.0
        assert acc[name + "@obj_n"] > 0
