"""ScienceQA scorer. SQA-I (the LLaVA papers' number) = accuracy, x100, over the questions of the
split (test) that have an image context; overall accuracy over all answered questions of the split
is reported too.

Reading of a response: upstream LLaVA's llava/eval/eval_science_qa.py (haotian-liu/LLaVA
c121f0432da27facab705978f83c4ada465e46fd), options A-E, in this order:
 1. the response is exactly one of the letters A-E;
 2. it is at least 3 characters, starts with one of them and continues with ". " ("B. a frog");
 3. the regex ``The answer is ([A-Z]).`` (unescaped "." = any character) matches exactly once;
anything else is FAILED ("A." alone, "(C)", "C)", "A: cat", "Answer: C", "The answer is B" with
nothing after the letter, two "The answer is"). Upstream then maps the letter to an index, -1 for
FAILED or a letter beyond the question's choices (its random fallback sits after a return and never
runs), so those answers are wrong. ``failed`` counts the FAILED answers. Upstream also counts an
unanswered question as FAILED in its all-question accuracy; here it is reported as ``missing`` and
left out, as in every scorer (SQA-I is the same either way: upstream's image test uses the prompt,
which an unanswered question lacks).

    python -m llava.eval.eval_science_qa --base-dir playground/data/eval/scienceqa \
        --result-file answers.jsonl [--output-file F] [--output-result F] [--split test] [--json]

--output-file: metrics plus per-question {pred, answer, correct}; --output-result: the result
lines with "pred" (letter or "FAILED") and "correct" added (JSON list).
"""
import argparse
import os
import re

from llava.eval._io import (EvalError, check_unique, clean, cli, key, load_json, read_answers, report, warn, where,
                            write_json)

OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options default
FAILED = "FAILED"
_STATED = re.compile(r"The answer is ([A-Z]).")  # as upstream, "." unescaped


def parse_answer(text):
    """The letter upstream reads from a response, or FAILED."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _STATED.findall(text)
    return found[0] if len(found) == 1 else FAILED


def score_science_qa(results, problems, split_pids):
    """results: [{"question_id": pid, "text"}]; problems: problems.json; split_pids: pids of the split."""
    check_unique(results)
    split = {key(p) for p in split_pids}
    probs = {key(p): v for p, v in problems.items()}
    per_q, n_img, ok_img, ok_all, bad = {}, 0, 0, 0, 0
    for r in results:
        pid = key(r["question_id"])
        if pid not in probs:
            raise EvalError(f"{where(r)}: question_id {pid!r} is not in problems.json")
        if pid not in split:
            raise EvalError(f"{where(r)}: question {pid!r} is not in the chosen split; pass the right --split")
        p = probs[pid]
        pred = parse_answer(str(r["text"]))
        answer = OPTIONS[int(p["answer"])]
        correct = pred == answer  # upstream: index of pred (-1 if FAILED or beyond the choices) == answer
        bad += pred == FAILED
        ok_all += correct
        if p.get("image"):
            n_img += 1
            ok_img += correct
        per_q[pid] = {"pred": pred, "answer": answer, "correct": correct, "has_image": bool(p.get("image"))}
    n = len(results)
    return {"img_accuracy": 100 * ok_img / n_img if n_img else None, "img_n": n_img,
            "accuracy": 100 * ok_all / n, "n": n, "failed": bad, "missing": len(split) - n}, per_q


def main(argv=None):
    ap = argparse.ArgumentParser(description="ScienceQA accuracy (SQA-I = image subset)")
    ap.add_argument("--base-dir", required=True, help="dir with problems.json and pid_splits.json")
    ap.add_argument("--result-file", required=True, help="answers .jsonl")
    ap.add_argument("--output-file", help="write metrics + per-question predictions (json)")
    ap.add_argument("--output-result", help="write the result lines with the parsed prediction (json)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", action="store_true", help="print metrics as one JSON object on the last line")
    args = ap.parse_args(argv)
    problems = load_json(os.path.join(args.base_dir, "problems.json"), "ScienceQA problems.json")
    splits = load_json(os.path.join(args.base_dir, "pid_splits.json"), "ScienceQA pid_splits.json")
    if args.split not in splits:
        raise EvalError(f"split {args.split!r} not in pid_splits.json (has {sorted(splits)})")
    results = read_answers(args.result_file)
    m, per_q = score_science_qa(results, problems, splits[args.split])
    img = "n/a (no image questions)" if m["img_accuracy"] is None else f"{m['img_accuracy']:.2f}"
    lines = [f"ScienceQA {args.split}: SQA-I (image) accuracy {img} over {m['img_n']} questions",
             f"all answered questions: {m['accuracy']:.2f} over {m['n']}; FAILED (unreadable, counted wrong): "
             f"{m['failed']}"]
    if m["missing"]:
        warn(f"{m['missing']} questions of split {args.split!r} have no answer; accuracy is over answered ones")
    if args.output_file:
        write_json(args.output_file, {**m, "results": per_q})
    if args.output_result:
        write_json(args.output_result, [{**clean(r), **per_q[key(r["question_id"])]} for r in results])
    report(m, lines, args.json)


if __name__ == "__main__":
    cli(main)
