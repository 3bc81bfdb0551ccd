"""POPE scorer (object hallucination, COCO random / popular / adversarial splits).

Reading of a response: upstream LLaVA's llava/eval/eval_pope.py (haotian-liu/LLaVA
c121f0432da27facab705978f83c4ada465e46fd), which copies POPE's own evaluate.py: keep the text before
the first ".", delete commas, split on single spaces; the answer is "no" if one of the words is exactly
"No", "not" or "no" (case-sensitive), else "yes". So "NO", "No!" and "Not visible." read as yes.
With "yes" as the positive class,
per category: TP/FP/TN/FN, accuracy, precision, recall, F1 and yes-ratio (share answered yes).
The paper number is the mean F1 over the three categories, x100.

    python -m llava.eval.eval_pope --annotation-dir playground/data/eval/pope/coco \
        --question-file llava_pope_test.jsonl --result-file answers.jsonl [--json]

Labels come from the question line's "label" if present, else from coco_pope_<category>.json in
the annotation dir (JSON lines), matched on (image, question text).
"""
import argparse
import os

from llava.eval._io import EvalError, check_unique, cli, key, read_answers, read_jsonl, report, warn, where

CATEGORIES = ("random", "popular", "adversarial")


NO_WORDS = ("No", "not", "no")  # eval_pope.py: 'No' in words or 'not' in words or 'no' in words


def parse_yes_no(text):
    words = str(text).split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in words for w in NO_WORDS) else "yes"


def confusion_metrics(preds, labels):
    """preds/labels: sequences of "yes"/"no". Positive class = "yes"."""
    pairs = list(zip(preds, labels))
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l == "yes" for p, l in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "n": n, "accuracy": (tp + tn) / n if n else 0.0,
            "precision": precision, "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0}


def _qtext(text):
    return str(text).strip().split("\n")[0].strip().lower()


def load_labels(annotation_dir, categories):
    """{category: {(image, question): "yes"/"no"}} from coco_pope_<category>.json files."""
    labels = {}
    for c in categories:
        path = os.path.join(annotation_dir, f"coco_pope_{c}.json")
        if not os.path.isfile(path):
            raise EvalError(f"POPE annotation {path} not found; --annotation-dir must hold coco_pope_{{random,"
                            "popular,adversarial}}.json (from the POPE repository, output/coco/)")
        rows = read_jsonl(path, "POPE annotation", required=("image", "text", "label"))
        labels[c] = {(a["image"], _qtext(a["text"])): a["label"].strip().lower() for a in rows}
    return labels


def score_pope(results, questions, labels=None):
    """results: [{"question_id", "text"}]; questions: {question_id: line with "image", "text", "category"
    (and maybe "label")}; labels: load_labels() output. Returns per-category metrics + means."""
    check_unique(results)
    qs = {key(k): v for k, v in questions.items()}
    per = {}
    for r in results:
        q = qs.get(key(r["question_id"]))
        if q is None:
            raise EvalError(f"{where(r)}: question_id {r['question_id']!r} is not in the question file")
        cat = q.get("category")
        label = q.get("label")
        if label is None:
            label = (labels or {}).get(cat, {}).get((q["image"], _qtext(q["text"])))
        if label is None:
            raise EvalError(f"{where(r)}: no POPE label for category {cat!r}, image {q['image']!r}, question "
                            f"{_qtext(q['text'])!r}; check --annotation-dir and the question file")
        preds, labs = per.setdefault(cat, ([], []))
        preds.append(parse_yes_no(r["text"]))
        labs.append(str(label).strip().lower())
    cats = sorted(per, key=lambda c: (c not in CATEGORIES, CATEGORIES.index(c) if c in CATEGORIES else c))
    out = {c: confusion_metrics(*per[c]) for c in cats}
    out.update(f1_mean=100 * sum(out[c]["f1"] for c in cats) / len(cats),
               accuracy_mean=100 * sum(out[c]["accuracy"] for c in cats) / len(cats),
               categories=cats, missing=len(qs) - len(results))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="POPE accuracy / precision / recall / F1")
    ap.add_argument("--annotation-dir", required=True, help="dir with coco_pope_{random,popular,adversarial}.json")
    ap.add_argument("--question-file", required=True, help="llava_pope_test.jsonl")
    ap.add_argument("--result-file", required=True, help="answers .jsonl")
    ap.add_argument("--json", action="store_true", help="print metrics as one JSON object on the last line")
    args = ap.parse_args(argv)
    qlines = read_jsonl(args.question_file, "question file", required=("question_id", "image", "text", "category"))
    questions = {}
    for q in qlines:
        if key(q["question_id"]) in questions:
            raise EvalError(f"{q['_where']}: duplicate question_id {q['question_id']!r} in the question file")
        questions[key(q["question_id"])] = q
    results = read_answers(args.result_file)
    cats = sorted({questions[key(r["question_id"])]["category"] for r in results if key(r["question_id"]) in questions})
    labels = None if all("label" in q for q in qlines) else load_labels(args.annotation_dir, cats)
    m = score_pope(results, questions, labels)
    lines = [f"{'category':<12} {'n':>5} {'acc':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'yes%':>6}   TP/FP/TN/FN"]
    for c in m["categories"]:
        x = m[c]
        lines.append(f"{c:<12} {x['n']:>5} {100*x['accuracy']:6.2f} {100*x['precision']:6.2f} {100*x['recall']:6.2f} "
                     f"{100*x['f1']:6.2f} {100*x['yes_ratio']:6.2f}   {x['TP']}/{x['FP']}/{x['TN']}/{x['FN']}")
    lines.append(f"POPE F1 (mean over {len(m['categories'])} categories): {m['f1_mean']:.2f}")
    if m["missing"]:
        warn(f"{m['missing']} questions have no answer; metrics are over the answered ones")
    report(m, lines, args.json)


if __name__ == "__main__":
    cli(main)
