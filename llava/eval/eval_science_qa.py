"""ScienceQA scorer. SQA-I (the LLaVA papers' number) = accuracy, x100, over the questions of the
split (test) that have an image context; overall accuracy over all answered questions of the split
is reported too.

The option letter is parsed from the response ("A", "A.", "(B)", "C. text", "The answer is D.");
a response with no readable letter, or a letter beyond the question's choices, is wrong and counted
as "unparseable".

    python -m llava.eval.eval_science_qa --base-dir playground/data/eval/scienceqa \
        --result-file answers.jsonl [--output-file F] [--output-result F] [--split test] [--json]

--output-file: metrics plus per-question {pred, answer, correct}; --output-result: the result
lines with "pred" (letter or null) and "correct" added (JSON list).
"""
import argparse
import os

from llava.eval._io import (LETTERS, EvalError, check_unique, clean, cli, key, load_json, parse_letter, read_jsonl,
                            report, warn, where, write_json)


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
        pred = parse_letter(r["text"], len(p["choices"]))
        answer = LETTERS[int(p["answer"])]
        correct = pred == answer
        bad += pred is None
        ok_all += correct
        if p.get("image"):
            n_img += 1
            ok_img += correct
        per_q[pid] = {"pred": pred, "answer": answer, "correct": correct, "has_image": bool(p.get("image"))}
    n = len(results)
    return {"img_accuracy": 100 * ok_img / n_img if n_img else None, "img_n": n_img,
            "accuracy": 100 * ok_all / n, "n": n, "unparseable": bad, "missing": len(split) - n}, per_q


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
    results = read_jsonl(args.result_file)
    m, per_q = score_science_qa(results, problems, splits[args.split])
    img = "n/a (no image questions)" if m["img_accuracy"] is None else f"{m['img_accuracy']:.2f}"
    lines = [f"ScienceQA {args.split}: SQA-I (image) accuracy {img} over {m['img_n']} questions",
             f"all answered questions: {m['accuracy']:.2f} over {m['n']}; unparseable answers: {m['unparseable']}"]
    if m["missing"]:
        warn(f"{m['missing']} questions of split {args.split!r} have no answer; accuracy is over answered ones")
    if args.output_file:
        write_json(args.output_file, {**m, "results": per_q})
    if args.output_result:
        write_json(args.output_result, [{**clean(r), **per_q[key(r["question_id"])]} for r in results])
    report(m, lines, args.json)


if __name__ == "__main__":
    cli(main)
