"""Merge the chunk answer files of one run into one answers file (what upstream's eval scripts do with `cat`).

    python -m llava.eval.merge_answers --out RUN_DIR/merge.jsonl RUN_DIR/4_0.jsonl ... RUN_DIR/4_3.jsonl

Unlike `cat`, it refuses (exit 1, one `error:` line naming the file and line):
- a missing chunk file (a chunk that did not run; an empty file is fine: a chunk may have no questions);
- a malformed line (a truncated chunk: re-run the script to resume it);
- chunks of different runs: the fields ``method``, ``budget``, ``model_id``, ``model_fingerprint`` must agree
  on every line (``_io.check_same_run``);
- the same question twice: same ``question_id`` (``id`` in video-QA answers), ``round_id`` (MMBench) and
  ``prompt`` (MME and TextVQA reuse question ids across prompts).
Lines are written in chunk order (as JSON, without our bookkeeping); the output appears whole or not at all.
"""
import argparse
import json
import os
import sys

from llava.eval._io import EvalError, check_same_run, clean, cli, read_jsonl, where, write_atomic


def answer_key(r):
    """(question id, round, prompt); the id is ``question_id``, or ``id`` in Video-LLaVA's video-QA layout."""
    return (str(r["question_id"] if "question_id" in r else r["id"]).strip(), r.get("round_id", 0), r.get("prompt"))


def merge(chunks):
    """All answer records of the chunk files, in order; raises EvalError as described above."""
    missing = [c for c in chunks if not os.path.isfile(c)]
    if missing:
        raise EvalError(f"chunk file(s) not found: {', '.join(missing)}; did every chunk's generator run? "
                        "Re-run the eval script (it resumes) with the same number of GPUs")
    records = [r for c in chunks for r in read_jsonl(c, "chunk answers file", required=(), allow_empty=True)]
    for r in records:  # an image answer {question_id, text} or a video-QA answer {id, pred}
        if not ({"question_id", "text"} <= r.keys() or {"id", "pred"} <= r.keys()):
            raise EvalError(f"{where(r)}: line lacks 'question_id' and 'text' (or 'id' and 'pred' of a video-QA "
                            "answer); is this the right chunk answers file?")
    check_same_run(records)
    seen = {}
    for r in records:
        k = answer_key(r)
        if k in seen:
            raise EvalError(f"{where(r)}: question {k[0]!r} answered twice (also at {where(seen[k])}); "
                            "the same chunk given twice, or chunks of different --num-chunks? Merge one run's "
                            "N_0..N_{N-1}.jsonl only")
        seen[k] = r
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description="merge chunk answer files into one (refusing mixed runs and duplicates)")
    ap.add_argument("--out", required=True, help="merged answers file (e.g. RUN_DIR/merge.jsonl)")
    ap.add_argument("chunks", nargs="+", help="chunk answer files, in chunk order")
    args = ap.parse_args(argv)
    if os.path.abspath(args.out) in map(os.path.abspath, args.chunks):
        raise EvalError(f"--out {args.out} is also one of the chunk files; write the merge to another file")
    records = merge(args.chunks)
    write_atomic(args.out, "".join(json.dumps(clean(r), ensure_ascii=False) + "\n" for r in records))
    print(f"merged {len(records)} answers from {len(args.chunks)} chunk file(s) into {args.out}", file=sys.stderr)


if __name__ == "__main__":
    cli(main)
