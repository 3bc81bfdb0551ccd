"""MME scorer (official MME metric).

Each image has two yes/no questions. Per subtask: acc = % questions answered correctly, acc+ = %
images with both questions correct, score = acc + acc+ (max 200). Perception = sum of the 10
perception subtask scores (max 2000), cognition = sum of the 4 cognition ones (max 800).

Reading of a response: MME's official eval_tool/calculation.py (BradyFU/Awesome-Multimodal-Large-Language-Models,
branch Evaluation dd2950902889cd614d4edf606827240166d29381, tools/eval_tool.zip, ``parse_pred_ans``): the
response is lowercased; if its first 4 characters contain "yes" it is yes, else if they contain "no" it
is no, else "other" (always wrong, counted in ``other``). So "None", "Nope", "Not sure" read as no,
"Yesterday" as yes, "**Yes**" as other.

    python -m llava.eval.eval_mme --question-file llava_mme.jsonl --result-file answers.jsonl \
        [--annotation-dir MME_Benchmark_release_version] [--json]

Results are matched to question lines by (question_id, prompt == question text). Ground truth is the
question line's "answer"/"category" if present, else read from MME's release layout, as upstream LLaVA's
convert_answer_to_mme.py reads it: <category>/questions_answers_YN/<image stem>.txt (the subtasks whose
images are in <category>/images/) or <category>/<image stem>.txt (the txt beside the images), lines
"question<TAB>Yes|No". The category defaults to the question_id's first path component.
"""
import argparse
import os
import re
from collections import Counter, defaultdict

from llava.eval._io import EvalError, cli, key, read_answers, read_jsonl, report, warn, where

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_CANON = {c.lower(): c for c in PERCEPTION + COGNITION}


PREFIX = 4  # calculation.py: prefix_pred_ans = pred_ans[:4]
GT_SUBDIR = "questions_answers_YN"  # the release folder of the ground-truth txt files (beside images/)


def parse_yes_no(text):
    """One of yes / no / other, as calculation.py's parse_pred_ans."""
    head = str(text).lower()[:PREFIX]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _qkey(text):
    """Question text for matching: first line, lowercased, without MME's 'Please answer yes or no.'"""
    q = str(text).replace("<image>", "").strip().split("\n")[0].strip().lower()
    return re.sub(r"\s*please answer yes or no\.?$", "", q).strip()


class MMEAnnotations:
    """Ground-truth answers from MME_Benchmark_release_version, read lazily per image."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise EvalError(f"MME annotation dir not found: {root} (MME_Benchmark_release_version)")
        self.root, self.cache = root, {}

    def answer(self, category, image, question):
        stem = os.path.splitext(os.path.basename(image))[0]
        if (category, stem) not in self.cache:
            cands = [os.path.join(self.root, category, sub, stem + ".txt") for sub in (GT_SUBDIR, "")]
            path = next((p for p in cands if os.path.isfile(p)), None)
            if path is None:
                raise EvalError(f"MME ground truth not found: none of {cands}; --annotation-dir must be "
                                f"MME_Benchmark_release_version, with <category>/{GT_SUBDIR}/*.txt or the "
                                "txt files beside the images")
            qa = {}
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        parts = line.rstrip("\n").split("\t")
                        if len(parts) < 2:
                            raise EvalError(f"{path}:{lineno}: expected 'question<TAB>answer'")
                        qa[_qkey(parts[0])] = parts[1].strip()
            self.cache[(category, stem)] = (path, qa)
        path, qa = self.cache[(category, stem)]
        if _qkey(question) not in qa:
            raise EvalError(f"question {question!r} not found in {path}")
        return qa[_qkey(question)]


def match_questions(results, questions):
    """The question line of each result: by (question_id, prompt), or by question_id if it is unique."""
    by_qid, by_both = defaultdict(list), {}
    for q in questions:
        by_qid[key(q["question_id"])].append(q)
        by_both[(key(q["question_id"]), _qkey(q["text"]))] = q
    matched, seen = [], {}
    for r in results:
        k = key(r["question_id"])
        q = by_both.get((k, _qkey(r.get("prompt", "")))) or (by_qid[k][0] if len(by_qid[k]) == 1 else None)
        if q is None:
            raise EvalError(f"{where(r)}: question_id {k!r} with prompt {r.get('prompt')!r} matches no single "
                            "question of the question file; wrong question file?")
        if id(q) in seen:
            raise EvalError(f"{where(r)}: question answered twice (also at {where(seen[id(q)])})")
        seen[id(q)] = r
        matched.append(q)
    return matched


def score_mme(results, questions, annotations=None):
    """results: [{"question_id", "prompt", "text"}]; questions: question-file lines ("question_id", "text",
    optional "image", "category", "answer"); annotations: MMEAnnotations if lines lack "answer"."""
    def cat_img(q):
        cat = q.get("category") or key(q["question_id"]).split("/")[0]
        return _CANON.get(cat.lower(), cat), q.get("image") or key(q["question_id"])

    expected = Counter(cat_img(q) for q in questions)           # questions per image (2 in MME)
    per = defaultdict(lambda: defaultdict(list))                # category -> image -> [correct?]
    other = Counter()                                           # category -> responses read as "other"
    for r, q in zip(results, match_questions(results, questions)):
        cat, img = cat_img(q)
        gt = q.get("answer")
        if gt is None:
            if annotations is None:
                raise EvalError(f"{q.get('_where', q['question_id'])}: question line has no 'answer'; "
                                "pass --annotation-dir MME_Benchmark_release_version")
            gt = annotations.answer(cat, img, q["text"])
        pred = parse_yes_no(r["text"])
        other[cat] += pred == "other"
        per[cat][img].append(pred == str(gt).strip().lower())
    subtasks = {}
    for cat, imgs in per.items():
        answers = [ok for oks in imgs.values() for ok in oks]
        plus = sum(all(oks) and len(oks) == expected[(cat, img)] for img, oks in imgs.items())
        acc, acc_plus = 100 * sum(answers) / len(answers), 100 * plus / len(imgs)
        subtasks[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                         "questions": len(answers), "images": len(imgs), "other": other[cat]}
    perception = sum(subtasks[c]["score"] for c in PERCEPTION if c in subtasks)
    cognition = sum(subtasks[c]["score"] for c in COGNITION if c in subtasks)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "other": sum(other.values()), "subtasks": subtasks,
            "n": len(results), "missing": len(questions) - len(results),
            "subtasks_missing": [c for c in PERCEPTION + COGNITION if c not in subtasks],
            "subtasks_unknown": sorted(c for c in subtasks if c not in _CANON.values())}


def main(argv=None):
    ap = argparse.ArgumentParser(description="MME perception / cognition scores")
    ap.add_argument("--question-file", required=True, help="llava_mme.jsonl")
    ap.add_argument("--result-file", required=True, help="answers .jsonl")
    ap.add_argument("--annotation-dir", help="MME_Benchmark_release_version (if question lines lack 'answer')")
    ap.add_argument("--json", action="store_true", help="print metrics as one JSON object on the last line")
    args = ap.parse_args(argv)
    questions = read_jsonl(args.question_file, "question file", required=("question_id", "text"))
    ann = MMEAnnotations(args.annotation_dir) if args.annotation_dir else None
    m = score_mme(read_answers(args.result_file), questions, ann)
    lines = [f"{'subtask':<24} {'acc':>6} {'acc+':>6} {'score':>7} {'other':>6}"]
    for group in (PERCEPTION, COGNITION, m["subtasks_unknown"]):
        lines += [f"{c:<24} {s['acc']:6.2f} {s['acc_plus']:6.2f} {s['score']:7.2f} {s['other']:6d}"
                  for c, s in ((c, m["subtasks"][c]) for c in group if c in m["subtasks"])]
    lines.append(f"Perception {m['perception']:.2f}  Cognition {m['cognition']:.2f}  Total {m['total']:.2f}  "
                 f"(responses read as neither yes nor no: {m['other']})")
    if m["missing"]:
        warn(f"{m['missing']} questions have no answer; scores are over the answered ones")
    if m["subtasks_missing"]:
        warn(f"no answers for subtasks {m['subtasks_missing']}; they add 0 to the sums")
    if m["subtasks_unknown"]:
        warn(f"subtasks {m['subtasks_unknown']} are not MME subtasks; left out of perception/cognition")
    report(m, lines, args.json)


if __name__ == "__main__":
    cli(main)
