"""Answer a Video-LLaVA video-QA benchmark (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA layout), batched and resumable.

    python -m llava.eval.model_video_qa --model-path P --video-dir DIR --gt-file-question Q.json \
        --gt-file-answers A.json --answers-file OUT.jsonl [--limit 1000] [--num-frames 8] \
        [--num-chunks N --chunk-idx I] [--batch-size B] [--pruning-method learnpruner --visual-token-budget 456]

Inputs as Video-LLaVA's ``run_inference_video_qa.py`` (PKU-YuanGroup/Video-LLaVA@984e65b) reads them: a JSON list
of questions ``{"video_name", "question", "question_id"}`` and a JSON list of answers ``{"answer", ...}``, paired by
position; a video is ``DIR/<video_name>`` + the first of ``.mp4 .avi .mov .mkv`` that exists. Output lines have
the reference's fields ``{"id", "question", "answer", "pred"}`` (what ``llava.eval.eval_video_qa_judge`` scores)
plus the run identity every answers file carries (model, fingerprint, method, budget, settings, token
accounting), so a resumed or merged file never mixes runs. Prompt as the reference's: ``llava_v1`` template, the
video before the question, greedy decoding (the reference passes ``do_sample=True, temperature=0.0``, which is
greedy), up to 1024 new tokens.

Deliberate deviations from the reference: answers are paired with questions by position in the whole file, not
within each chunk (the reference's ``index`` restarts at 0 in every chunk, so chunks after the first get the
wrong answers); a question whose video is missing is refused with one error listing them (the reference skips it
silently); ``--limit N`` keeps the first N questions (the LearnPruner paper's "first 1k samples") before chunking.
"""

from __future__ import annotations

import argparse
import json
import os

from ..constants import VIDEO_FRAMES
from . import answer_loop
from .answer_loop import InputError, Item

VIDEO_FORMATS = (".mp4", ".avi", ".mov", ".mkv")  # the reference's lookup order


def answer_key(record: dict) -> tuple:
    return (str(record["id"]).strip(),)


def find_video(video_dir: str, name: str) -> str | None:
    """``video_dir/name`` + the first extension of :data:`VIDEO_FORMATS` that exists (or ``name`` itself if it has
    one of them)."""
    for path in [os.path.join(video_dir, name + ext) for ext in VIDEO_FORMATS] + [os.path.join(video_dir, name)]:
        if os.path.isfile(path):
            return path
    return None


def _read_list(path: str, what: str) -> list:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} file {path} not found") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{what} file {path} is not valid JSON ({err}); it must be a JSON list as Video-LLaVA's") from None
    if not isinstance(data, list) or not data:
        raise InputError(f"{what} file {path} must be a non-empty JSON list, got {type(data).__name__}")
    return data


def load_items(question_file: str, answer_file: str, video_dir: str, num_frames: int = VIDEO_FRAMES,
               limit: int | None = None) -> list[Item]:  # fmt: skip
    """The first ``limit`` questions (all without it) as Items whose image is the video's sampled frames."""
    questions, answers = _read_list(question_file, "question"), _read_list(answer_file, "answer")
    if len(answers) < len(questions):
        raise InputError(f"{answer_file} has {len(answers)} answers for the {len(questions)} questions of "
                         f"{question_file}; they are paired by position, give the matching answer file")  # fmt: skip
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be >= 1, got {limit}")
        questions = questions[:limit]
    items, missing = [], []
    for i, (q, a) in enumerate(zip(questions, answers)):
        where = f"{question_file}[{i}]"
        if not isinstance(q, dict) or any(k not in q for k in ("video_name", "question", "question_id")):
            raise InputError(f"{where}: a question needs 'video_name', 'question' and 'question_id'")
        if not isinstance(a, dict) or "answer" not in a:
            raise InputError(f"{answer_file}[{i}]: an answer needs 'answer'")
        if "question_id" in a and str(a["question_id"]) != str(q["question_id"]):
            raise InputError(f"{answer_file}[{i}] is for question_id {a['question_id']!r} but {where} is "
                             f"{q['question_id']!r}; the files are paired by position and must be in the same order")  # fmt: skip
        path = find_video(video_dir, str(q["video_name"]))
        if path is None:
            missing.append(f"{q['video_name']} ({where})")
            continue

        def frames(path=path, where=where):
            from ..video import load_video  # PyAV, the video extra

            return load_video(path, num_frames)

        record = {"id": q["question_id"], "question": q["question"], "answer": a["answer"]}
        items.append(Item(q["question"], record, frames, where))
    if missing:
        more = f" and {len(missing) - answer_loop.MAX_LISTED} more" if len(missing) > answer_loop.MAX_LISTED else ""
        raise InputError(f"{len(missing)} video(s) not found in {video_dir} (tried {' '.join(VIDEO_FORMATS)}): "
                         f"{'; '.join(missing[:answer_loop.MAX_LISTED])}{more}; check --video-dir")  # fmt: skip
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = answer_loop.build_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(temperature=0.0, max_new_tokens=1024)  # the reference's greedy decoding, 1024 tokens
    parser.add_argument("--video-dir", required=True, help="folder of the videos (<video_name>.mp4|.avi|.mov|.mkv)")
    parser.add_argument("--gt-file-question", required=True, help="JSON list of {video_name, question, question_id}")
    parser.add_argument("--gt-file-answers", required=True, help="JSON list of {answer}, paired with the questions by position")
    parser.add_argument("--num-frames", type=int, default=VIDEO_FRAMES, help="frames sampled uniformly per video")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions (the paper: 1000)")
    parser.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks ...")
    parser.add_argument("--chunk-idx", type=int, default=0, help="... and answer this one (0-based)")
    return parser


def task(args: argparse.Namespace) -> answer_loop.Task:
    items = load_items(args.gt_file_question, args.gt_file_answers, args.video_dir, args.num_frames, args.limit)
    return answer_loop.Task(answer_loop.get_chunk(items, args.num_chunks, args.chunk_idx), answer_key,
                            prompt_settings={"num_frames": args.num_frames}, text_key="pred")  # fmt: skip


def main(argv: list[str] | None = None) -> answer_loop.RunSummary:
    args = build_parser().parse_args(argv)
    return answer_loop.run(args, task(args))


if __name__ == "__main__":
    answer_loop.cli(main)
