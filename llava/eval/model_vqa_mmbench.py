"""Answer MMBench / MMBench-CN (TSV with base64 images), upstream LLaVA's CLI.

    python -m llava.eval.model_vqa_mmbench --model-path P --question-file mmbench_dev_20230712.tsv \
        --answers-file A.jsonl --single-pred-prompt [--lang cn] [--all-rounds] --temperature 0 \
        --conv-mode vicuna_v1 [--batch-size B] [pruning flags]

Each TSV row (columns ``index, question, hint, A, B, C, D, image, ...``) becomes the prompt
``[hint\\n]question\\nA. ...\\nB. ...``; ``--single-pred-prompt`` appends "Answer with the option's
letter from the given choices directly." (``--lang cn``: "请直接回答选项字母。"). With
``--all-rounds`` a row with n options is asked n times, round r showing the options rotated by r
(circular evaluation). Answer lines: ``{"question_id": index, "round_id", "prompt", "text",
"options" (as shown), "option_char" (original letter of each shown position), "answer_id",
"model_id", "metadata", ...}``, as llava/eval/eval_mmbench.py expects.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import os

from PIL import Image

from . import answer_loop
from .answer_loop import InputError, Item
from .eval_mmbench import LETTERS, _blank, options, read_tsv

SUFFIX = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}


def answer_key(record: dict) -> tuple:
    return (str(record["question_id"]).strip(), int(record.get("round_id", 0)))


def _image_loader(data: str, where: str):
    def load() -> Image.Image:
        try:
            return Image.open(io.BytesIO(base64.b64decode(data)))
        except Exception as err:  # noqa: BLE001 - any decoding failure is an input error
            raise InputError(f"{where}: the base64 'image' is not a readable image ({err})") from None

    return load


def load_rows(question_file: str) -> list[tuple[int, dict]]:
    """``[(line number, row)]`` of the TSV, checked: index, question, >= 2 options, a base64 image."""
    try:
        header, rows = read_tsv(question_file)
    except ValueError as err:  # EvalError: file missing / columns missing
        raise InputError(str(err)) from None
    if "image" not in header:
        raise InputError(f"{question_file}: no 'image' column (base64 images); is this an MMBench TSV?")
    out = []
    for i, row in enumerate(rows):
        lineno = i + 2  # header is line 1 (rows never span lines: MMBench cells hold no raw newlines)
        where = f"{question_file}:{lineno}"
        if None in row or any(v is None for v in row.values()):
            raise InputError(f"{where}: row has {'more' if None in row else 'fewer'} cells than the header")
        if _blank(row["index"]) or _blank(row["question"]):
            raise InputError(f"{where}: empty 'index' or 'question'")
        if len(options(row)) < 2:
            raise InputError(f"{where}: needs at least options A and B")
        try:
            base64.b64decode(row["image"], validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: the 'image' cell is not valid base64") from None
        out.append((lineno, row))
    if not out:
        raise InputError(f"{question_file} has no rows")
    return out


def expand(lineno_row: tuple[int, dict], question_file: str, all_rounds: bool, single_pred_prompt: bool, lang: str) -> list[Item]:
    lineno, row = lineno_row
    where = f"{question_file}:{lineno}"
    opts = options(row)
    chars = list(LETTERS[: len(opts)])
    idx = int(row["index"]) if str(row["index"]).strip().isdigit() else row["index"]
    hint = row.get("hint")
    items = []
    for round_idx in range(len(opts) if all_rounds else 1):
        question = row["question"]
        if not _blank(hint):
            question = hint + "\n" + question
        for option_char, option in zip(LETTERS[: len(opts)], opts):
            question = question + "\n" + option_char + ". " + option
        qs = cur_prompt = question
        if single_pred_prompt:
            qs = qs + "\n" + SUFFIX[lang]
        record = {"question_id": idx, "round_id": round_idx, "prompt": cur_prompt, "options": opts,
                  "option_char": chars}  # fmt: skip
        items.append(Item(qs, record, _image_loader(row["image"], where), f"{where} round {round_idx}"))
        opts = opts[1:] + opts[:1]  # rotate for the next round, as upstream does
        chars = chars[1:] + chars[:1]
    return items


def add_question_args(parser: argparse.ArgumentParser) -> None:
    answer_loop.add_question_args(parser, "MMBench .tsv", image_folder=False)
    parser.add_argument("--image-folder", default="", help="(unused: MMBench images are in the TSV)")
    parser.add_argument("--all-rounds", action="store_true", help="ask each question once per option rotation")
    parser.add_argument("--single-pred-prompt", action="store_true")
    parser.add_argument("--lang", choices=sorted(SUFFIX), default="en")


def task(args: argparse.Namespace) -> answer_loop.Task:
    """The rows of this chunk (chunks split rows, not rounds), each expanded into its rounds."""
    question_file = os.path.expanduser(args.question_file)
    rows = answer_loop.get_chunk(load_rows(question_file), args.num_chunks, args.chunk_idx)
    items = [it for r in rows for it in expand(r, question_file, args.all_rounds, args.single_pred_prompt, args.lang)]
    return answer_loop.Task(items, answer_key, {"single_pred_prompt": args.single_pred_prompt, "lang": args.lang})


def main(argv: list[str] | None = None) -> answer_loop.RunSummary:
    parser = answer_loop.build_parser(__doc__.split("\n\n")[0])
    add_question_args(parser)
    args = parser.parse_args(argv)
    return answer_loop.run(args, task(args))


if __name__ == "__main__":
    answer_loop.cli(main)
