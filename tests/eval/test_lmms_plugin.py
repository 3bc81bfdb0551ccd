"""The lmms-eval plugin (``llava.eval.lmms``) through the real ``lmms-eval`` CLI, against the native eval scripts.

Data: ``toyworld.generate --seed 0 --num-test 40`` (40 questions; 12 existence questions exported as POPE), saved with
``datasets.save_to_disk`` and read by task files with ``dataset_kwargs: {load_from_disk: true}``: ``toy_vqa`` (our
task, scored as ``llava.eval.eval_toy``) and ``toy_pope`` (lmms-eval's own ``pope.yaml``, only the data swapped).
Model: the shipped toy model (``checkpoints/toy-llava``) with LearnPruner at T = 8 and its shipped LPM.

Native reference on the same items: ``llava.eval.model_vqa_loader`` (greedy, ``vicuna_v1``) scored by
``llava.eval.eval_toy`` / ``llava.eval.eval_pope``. Pass criteria: the same answer text for every question, equal
scores, and per-sample logs carrying the native answer lines' accounting (R1, R2, vision tokens per layer; by the
budget rule of LearnPruner's §3 their average is T). lmms-eval's ``pope_yes_ratio`` is not compared: it counts
ground-truth "yes" labels, the native scorer counts predicted ones.

Skipped only when lmms-eval is not installed (``EXTRAS=...,lmms bash scripts/setup_env.sh``).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional extra: EXTRAS=lmms bash scripts/setup_env.sh)")

ROOT = Path(__file__).resolve().parents[2]
TOY_MODEL = ROOT / "checkpoints" / "toy-llava"
BUDGET = 8  # small enough that the toy model errs on both tasks (T = 64 answers every POPE item right)
NUM_TEST = 40
MODEL_ARGS = (f"pretrained={TOY_MODEL},pruning_method=learnpruner,visual_token_budget={BUDGET},"
              f"lpm_path={TOY_MODEL / 'lpm'},device=cpu")  # fmt: skip
TIMEOUT_S = 300


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(toy world folder, lmms-eval include path with the two tasks)."""
    from llava.eval.lmms.toy_task import build

    base = tmp_path_factory.mktemp("lmms")
    subprocess.run([sys.executable, "-m", "toyworld.generate", "--out", str(base / "toy"), "--seed", "0",
                    "--num-train", "1", "--num-test", str(NUM_TEST)], cwd=ROOT, check=True, env=_env(),
                   capture_output=True)  # fmt: skip
    return base / "toy", build(base / "toy", base / "tasks")


@pytest.fixture(scope="module")
def native(toy, tmp_path_factory):
    """The native generator's answer lines and scores: {"toy": (lines, eval_toy metrics), "pope": (lines, ...)}."""
    from llava.eval import eval_pope, eval_toy, model_vqa_loader
    from llava.eval._io import read_answers, read_jsonl

    toy_dir, _ = toy
    out = tmp_path_factory.mktemp("native")
    common = ["--model-path", str(TOY_MODEL), "--temperature", "0", "--conv-mode", "vicuna_v1", "--batch-size", "8",
              "--device", "cpu", "--no-progress", "--pruning-method", "learnpruner", "--visual-token-budget",
              str(BUDGET), "--lpm-path", str(TOY_MODEL / "lpm")]  # fmt: skip
    runs = {}
    for name, questions in (("toy", "test_questions.jsonl"), ("pope", "llava_pope_test.jsonl")):
        answers = out / f"{name}.jsonl"
        model_vqa_loader.main(common + ["--question-file", str(toy_dir / questions), "--image-folder",
                                        str(toy_dir / "images"), "--answers-file", str(answers)])  # fmt: skip
        runs[name] = read_answers(str(answers))
    key = read_jsonl(str(toy_dir / "test_answers.jsonl"), "toy answer key", required=("question_id", "answer", "type"))
    pope_questions = {str(q["question_id"]): q for q in read_jsonl(str(toy_dir / "llava_pope_test.jsonl"), "questions")}
    pope_labels = eval_pope.load_labels(str(toy_dir / "pope"), eval_pope.CATEGORIES)
    labels = [pope_labels[pope_questions[str(r["question_id"])]["category"]][
        (pope_questions[str(r["question_id"])]["image"], eval_pope._qtext(r["prompt"]))] for r in runs["pope"]]
    pope_all = eval_pope.confusion_metrics([eval_pope.parse_yes_no(r["text"]) for r in runs["pope"]], labels)
    return {"toy": (runs["toy"], eval_toy.score_toy(runs["toy"], key)), "pope": (runs["pope"], pope_all)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lmms_eval(include_path: Path, out: Path, processes: int, batch_size: int) -> dict:
    """Run the lmms-eval CLI (under ``accelerate launch`` for several processes) -> {"results", "samples"}."""
    lmms = ["--model", "learnpruner_llava", "--model_args", MODEL_ARGS, "--tasks", "toy_vqa,toy_pope",
            "--include_path", str(include_path), "--batch_size", str(batch_size), "--log_samples",
            "--output_path", str(out)]  # fmt: skip
    if processes == 1:
        cmd, env = [sys.executable, "-m", "lmms_eval", *lmms], _env()
    else:  # data parallel on CPU: accelerate's multi-process launcher, gloo (ACCELERATE_USE_CPU)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "-m", "lmms_eval", *lmms]  # fmt: skip
        env = {**_env(), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results] = glob.glob(str(out / "*" / "*_results.json"))
    samples = {}
    for task in ("toy_vqa", "toy_pope"):
        [path] = glob.glob(str(out / "*" / f"*_samples_{task}.jsonl"))
        samples[task] = [json.loads(line) for line in open(path, encoding="utf-8")]
    return {"results": json.load(open(results))["results"], "samples": samples}


@pytest.fixture(scope="module")
def lmms_single(toy, tmp_path_factory):
    return _lmms_eval(toy[1], tmp_path_factory.mktemp("lmms_out1"), processes=1, batch_size=8)


@pytest.fixture(scope="module")
def lmms_two(toy, tmp_path_factory):
    return _lmms_eval(toy[1], tmp_path_factory.mktemp("lmms_out2"), processes=2, batch_size=3)


def _answers_by_id(samples: list[dict], metric: str) -> dict[str, str]:
    return {str(s[metric]["question_id"]): s["filtered_resps"] for s in samples}


def test_toy_vqa_equals_native(lmms_single, native):
    lines, metrics = native["toy"]
    samples = lmms_single["samples"]["toy_vqa"]
    assert len(samples) == NUM_TEST
    assert _answers_by_id(samples, "toy_accuracy") == {str(r["question_id"]): r["text"] for r in lines}
    assert lmms_single["results"]["toy_vqa"]["toy_accuracy,none"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert 0 < metrics["accuracy"] < 100  # the toy model gets some wrong: equal scores are not both trivially 100


def test_lmms_own_pope_task_equals_native(lmms_single, native):
    lines, metrics = native["pope"]
    samples = lmms_single["samples"]["toy_pope"]
    assert len(samples) == len(lines) > 0
    assert _answers_by_id(samples, "pope_accuracy") == {str(r["question_id"]): r["text"] for r in lines}
    got = lmms_single["results"]["toy_pope"]
    for ours, theirs in (("accuracy", "pope_accuracy"), ("precision", "pope_precision"), ("recall", "pope_recall"),
                         ("f1", "pope_f1_score")):  # fmt: skip
        assert got[f"{theirs},none"] == pytest.approx(metrics[ours], abs=1e-9), ours
    assert 0 < metrics["accuracy"] < 1  # not trivially perfect


def test_per_sample_logs_carry_the_pruning_trace(lmms_single, native):
    """Each logged sample has the native answer line's accounting; the average over layers is the budget T."""
    native_lines = {str(r["question_id"]): r for r in native["toy"][0]}
    for s in lmms_single["samples"]["toy_vqa"]:
        trace = s["token_counts"][0]["pruning"]
        line = native_lines[str(s["toy_accuracy"]["question_id"])]
        for field in ("method", "budget", "r1", "r2", "layer", "image_tokens", "vision_tokens_per_layer"):
            assert trace[field] == line[field], field
        assert trace["method"] == "learnpruner" and trace["r1"] > trace["r2"]
        assert trace["average_vision_tokens"] == pytest.approx(BUDGET)
        assert (trace["rank"], trace["world_size"]) == (0, 1)


def test_two_processes_split_the_work_and_match(lmms_two, lmms_single):
    """``accelerate launch --num_processes 2``: each rank answers a share, the gathered results are the single run's."""
    assert lmms_two["results"] == lmms_single["results"]
    for task, metric in (("toy_vqa", "toy_accuracy"), ("toy_pope", "pope_accuracy")):
        two, one = lmms_two["samples"][task], lmms_single["samples"][task]
        assert sorted(s["doc_id"] for s in two) == sorted(s["doc_id"] for s in one)  # every doc once
        assert _answers_by_id(two, metric) == _answers_by_id(one, metric)
        ranks = [s["token_counts"][0]["pruning"]["rank"] for s in two]
        assert {s["token_counts"][0]["pruning"]["world_size"] for s in two} == {2}
        assert sorted(set(ranks)) == [0, 1] and abs(ranks.count(0) - ranks.count(1)) <= 1, ranks


# ---------------------------------------------------------------------------------------------- model_args
def test_every_pruning_config_field_is_a_model_arg():
    """The option names are the toolkit CLI flags' names, one per ``PruningConfig`` field, and all reach the config."""
    from dataclasses import fields

    from learnpruner_ext import PruningConfig
    from llava.eval.lmms.model import pruning_config_from_model_args, pruning_option_names

    flags = {f.metadata["flag"].lstrip("-").replace("-", "_") for f in fields(PruningConfig)}
    assert set(pruning_option_names()) == flags
    got = pruning_config_from_model_args({
        "pruning_method": "vispruner", "visual_token_budget": 32, "budget_scope": "scaled", "pruning_layer": 1,
        "pruning_ratio": 2, "diversity_ratio": 0.25, "position_mode": "original", "lpm_path": "some/lpm",
        "pruning_seed": 7, "method_option": "important_ratio=0.5;name=x"})  # as lmms-eval parses --model_args
    assert got == PruningConfig(method="vispruner", budget=32, budget_scope="scaled", layer=1, ratio=2.0,
                                diversity=0.25, position_mode="original", lpm_path="some/lpm", seed=7,
                                options={"important_ratio": 0.5, "name": "x"})  # fmt: skip
    assert pruning_config_from_model_args({}) == PruningConfig()


@pytest.mark.parametrize("options, message", [
    ({"visual_token_budgt": 64}, "unknown --model_args option(s) ['visual_token_budgt']"),
    ({"position_mode": "shuffled"}, "invalid choice: 'shuffled'"),
    ({"pruning_method": "nosuch"}, "unknown --pruning-method 'nosuch'"),
])  # fmt: skip
def test_bad_model_args_are_refused(options, message):
    from llava.eval.lmms.model import pruning_config_from_model_args

    with pytest.raises(ValueError) as err:
        pruning_config_from_model_args(options)
    assert message in str(err.value)


def test_registered_through_the_entry_point_and_loglikelihood_refused():
    from lmms_eval.models import get_model

    cls = get_model("learnpruner_llava")
    assert cls.__module__ == "llava.eval.lmms.model"
    model = cls(pretrained=str(TOY_MODEL), device="cpu")
    assert model.conv_mode == "vicuna_v1" and model.batch_size == 1
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        model.loglikelihood([])
