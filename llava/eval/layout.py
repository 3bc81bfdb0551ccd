"""The benchmark data layout under ``playground/data/eval/``, written as one README per benchmark folder.

    python -m llava.eval.layout [--root playground/data/eval] [--check]

The files each benchmark needs come from :data:`llava.eval.benchmarks.BENCHMARKS` (the same list the
eval scripts and the sweep use); only where to download them is stated here. ``--check`` exits 1 if the
READMEs on disk differ from what the code would write (the test suite runs it).
"""

from __future__ import annotations

import argparse
import os
import sys

from .benchmarks import BENCHMARKS, Benchmark

DEFAULT_ROOT = os.path.join("playground", "data", "eval")
QUESTIONS_ZIP = "the LLaVA question files come from the `eval.zip` linked in upstream LLaVA's `docs/Evaluation.md`"
SOURCES = {
    "gqa": "`testdev_balanced_questions.json` (GQA questions 1.2) and the images from the GQA project (Stanford); "
           "put both under `data/`",
    "sqa": "`problems.json`, `pid_splits.json` and the test images (`images/test/`) from the `data/scienceqa/` "
           "folder of the ScienceQA repository",
    "textvqa": "`TextVQA_0.5.1_val.json` and the train/val images (`train_images/`) from the TextVQA project",
    "pope": "`coco/coco_pope_{random,popular,adversarial}.json` from the POPE repository (`output/coco/`) and the "
            "COCO `val2014` images",
    "mme": "`MME_Benchmark_release_version/` from the MME authors (access on request); each subtask folder holds "
           "its images and `questions_answers_YN/` (or the answer .txt files beside the images)",
    "vqav2": "the COCO `test2015` images; the score comes from the EvalAI server (test-dev phase) with the "
             "submission file the scorer writes to `answers_upload/`",
    "mmbench": "`mmbench_dev_20230712.tsv` from the MMBench project (OpenCompass); the test-split score comes "
               "from the MMBench server with the file written to `answers_upload/`",
    "mmbench_cn": "`mmbench_dev_cn_20231003.tsv` from the MMBench project (OpenCompass); the test-split score "
                  "comes from the MMBench server with the file written to `answers_upload/`",
}  # fmt: skip


def benchmark_readme(bench: Benchmark) -> str:
    files = [bench.question_file] + ([bench.image_folder + "/"] if bench.image_folder else []) + list(bench.required)
    lines = [
        f"# {bench.title} (`{bench.name}`)",
        "",
        f"Put these files here (`{DEFAULT_ROOT}/{bench.folder}/`):",
        "",
        *[f"- `{path}`" for path in files],
        "",
        f"Where to get them: {SOURCES[bench.name]}; {QUESTIONS_ZIP} (`{bench.question_file}`).",
        "",
        f"Read by `bash scripts/v1_5/eval/{bench.name}.sh` (answers with `llava.eval.{bench.generator}`, scores with "
        f"`llava.eval.{bench.scorer}`) and by `python -m llava.eval.sweep --benchmarks {bench.name}`. Answers go to "
        f"`answers/{bench.split}/<model>-<method>-<budget>/`.",
        "",
        "This file is written by `python -m llava.eval.layout`; everything else in this folder is ignored by git.",
        "",
    ]
    return "\n".join(lines)


def root_readme(benches: list[Benchmark]) -> str:
    rows = [f"| `{b.folder}/` | {b.title} | `scripts/v1_5/eval/{b.name}.sh` | `{b.question_file}` |" for b in benches]
    return "\n".join([
        "# Benchmark data (upstream LLaVA's `playground/data/eval/` layout)",
        "",
        "One folder per benchmark; each folder's README lists the files it needs and where to get them.",
        "The synthetic toy benchmark is generated into `toy/` by `python -m toyworld.generate`.",
        "",
        "| folder | benchmark | script | question file |",
        "|---|---|---|---|",
        *rows,
        "",
        "Written by `python -m llava.eval.layout`.",
        "",
    ])  # fmt: skip


def expected_files(root: str) -> dict[str, str]:
    """``{path: text}`` of every README the layout consists of (all benchmarks but the generated toy one)."""
    benches = [b for b in BENCHMARKS.values() if b.name in SOURCES]
    out = {os.path.join(root, "README.md"): root_readme(benches)}
    out.update({os.path.join(root, b.folder, "README.md"): benchmark_readme(b) for b in benches})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=DEFAULT_ROOT)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files(args.root).items():
        current = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    verb = "out of date" if args.check else "written"
    print(f"{len(stale)} README(s) {verb}" + "".join(f"\n  {p}" for p in stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
