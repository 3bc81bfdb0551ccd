"""GQA scorer: accuracy = exact match of the normalised prediction with the question's answer
(the "Accuracy" of GQA's official eval script; its consistency/validity/plausibility/grounding
metrics are not computed). Predictions are normalised as upstream LLaVA's scripts/convert_gqa_for_eval.py
(haotian-liu/LLaVA c121f0432da27facab705978f83c4ada465e46fd) does: drop trailing periods, lowercase; we
also strip surrounding whitespace, which the generators already do. Reported x100 on testdev-balanced.

    python -m llava.eval.eval_gqa --question-file testdev_balanced_questions.json \
        --result-file answers.jsonl [--predictions-out testdev_balanced_predictions.json] [--json]

--predictions-out writes GQA's prediction format [{"questionId", "prediction"}] for the official script.
"""
import argparse
from collections import defaultdict

from llava.eval._io import EvalError, check_unique, cli, key, load_json, read_answers, report, warn, where, write_json


def normalize_prediction(text):
    return str(text).strip().rstrip(".").lower()


def score_gqa(results, questions):
    """results: [{"question_id", "text"}]; questions: GQA json {qid: {"answer", ...}} -> (metrics, predictions)."""
    check_unique(results)
    qs = {key(q): v for q, v in questions.items()}
    correct, predictions = 0, []
    by_type = defaultdict(lambda: [0, 0])
    for r in results:
        q = qs.get(key(r["question_id"]))
        if q is None:
            raise EvalError(f"{where(r)}: question_id {r['question_id']!r} is not in the GQA question file")
        pred = normalize_prediction(r["text"])
        ok = pred == q["answer"]
        correct += ok
        t = by_type[(q.get("types") or {}).get("structural", "all")]
        t[0] += ok
        t[1] += 1
        predictions.append({"questionId": r["question_id"], "prediction": pred})
    n = len(results)
    metrics = {"accuracy": 100 * correct / n, "correct": correct, "n": n, "missing": len(qs) - n,
               "by_structural_type": {t: 100 * c / k for t, (c, k) in sorted(by_type.items())}}
    return metrics, predictions


def main(argv=None):
    ap = argparse.ArgumentParser(description="GQA accuracy")
    ap.add_argument("--question-file", required=True, help="testdev_balanced_questions.json")
    ap.add_argument("--result-file", required=True, help="answers .jsonl")
    ap.add_argument("--predictions-out", help="also write GQA predictions json here")
    ap.add_argument("--json", action="store_true", help="print metrics as one JSON object on the last line")
    args = ap.parse_args(argv)
    questions = load_json(args.question_file, "GQA question file")
    if not isinstance(questions, dict):
        raise EvalError(f"{args.question_file}: expected GQA's questions json {{question_id: {{...}}}}")
    m, preds = score_gqa(read_answers(args.result_file), questions)
    lines = [f"GQA accuracy: {m['accuracy']:.2f} ({m['correct']}/{m['n']})"]
    lines += [f"  {t:<10} {a:6.2f}" for t, a in m["by_structural_type"].items()]
    if m["missing"]:
        warn(f"{m['missing']} questions have no answer; accuracy is over the {m['n']} answered")
    if args.predictions_out:
        write_json(args.predictions_out, preds)
        lines.append(f"wrote {args.predictions_out} ({len(preds)} predictions)")
    report(m, lines, args.json)


if __name__ == "__main__":
    cli(main)
