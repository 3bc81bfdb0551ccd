"""The eight LLaVA-1.5 benchmarks: data layout, answer generator, scorer and headline metric.

Used by the sweep (``llava.eval.sweep``); ``scripts/v1_5/eval/<name>.sh`` run the same generator and
scorer commands with the same paths. Paths are relative to the eval root (default
``playground/data/eval``, upstream LLaVA's layout; see docs/evaluation.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Benchmark:
    name: str  # CLI / script name
    title: str  # table column
    folder: str  # under the eval root
    split: str  # answers/<split>/<run>/
    generator: str  # llava.eval.<generator>
    question_file: str  # relative to the folder
    image_folder: str | None  # relative to the folder
    generator_args: tuple[str, ...]
    scorer: str  # llava.eval.<scorer>
    scorer_args: Callable[[str, str, str, str], list[str]]  # (bench dir, result file, run dir, run name) -> argv
    metric: str  # key of the headline number in the scorer's metrics
    metric_label: str
    required: tuple[str, ...] = field(default=())  # further files the scorer needs, relative to the folder

    def dir(self, eval_root: str) -> str:
        return os.path.join(eval_root, self.folder)

    def generator_argv(self, eval_root: str) -> list[str]:
        d = self.dir(eval_root)
        argv = ["--question-file", os.path.join(d, self.question_file)]
        if self.image_folder is not None:
            argv += ["--image-folder", os.path.join(d, self.image_folder)]
        return argv + list(self.generator_args)

    def missing_files(self, eval_root: str) -> list[str]:
        d = self.dir(eval_root)
        paths = [os.path.join(d, self.question_file)] + [os.path.join(d, p) for p in self.required]
        if self.image_folder is not None:
            paths.append(os.path.join(d, self.image_folder))
        return [p for p in paths if not os.path.exists(p)]

    def headline(self, metrics: dict) -> float | None:
        value = metrics.get(self.metric)
        return float(value) if isinstance(value, (int, float)) else None


def _vqav2_scorer_args(d, result, run_dir, run, annotation=None):
    full = os.path.join(d, "llava_vqav2_mscoco_test2015.jsonl")
    argv = ["--question-file", full if os.path.isfile(full) else os.path.join(d, "llava_vqav2_mscoco_test-dev2015.jsonl"),
            "--result-file", result,
            "--submission-out", os.path.join(d, "answers_upload", "llava_vqav2_mscoco_test-dev2015", run + ".json")]  # fmt: skip
    return argv + (["--annotation-file", annotation] if annotation else [])


def _mmbench(name, title, folder, split, lang):
    return Benchmark(
        name, title, folder, split, "model_vqa_mmbench", f"{split}.tsv", None,
        ("--single-pred-prompt",) + (("--lang", "cn") if lang == "cn" else ()),
        "eval_mmbench",
        lambda d, result, run_dir, run: ["--annotation-file", os.path.join(d, f"{split}.tsv"), "--result-file", result,
                                         "--upload-dir", os.path.join(d, "answers_upload", split), "--experiment", run],
        "accuracy", "accuracy",
    )  # fmt: skip


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            "gqa", "GQA", "gqa", "llava_gqa_testdev_balanced", "model_vqa_loader", "llava_gqa_testdev_balanced.jsonl",
            "data/images", (), "eval_gqa",
            lambda d, result, run_dir, run: ["--question-file", os.path.join(d, "data/testdev_balanced_questions.json"),
                                             "--result-file", result,
                                             "--predictions-out", os.path.join(run_dir, "testdev_balanced_predictions.json")],
            "accuracy", "accuracy", ("data/testdev_balanced_questions.json",),
        ),
        _mmbench("mmbench", "MMB", "mmbench", "mmbench_dev_20230712", "en"),
        _mmbench("mmbench_cn", "MMB-CN", "mmbench_cn", "mmbench_dev_cn_20231003", "cn"),
        Benchmark(
            "mme", "MME", "MME", "llava_mme", "model_vqa_loader", "llava_mme.jsonl", "MME_Benchmark_release_version", (),
            "eval_mme",
            lambda d, result, run_dir, run: ["--question-file", os.path.join(d, "llava_mme.jsonl"), "--result-file", result,
                                             "--annotation-dir", os.path.join(d, "MME_Benchmark_release_version")],
            "total", "perception + cognition",
        ),
        Benchmark(
            "pope", "POPE", "pope", "llava_pope_test", "model_vqa_loader", "llava_pope_test.jsonl", "val2014", (),
            "eval_pope",
            lambda d, result, run_dir, run: ["--annotation-dir", os.path.join(d, "coco"), "--question-file",
                                             os.path.join(d, "llava_pope_test.jsonl"), "--result-file", result],
            "f1_mean", "mean F1",
        ),
        Benchmark(
            "sqa", "SQA-I", "scienceqa", "llava_test_CQM-A", "model_vqa_science", "llava_test_CQM-A.json", "images/test",
            ("--single-pred-prompt",), "eval_science_qa",
            lambda d, result, run_dir, run: ["--base-dir", d, "--result-file", result,
                                             "--output-file", os.path.join(run_dir, "output.json"),
                                             "--output-result", os.path.join(run_dir, "result.json")],
            "img_accuracy", "SQA-I accuracy", ("problems.json", "pid_splits.json"),
        ),
        Benchmark(
            "vqav2", "VQAv2", "vqav2", "llava_vqav2_mscoco_test-dev2015", "model_vqa_loader",
            "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015", (), "eval_vqa", _vqav2_scorer_args,
            "accuracy", "accuracy (needs annotations; else EvalAI)",
        ),
        Benchmark(
            "textvqa", "VQA-T", "textvqa", "llava_textvqa_val_v051_ocr", "model_vqa_loader",
            "llava_textvqa_val_v051_ocr.jsonl", "train_images", (), "eval_textvqa",
            lambda d, result, run_dir, run: ["--annotation-file", os.path.join(d, "TextVQA_0.5.1_val.json"),
                                             "--result-file", result],
            "accuracy", "accuracy", ("TextVQA_0.5.1_val.json",),
        ),
    ]
}  # fmt: skip
ORDER = ("gqa", "sqa", "textvqa", "pope", "mme", "vqav2", "mmbench", "mmbench_cn")  # the paper's Table 1 columns
BENCHMARKS = {name: BENCHMARKS[name] for name in ORDER}
# The synthetic toy world (toyworld.generate --out <eval root>/toy): not in the default list.
BENCHMARKS["toy"] = Benchmark(
    "toy", "Toy", "toy", "toy_test", "model_vqa_loader", "test_questions.jsonl", "images", (), "eval_toy",
    lambda d, result, run_dir, run: ["--answer-file", os.path.join(d, "test_answers.jsonl"), "--result-file", result],
    "accuracy", "accuracy (exact match)", ("test_answers.jsonl",),
)  # fmt: skip


def parse_benchmarks(spec: str) -> list[Benchmark]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark(s) {unknown or spec!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    return [BENCHMARKS[n] for n in dict.fromkeys(names)]


def generator_module(bench: Benchmark):
    import importlib

    return importlib.import_module(f"llava.eval.{bench.generator}")


def score(bench: Benchmark, eval_root: str, result_file: str, run_dir: str, run: str, vqav2_annotation: str | None = None) -> dict:
    """Run the benchmark's scorer CLI in-process (same code path as the scripts) and return its metrics."""
    import importlib

    module = importlib.import_module(f"llava.eval.{bench.scorer}")
    d = bench.dir(eval_root)
    if bench.name == "vqav2":
        argv = _vqav2_scorer_args(d, result_file, run_dir, run, vqav2_annotation)
    else:
        argv = bench.scorer_args(d, result_file, run_dir, run)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        module.main(argv + ["--json"])
    return json.loads(buf.getvalue().strip().splitlines()[-1])
