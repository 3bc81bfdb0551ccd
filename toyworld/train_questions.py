"""Export questions the base was trained on, in the test split's formats, to measure the train/test gap.

    python -m toyworld.train_questions --data playground/data/toy --num-images 900 \
        --out outputs/toy/train_check
    python -m llava.eval.model_vqa_loader --model-path checkpoints/toy-llava \
        --question-file outputs/toy/train_check/train_questions.jsonl --image-folder playground/data/toy/images \
        --answers-file outputs/toy/train_check/answers.jsonl --batch-size 50 --max_new_tokens 4
    python -m llava.eval.eval_toy --answer-file outputs/toy/train_check/train_answers.jsonl \
        --result-file outputs/toy/train_check/answers.jsonl

Every QA turn of the first ``--num-images`` training conversations becomes one single-turn question
(``model_vqa_loader`` jsonl) with its answer and type (``test_answers.jsonl`` format), so the same loader and
scorer as the held-out split apply. Accuracy here far above the held-out accuracy means the base memorised
its training images rather than learned to read them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .generate import question_type


def train_questions(train_json: str | Path, num_images: int):
    """(questions, answers) for every QA turn of the first ``num_images`` conversations of ``train_json``."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    conversations = json.loads(Path(train_json).read_text())[:num_images]
    questions, answers = [], []
    for sample in conversations:
        turns = sample["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2]):
            text = human["value"].replace("<image>", "").strip()
            qtype = question_type(text)
            qid = len(questions)
            questions.append({"question_id": qid, "image": sample["image"], "text": text, "category": qtype})
            answers.append({"question_id": qid, "answer": gpt["value"], "type": qtype})
    return questions, answers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="toy data folder (train.json)")
    ap.add_argument("--num-images", type=int, default=900, help="use the first N training images (all their turns)")
    ap.add_argument("--out", required=True, help="folder for train_questions.jsonl and train_answers.jsonl")
    args = ap.parse_args(argv)
    questions, answers = train_questions(Path(args.data) / "train.json", args.num_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_questions.jsonl", questions), ("train_answers.jsonl", answers)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(questions)} questions from {args.num_images} training images -> {out}")


if __name__ == "__main__":
    main()
