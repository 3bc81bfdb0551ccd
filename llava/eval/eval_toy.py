"""Toy-world scorer: exact-match accuracy, overall and per question type (toyworld.generate).

A prediction is normalised as the GQA scorer does (strip, drop trailing periods, lowercase), then
compared with the key's single-word answer. ``accuracy`` is over all questions of the answer key, in %;
an unanswered question counts as wrong and is reported in ``missing``. ``by_type`` gives the accuracy
of each question type (existence, color, shape, count, position, background, text) and
``type_counts`` their sizes. Existence questions are also scored per POPE category.

    python -m llava.eval.eval_toy --answer-file playground/data/toy/test_answers.jsonl \
        --result-file answers.jsonl [--json]
"""
import argparse
from collections import defaultdict

from llava.eval._io import (EvalError, check_same_run, check_unique, cli, key, read_answers, read_jsonl, report, warn,
                            where)

TYPE_ORDER = ("existence", "color", "shape", "count", "position", "background", "text")


def normalize_prediction(text):
    return str(text).strip().rstrip(".").strip().lower()


def correct_by_question(results, answers):
    """({question key: answered correctly?} for every question of the answer key, in its order; unanswered
    questions are False, number of answered questions). Raises EvalError on answers of mixed runs, duplicate
    results or ids missing from the key."""
    check_same_run(results)
    check_unique(results)
    keys = {key(a["question_id"]): a for a in answers}
    preds = {}
    for r in results:
        if key(r["question_id"]) not in keys:
            raise EvalError(f"{where(r)}: question_id {r['question_id']!r} is not in the answer key")
        preds[key(r["question_id"])] = normalize_prediction(r["text"])
    return {k: preds.get(k) == str(a["answer"]).lower() for k, a in keys.items()}, len(preds)


def score_toy(results, answers):
    """results: [{"question_id", "text"}]; answers: [{"question_id", "answer", "type", "pope_category"}]."""
    correct_by_key, answered = correct_by_question(results, answers)
    keys = {key(a["question_id"]): a for a in answers}
    per_type, per_pope = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    correct = 0
    for k, a in keys.items():
        ok = correct_by_key[k]
        correct += ok
        per_type[a["type"]][0] += ok
        per_type[a["type"]][1] += 1
        if a.get("pope_category"):
            per_pope[a["pope_category"]][0] += ok
            per_pope[a["pope_category"]][1] += 1
    order = [t for t in TYPE_ORDER if t in per_type] + sorted(set(per_type) - set(TYPE_ORDER))
    n = len(keys)
    return {"accuracy": 100 * correct / n if n else 0.0, "correct": correct, "n": n, "answered": answered,
            "missing": n - answered,
            "by_type": {t: 100 * per_type[t][0] / per_type[t][1] for t in order},
            "type_counts": {t: per_type[t][1] for t in order},
            "existence_by_pope_category": {c: 100 * v[0] / v[1] for c, v in sorted(per_pope.items())}}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Toy-world accuracy (overall and per question type)")
    ap.add_argument("--answer-file", required=True, help="test_answers.jsonl of the toy data")
    ap.add_argument("--result-file", required=True, help="answers .jsonl (model_vqa_loader output)")
    ap.add_argument("--json", action="store_true", help="print metrics as one JSON object on the last line")
    args = ap.parse_args(argv)
    answers = read_jsonl(args.answer_file, "toy answer key", required=("question_id", "answer", "type"))
    m = score_toy(read_answers(args.result_file), answers)
    lines = [f"toy accuracy: {m['accuracy']:.2f} ({m['correct']}/{m['n']})"]
    lines += [f"  {t:<11} {a:6.2f}  (n={m['type_counts'][t]})" for t, a in m["by_type"].items()]
    if m["missing"]:
        warn(f"{m['missing']} questions have no answer; they count as wrong")
    report(m, lines, args.json)


if __name__ == "__main__":
    cli(main)
