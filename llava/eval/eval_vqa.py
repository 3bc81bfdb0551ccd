"""VQAv2 accuracy (the official VQA metric, local scoring on val) and the VQAv2 test-dev submission file.

Official metric (GT-Vision-Lab/VQA a013f0043c1e2cdc995922dfe257f7149aa9af06,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, ``VQAEval.evaluate``):
 1. every answer (prediction and the 10 human answers): newlines/tabs -> spaces, strip;
 2. only if the human answers disagree (``len(set(gtAnswers)) > 1``) are the prediction and the human
    answers processed (``vqa_normalize.vqa_eval_process``: punctuation, lowercase, number words, articles,
    contractions). When all humans agree the comparison is exact: "Two" against ten "2" scores 0, and so
    does "Yes" against ten "yes";
 3. acc = mean over the 10 leave-one-out subsets of 9 answers of min(#matches in the subset / 3, 1), so
    0 matches -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.0. The score is the mean x100.

Submission file: upstream LLaVA's scripts/convert_vqav2_for_submission.py (c121f0432da27facab705978f83c4ada465e46fd)
applies ``EvalAIAnswerProcessor`` (``vqa_normalize.evalai_process``) to each answer: "Two" -> "2",
"the dog" -> "dog". The EvalAI server then runs the metric above on those strings, so
``accuracy_as_submitted`` (the metric on the processed strings) is what the server would give on val.

    python -m llava.eval.eval_vqa --question-file llava_vqav2_mscoco_test2015.jsonl \
        --result-file answers.jsonl --submission-out answers_upload/test-dev.json
    python -m llava.eval.eval_vqa --question-file Q.jsonl --result-file answers.jsonl \
        --annotation-file v2_mscoco_val2014_annotations.json     # local scoring on val
"""
import argparse

from llava.eval._io import (EvalError, check_unique, cli, key, load_json, read_answers, read_jsonl, report, warn, where,
                            write_json)
from llava.eval.vqa_normalize import clean_whitespace, evalai_process, vqa_eval_process


def leave_one_out(pred, gts):
    """Mean over the len(gts) subsets that leave one human answer out of min(1, #matches / 3)."""
    if not gts:
        raise ValueError("the VQA accuracy needs at least one ground-truth answer")
    n, m = len(gts), sum(g == pred for g in gts)
    # m of the n subsets drop a matching answer (m-1 matches left), the other n-m keep all m.
    return (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n


def vqa_accuracy(pred, gt_answers):
    """vqaEval.py's accuracy of one prediction against the human answers (usually 10)."""
    gts = [clean_whitespace(a) for a in gt_answers]
    pred = clean_whitespace(pred)
    if len(set(gts)) > 1:
        gts = [vqa_eval_process(a) for a in gts]
        pred = vqa_eval_process(pred)
    return leave_one_out(pred, gts)


def score_vqa(results, gt_answers):
    """results: [{"question_id", "text"}]; gt_answers: {question_id: [human answers]} -> metrics dict."""
    check_unique(results)
    gt = {key(q): a for q, a in gt_answers.items()}
    accs, submitted = [], []
    for r in results:
        answers = gt.get(key(r["question_id"]))
        if answers is None:
            raise EvalError(f"{where(r)}: question_id {r['question_id']!r} is not in the annotations; "
                            "wrong annotation file or result file?")
        accs.append(vqa_accuracy(r["text"], answers))
        submitted.append(vqa_accuracy(evalai_process(r["text"]), answers))
    return {"accuracy": 100 * sum(accs) / len(accs), "accuracy_as_submitted": 100 * sum(submitted) / len(submitted),
            "n": len(accs), "missing": len(gt) - len(accs)}


def vqav2_submission(questions, results):
    """One {"question_id": int, "answer": str} per question of the question file ("" if unanswered)."""
    check_unique(results)
    answers = {key(r["question_id"]): r for r in results}
    qids = {key(q["question_id"]) for q in questions}
    for k, r in answers.items():
        if k not in qids:
            raise EvalError(f"{where(r)}: question_id {k!r} is not in the question file; "
                            "use the full test2015 question file (llava_vqav2_mscoco_test2015.jsonl)")
    out = []
    for q in questions:
        r = answers.get(key(q["question_id"]))
        out.append({"question_id": int(q["question_id"]), "answer": evalai_process(r["text"]) if r else ""})
    return out


def load_vqa_annotations(path):
    """Official VQA annotation json {"annotations": [{"question_id", "answers": [{"answer"}]}]}."""
    data = load_json(path, "VQA annotation file")
    if not isinstance(data, dict) or "annotations" not in data:
        raise EvalError(f"{path}: expected the official VQA annotation json with an 'annotations' list")
    return {a["question_id"]: [x["answer"] for x in a["answers"]] for a in data["annotations"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--result-file", required=True)
    ap.add_argument("--submission-out", help="write the EvalAI submission json here")
    ap.add_argument("--annotation-file", help="official VQA annotations, to score locally (val)")
    ap.add_argument("--json", action="store_true", help="print metrics as one JSON object on the last line")
    args = ap.parse_args(argv)
    if not args.submission_out and not args.annotation_file:
        ap.error("nothing to do: give --submission-out and/or --annotation-file")
    questions = read_jsonl(args.question_file, "question file", required=("question_id",))
    results = read_answers(args.result_file)
    metrics, lines = {}, []
    if args.annotation_file:
        metrics = score_vqa(results, load_vqa_annotations(args.annotation_file))
        lines.append(f"VQA accuracy: {metrics['accuracy']:.2f} ({metrics['n']} questions); on the submission "
                     f"strings (what EvalAI would give): {metrics['accuracy_as_submitted']:.2f}")
        if metrics["missing"]:
            warn(f"{metrics['missing']} annotated questions have no answer; accuracy is over answered ones")
    if args.submission_out:
        sub = vqav2_submission(questions, results)
        write_json(args.submission_out, sub)
        empty = sum(not a["answer"] for a in sub)
        metrics.update(submission=args.submission_out, submission_questions=len(sub), submission_unanswered=empty)
        lines.append(f"wrote {args.submission_out}: {len(sub)} questions, {empty} without an answer")
    report(metrics, lines, args.json)


if __name__ == "__main__":
    cli(main)
