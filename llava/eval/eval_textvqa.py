"""TextVQA scorer: upstream LLaVA's accuracy (llava/eval/eval_textvqa.py + m4c_evaluator.py
``TextVQAAccuracyEvaluator``, haotian-liu/LLaVA c121f0432da27facab705978f83c4ada465e46fd) on TextVQA val, x100.

The prediction and all 10 human answers are always processed by ``EvalAIAnswerProcessor``
(``vqa_normalize.evalai_process``: lowercase, delete "," and "?", "'s" -> " 's", punctuation, number
words, articles, the official contraction map), then scored by the VQA leave-one-out rule
(``eval_vqa.leave_one_out``: mean over the 10 subsets of 9 of min(1, matches / 3)). So "hello,world"
is "helloworld", "whats up" is "what's up" while the human "what's up" is "what 's up", and "lets go" /
"im open" are not expanded (the map has neither).

    python -m llava.eval.eval_textvqa --annotation-file TextVQA_0.5.1_val.json --result-file answers.jsonl [--json]

Results are matched to annotations by question_id when every result id is an annotation
question_id; otherwise by the question text in the result's "prompt" (plain question, or LLaVA's
OCR variant "<question>\\nReference OCR token: ...\\nAnswer the question using a single word or
phrase."), keyed on (image_id = result question_id, lowercased question) as in LLaVA's question
file, falling back to the lowercased question alone when it is unique in the annotations.
"""
import argparse
from collections import defaultdict

from llava.eval._io import EvalError, cli, key, load_json, read_answers, report, warn, where
from llava.eval.eval_vqa import leave_one_out
from llava.eval.vqa_normalize import evalai_process


def textvqa_accuracy(pred, gt_answers):
    """TextVQAAccuracyEvaluator's score of one prediction."""
    return leave_one_out(evalai_process(pred), [evalai_process(a) for a in gt_answers])


def question_from_prompt(prompt):
    """The question line of a LLaVA TextVQA prompt, lowercased."""
    lines = [ln.strip() for ln in str(prompt).replace("<image>", "").split("\n") if ln.strip()]
    return lines[0].lower() if lines else ""


def match_annotations(results, data):
    """One annotation per result (same order). Raises EvalError for unknown or twice-answered questions."""
    by_id = {key(a["question_id"]): a for a in data}
    if all(key(r["question_id"]) in by_id for r in results):
        matched = [by_id[key(r["question_id"])] for r in results]
    else:
        by_img_q, by_q = {}, defaultdict(list)
        for a in data:
            q = a["question"].strip().lower()
            by_img_q[(key(a["image_id"]), q)] = a
            by_q[q].append(a)
        matched = []
        for r in results:
            if "prompt" not in r:
                raise EvalError(f"{where(r)}: question_id {r['question_id']!r} is not a TextVQA question_id "
                                "and the line has no 'prompt' to match the question by")
            q = question_from_prompt(r["prompt"])
            a = by_img_q.get((key(r["question_id"]), q)) or (by_q[q][0] if len(by_q[q]) == 1 else None)
            if a is None:
                raise EvalError(f"{where(r)}: question {q!r} (question_id {r['question_id']!r}) matches "
                                f"{'several' if by_q[q] else 'no'} annotated questions; wrong annotation file?")
            matched.append(a)
    seen = {}
    for r, a in zip(results, matched):
        qid = a["question_id"]
        if qid in seen:
            raise EvalError(f"{where(r)}: question {qid} answered twice (also at {where(seen[qid])}); "
                            "were chunk files concatenated twice?")
        seen[qid] = r
    return matched


def score_textvqa(results, data):
    """results: LLaVA answers [{"question_id", "prompt", "text"}]; data: the annotation json's "data" list."""
    accs = []
    for r, a in zip(results, match_annotations(results, data)):
        if not a.get("answers"):
            raise EvalError(f"question {a['question_id']} has no human answers; TextVQA test has no public "
                            "answers, score on val (TextVQA_0.5.1_val.json)")
        accs.append(textvqa_accuracy(r["text"], a["answers"]))
    return {"accuracy": 100 * sum(accs) / len(accs), "n": len(accs), "missing": len(data) - len(accs)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="TextVQA accuracy (VQA soft accuracy)")
    ap.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
    ap.add_argument("--result-file", required=True, help="answers .jsonl")
    ap.add_argument("--json", action="store_true", help="print metrics as one JSON object on the last line")
    args = ap.parse_args(argv)
    ann = load_json(args.annotation_file, "TextVQA annotation file")
    if not isinstance(ann, dict) or not isinstance(ann.get("data"), list):
        raise EvalError(f"{args.annotation_file}: expected the official TextVQA json {{'data': [...]}}")
    m = score_textvqa(read_answers(args.result_file), ann["data"])
    if m["missing"]:
        warn(f"{m['missing']} annotated questions have no answer; accuracy is over the {m['n']} answered")
    report(m, [f"TextVQA accuracy: {m['accuracy']:.2f} ({m['n']} questions)"], args.json)


if __name__ == "__main__":
    cli(main)
