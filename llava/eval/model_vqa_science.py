"""Answer ScienceQA (``llava_test_CQM-A.json``), upstream LLaVA's CLI.

    python -m llava.eval.model_vqa_science --model-path P --question-file llava_test_CQM-A.json \
        --image-folder playground/data/eval/scienceqa/images/test --answers-file A.jsonl \
        --single-pred-prompt --temperature 0 --conv-mode vicuna_v1 [--batch-size B] [pruning flags]

Questions: a JSON list of ``{"id", "image" (optional), "conversations": [{"from": "human", "value":
"<image>\\nQuestion..."}, ...]}``; only the first (human) turn is asked. Questions without an image
are answered by the LLM alone (batched separately, no ``pixel_values``; in-LLM pruning does nothing
for them). ``--single-pred-prompt`` appends "Answer with the option's letter from the given choices
directly." Answers: JSON lines with ``question_id`` = ``id`` and ``prompt`` as upstream writes it.
"""

from __future__ import annotations

import argparse
import json
import os

from . import answer_loop
from .answer_loop import InputError, Item

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def answer_key(record: dict) -> tuple:
    return (str(record["question_id"]).strip(),)


def load_items(question_file: str, image_folder: str, single_pred_prompt: bool) -> list[Item]:
    if not os.path.isfile(question_file):
        raise InputError(f"question file not found: {question_file}")
    with open(question_file, encoding="utf-8") as f:
        try:
            questions = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{question_file}: not valid JSON ({e}); expected ScienceQA's llava_test_CQM-A.json") from None
    if not isinstance(questions, list) or not questions:
        raise InputError(f"{question_file}: expected a non-empty JSON list of questions (llava_test_CQM-A.json format)")
    items = []
    for i, line in enumerate(questions):
        where = f"{question_file}: entry {i}" + (f" (id {line.get('id')!r})" if isinstance(line, dict) else "")
        try:
            question = line["conversations"][0]["value"]
            qid = line["id"]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{where}: needs 'id' and 'conversations' with a first turn that has a 'value'") from None
        if not isinstance(question, str) or ("image" in line and not (isinstance(line["image"], str) and line["image"])):
            raise InputError(f"{where}: the question must be a string and 'image' a non-empty path")
        qs = question.replace("<image>", "").strip()
        cur_prompt = qs
        image = None
        if "image" in line:
            image = os.path.join(image_folder, line["image"])
            cur_prompt = "<image>" + "\n" + cur_prompt
        if single_pred_prompt:
            qs = qs + "\n" + SINGLE_PRED_PROMPT
            cur_prompt = cur_prompt + "\n" + SINGLE_PRED_PROMPT
        items.append(Item(qs, {"question_id": qid, "prompt": cur_prompt}, image, where))
    return items


def add_question_args(parser: argparse.ArgumentParser) -> None:
    answer_loop.add_question_args(parser, "llava_test_CQM-A.json")
    parser.add_argument("--single-pred-prompt", action="store_true")


def task(args: argparse.Namespace) -> answer_loop.Task:
    items = load_items(os.path.expanduser(args.question_file), args.image_folder, args.single_pred_prompt)
    items = answer_loop.get_chunk(items, args.num_chunks, args.chunk_idx)
    return answer_loop.Task(items, answer_key, {"single_pred_prompt": args.single_pred_prompt})


def main(argv: list[str] | None = None) -> answer_loop.RunSummary:
    parser = answer_loop.build_parser(__doc__.split("\n\n")[0])
    add_question_args(parser)
    args = parser.parse_args(argv)
    return answer_loop.run(args, task(args))


if __name__ == "__main__":
    answer_loop.cli(main)
