"""Answer a ``model_vqa_loader``-format question file (GQA, TextVQA, POPE, MME, VQAv2), upstream LLaVA's CLI.

    python -m llava.eval.model_vqa_loader --model-path P --question-file Q.jsonl --image-folder DIR \
        --answers-file A.jsonl --temperature 0 --conv-mode vicuna_v1 [--num-chunks N --chunk-idx I] \
        [--batch-size B] [--pruning-method learnpruner --visual-token-budget 64 --lpm-path L]

Questions: JSON lines ``{"question_id", "image", "text", ...}``. Answers: JSON lines ``{"question_id",
"prompt" (the question text), "text", "answer_id", "model_id", "metadata", "method", "budget", "r1", "r2",
"layer", "convention", "vision_tokens_per_layer"}``. Re-running with the same answers file resumes
(see llava/eval/answer_loop.py). Question ids need not be unique (MME, TextVQA): an answer is
identified by ``(question_id, prompt)``.
"""

from __future__ import annotations

import argparse
import os

from . import answer_loop
from .answer_loop import Item


def answer_key(record: dict) -> tuple:
    return (str(record["question_id"]).strip(), record.get("prompt"))


def load_items(question_file: str, image_folder: str) -> list[Item]:
    """Every question of the file as an Item (checked: JSON object with question_id, image, text)."""
    items = []
    for lineno, q in answer_loop.read_jsonl_questions(question_file, ("question_id", "image", "text")):
        where = f"{question_file}:{lineno}"
        if not isinstance(q["text"], str) or not isinstance(q["image"], str) or not q["image"]:
            raise answer_loop.InputError(f"{where}: 'text' and 'image' must be non-empty strings")
        items.append(Item(q["text"], {"question_id": q["question_id"], "prompt": q["text"]},
                          os.path.join(image_folder, q["image"]), where))  # fmt: skip
    return items


def add_question_args(parser: argparse.ArgumentParser) -> None:
    answer_loop.add_question_args(parser, "questions .jsonl")


def task(args: argparse.Namespace) -> answer_loop.Task:
    """The questions of ``--question-file`` (this ``--chunk-idx`` of ``--num-chunks``)."""
    items = load_items(os.path.expanduser(args.question_file), args.image_folder)
    return answer_loop.Task(answer_loop.get_chunk(items, args.num_chunks, args.chunk_idx), answer_key)


def main(argv: list[str] | None = None) -> answer_loop.RunSummary:
    parser = answer_loop.build_parser(__doc__.split("\n\n")[0])
    add_question_args(parser)
    args = parser.parse_args(argv)
    return answer_loop.run(args, task(args))


if __name__ == "__main__":
    answer_loop.cli(main)
