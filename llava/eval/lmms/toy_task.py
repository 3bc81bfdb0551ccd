"""The toy world (``toyworld.generate``) as lmms-eval tasks: datasets saved with ``save_to_disk`` and the task's functions.

    python -m llava.eval.lmms.toy_task --toy-dir playground/data/toy --out playground/data/toy/lmms

writes ``OUT/toy_vqa`` (every test question; columns ``question_id, question, answer, type, image``) and
``OUT/pope`` (the POPE export in lmms-lab/POPE's schema: ``id, question_id, question, answer, image_source,
category, image``, split ``test``), and ``OUT/toy_vqa.yaml`` / ``OUT/toy_pope.yaml``, task files that read them
(``dataset_kwargs: {load_from_disk: true}``). ``toy_pope`` includes lmms-eval's own ``pope.yaml`` and changes only
where the data comes from. Run them with ``--include_path OUT --tasks toy_vqa,toy_pope``.

``toy_vqa``'s metric is the native scorer's (``llava.eval.eval_toy``): the prediction normalised as it does
(strip, drop trailing periods, lowercase) equals the key's answer; ``toy_accuracy`` is in %, as ``eval_toy`` prints.
The prompt is the question file's ``text`` unchanged (it carries the single-word suffix), as
``llava.eval.model_vqa_loader`` sends it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..eval_toy import normalize_prediction

POPE_CATEGORIES = ("random", "popular", "adversarial")  # toyworld's pope/coco_pope_<category>.json
PERCENT = 100


# ------------------------------------------------------------------------------------------ task functions
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    """One document: correct iff the normalised prediction equals the answer (``eval_toy.correct_by_question``)."""
    correct = normalize_prediction(results[0]) == str(doc["answer"]).lower()
    return {"toy_accuracy": {"question_id": doc["question_id"], "type": doc["type"], "correct": correct}}


def aggregate_accuracy(items):
    """Share of correct answers, in % (``eval_toy.score_toy``'s ``accuracy``)."""
    return PERCENT * sum(item["correct"] for item in items) / len(items)


# ------------------------------------------------------------------------------------------ datasets
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_toy_vqa(toy_dir: Path):
    """Every test question of the toy world as a ``datasets.DatasetDict`` with a ``test`` split."""
    import datasets

    questions = _read_jsonl(toy_dir / "test_questions.jsonl")
    answers = {a["question_id"]: a for a in _read_jsonl(toy_dir / "test_answers.jsonl")}
    rows = {"question_id": [], "question": [], "answer": [], "type": [], "image": []}
    for q in questions:
        rows["question_id"].append(q["question_id"])
        rows["question"].append(q["text"])
        rows["answer"].append(answers[q["question_id"]]["answer"])
        rows["type"].append(answers[q["question_id"]]["type"])
        rows["image"].append(str(toy_dir / "images" / q["image"]))
    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "type": datasets.Value("string"),
                                  "image": datasets.Image()})  # fmt: skip
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)})


def build_pope(toy_dir: Path):
    """The toy POPE export in lmms-lab/POPE's schema (what lmms-eval's ``pope`` task reads), split ``test``."""
    import datasets

    rows = {"id": [], "question_id": [], "question": [], "answer": [], "image_source": [], "category": [], "image": []}
    for category in POPE_CATEGORIES:
        for q in _read_jsonl(toy_dir / "pope" / f"coco_pope_{category}.json"):
            rows["id"].append(str(len(rows["id"])))
            rows["question_id"].append(str(q["question_id"]))
            rows["question"].append(q["text"])
            rows["answer"].append(q["label"])
            rows["image_source"].append(Path(q["image"]).stem)
            rows["category"].append(category)
            rows["image"].append(str(toy_dir / "images" / q["image"]))
    features = datasets.Features({**{k: datasets.Value("string") for k in rows if k != "image"}, "image": datasets.Image()})
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)})


def task_yamls(out: Path) -> dict[str, str]:
    """``{file name: text}`` of the two task files reading the datasets under ``out``."""
    import lmms_eval

    pope_yaml = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    here = "llava.eval.lmms.toy_task"  # the functions above, imported by lmms-eval as an absolute module
    toy = f"""task: toy_vqa
dataset_path: {out / 'toy_vqa'}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function {here}.doc_to_visual
doc_to_text: !function {here}.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 128
  temperature: 0
  num_beams: 1
  do_sample: false
process_results: !function {here}.process_results
metric_list:
  - metric: toy_accuracy
    aggregation: !function {here}.aggregate_accuracy
    higher_is_better: true
metadata:
  - version: 0.0
"""
    pope = f"""include: {pope_yaml}
task: toy_pope
dataset_path: {out / 'pope'}
dataset_kwargs:
  load_from_disk: true
"""
    return {"toy_vqa.yaml": toy, "toy_pope.yaml": pope}


def build(toy_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write both datasets and both task files under ``out``; returns ``out`` (the ``--include_path``)."""
    toy_dir, out = Path(toy_dir).resolve(), Path(out).resolve()
    if not (toy_dir / "test_questions.jsonl").is_file():
        raise FileNotFoundError(f"{toy_dir} has no test_questions.jsonl; create it with "
                                f"`python -m toyworld.generate --out {toy_dir}`")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    build_toy_vqa(toy_dir).save_to_disk(str(out / "toy_vqa"))
    build_pope(toy_dir).save_to_disk(str(out / "pope"))
    for name, text in task_yamls(out).items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy-dir", required=True, help="output folder of toyworld.generate")
    ap.add_argument("--out", required=True, help="folder for the datasets and task files (lmms-eval --include_path)")
    print(build(**vars(ap.parse_args(argv))))


if __name__ == "__main__":
    from learnpruner_ext.cli import run_main

    run_main(main)
