"""MMBench / MMBench-CN scorer with circular evaluation, plus the submission file.

Circular evaluation, as the official one (open-compass/VLMEvalKit c6bdffd3a3f2772ce9eaa157d7d31ec741b245b0,
vlmeval/evaluate/multiple_choice.py ``multiple_choice_eval`` / ``prefetch_sub_data`` in exact-matching mode;
the same rule is in the later vlmeval/dataset/utils/multiple_choice.py ``mcq_circular_eval``):
- the official dev/test TSVs hold the rotated copies of a question as separate rows, with index
  ``i + k*1e6``; the rows are grouped by ``index mod 1e6``;
- our generator's ``--all-rounds`` adds rounds of its own: answer lines carry "round_id" r, and in round r
  the options were shown rotated by r (original order opts[r:] + opts[:r]), so the shown letter at
  position p is original letter opts[(p + r) % n] (the line's "option_char" list gives the same mapping);
- a question counts as correct only if every answered round of every row of its group is its row's
  answer; a round whose letter cannot be read fails the question (no judge model is used).

Reading of a response, the official rule order (vlmeval/utils/matching_util.py ``can_infer`` at the same
commit): 1. option letter -- the text with ``.()[],:;!*#{}`` turned into spaces, split on whitespace; if
exactly one of the row's option letters is a word, that letter ("A is correct", "Option C", "I think A");
if none is but "Z" is, "Z" (refused, wrong); a few fixed refusal phrases also give "Z". 2. option text
-- if the lowercased text contains exactly one option's lowercased text, that option. 3. else no match,
counted in ``no_match``.

Reported x100: overall and per-category circular accuracy (dev; the test TSV has no answers and is
scored by the MMBench server), and ``accuracy_single``, the plain accuracy of the first round of the
main rows (index < 1e6).

    python -m llava.eval.eval_mmbench --annotation-file mmbench_dev_20230712.tsv \
        --result-file answers.jsonl --upload-dir answers_upload --experiment NAME [--json]

Writes DIR/NAME.xlsx (DIR/NAME.tsv if openpyxl is not installed): the TSV's columns (without the
base64 "image") plus "prediction" = each row's round-0 answer mapped back to a letter (raw text if no
letter).
"""
import argparse
import csv
import os
import sys
from collections import defaultdict

from llava.eval._io import LETTERS, EvalError, atomic_path, check_unique, cli, key, read_answers, report, where

CIRCULAR_STRIDE = 10**6  # official: g_index = int(index % 1e6)
REFUSED = "Z"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILED = "Failed to obtain answer via API"
_SEPARATORS = ".()[],:;!*#{}"


def infer_option(answer, letters):
    """Step 1 (can_infer_option): the one option letter that is a word of the answer, "Z", or None."""
    if _API_FAILED in answer:
        return None
    if any(r in answer for r in _REFUSALS):
        return REFUSED
    for c in _SEPARATORS:
        answer = answer.replace(c, " ")
    words = answer.split()
    found = [c for c in letters if c in words]
    if len(found) == 1:
        return found[0]
    if not found and REFUSED in words:
        return REFUSED
    return None


def infer_text(answer, texts):
    """Step 2 (can_infer_text): the one option (letter -> text) whose lowercased text is in the answer."""
    answer = answer.lower()
    found = [c for c, t in texts.items() if t.lower() in answer]
    return found[0] if len(found) == 1 else None


def infer_letter(answer, texts):
    """Official rule order: option letter, then option text; None = no match."""
    answer = str(answer)
    return infer_option(answer, list(texts)) or infer_text(answer, texts)


def _blank(v):
    return v is None or str(v).strip() == "" or str(v).strip().lower() == "nan"


def read_tsv(path):
    if not os.path.isfile(path):
        raise EvalError(f"MMBench TSV not found: {path}")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the "image" column holds base64 images
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        header = list(reader.fieldnames or [])
    missing = [c for c in ("index", "question", "A", "B") if c not in header]
    if missing:
        raise EvalError(f"{path}: columns {missing} missing; is this an MMBench TSV?")
    return header, rows


def options(row):
    """Option texts in original order: columns A, B, ... up to the first empty one."""
    out = []
    for c in LETTERS:
        if c not in row or _blank(row[c]):
            break
        out.append(str(row[c]).strip())
    return out


def original_letter(r, opts):
    """Original option letter that a round-r answer line chose ("Z" if refused), or None if no match."""
    n, rid = len(opts), int(r.get("round_id", 0))
    shown = opts[rid:] + opts[:rid]
    letter = infer_letter(r["text"], dict(zip(LETTERS, shown)))
    if letter is None or letter == REFUSED:
        return letter
    p = LETTERS.index(letter)
    oc = r.get("option_char")
    return oc[p] if isinstance(oc, list) and len(oc) == n else LETTERS[(p + rid) % n]


def group_of(row):
    """The question a TSV row belongs to: its index mod 1e6 (the official rows i + k*1e6 are copies of i)."""
    try:
        return int(str(row["index"]).strip()) % CIRCULAR_STRIDE
    except ValueError:
        raise EvalError(f"MMBench index {row['index']!r} is not an integer; is this an MMBench TSV?") from None


def score_mmbench(results, rows):
    """results: answer lines; rows: TSV rows (dicts). Returns (metrics, {index: prediction})."""
    check_unique(results, lambda r: (key(r["question_id"]), int(r.get("round_id", 0))))
    by_index = {key(row["index"]): row for row in rows}
    picked = defaultdict(dict)      # index -> {round: original letter, "Z" or None}
    raw0 = {}
    for r in results:
        row = by_index.get(key(r["question_id"]))
        if row is None:
            raise EvalError(f"{where(r)}: question_id {r['question_id']!r} is not an index of the MMBench TSV")
        opts, rid = options(row), int(r.get("round_id", 0))
        if not 0 <= rid < len(opts):
            raise EvalError(f"{where(r)}: round_id {rid} out of range for a question with {len(opts)} options")
        picked[key(row["index"])][rid] = original_letter(r, opts)
        if rid == 0:
            raw0[key(row["index"])] = str(r["text"]).strip()
    predictions = {}
    for idx, rounds in picked.items():
        first = rounds[min(rounds)]
        predictions[idx] = first if first and first != REFUSED else (raw0.get(idx, "") if 0 in rounds else "")
    groups = defaultdict(list)      # index mod 1e6 -> indices of its TSV rows
    for row in rows:
        groups[group_of(row)].append(key(row["index"]))
    answered = {g: [i for i in idxs if i in picked] for g, idxs in groups.items()}
    answered = {g: idxs for g, idxs in answered.items() if idxs}
    all_rounds = any(rid > 0 for rounds in picked.values() for rid in rounds)
    expected = lambda i: len(options(by_index[i])) if all_rounds else 1
    metrics = {"n": len(answered), "rows": len(picked), "missing": len(groups) - len(answered),
               "no_match": sum(v is None for rounds in picked.values() for v in rounds.values()),
               "refused": sum(v == REFUSED for rounds in picked.values() for v in rounds.values()),
               "incomplete_rounds": sum(len(idxs) < len(groups[g]) or any(len(picked[i]) < expected(i) for i in idxs)
                                        for g, idxs in answered.items())}
    if any(_blank(by_index[i].get("answer")) for i in picked):
        metrics["accuracy"] = None  # test split: no ground truth
        return metrics, predictions
    gt = lambda i: by_index[i]["answer"].strip().upper()
    hits, single = {}, []
    cats, l2 = defaultdict(list), defaultdict(list)
    for g, idxs in answered.items():
        hits[g] = all(v == gt(i) for i in idxs for v in picked[i].values())
        main = key(g) if key(g) in by_index else groups[g][0]   # the row with index < 1e6
        cats[by_index[main].get("category") or "?"].append(hits[g])
        l2[by_index[main].get("l2-category") or "?"].append(hits[g])
        if 0 in picked.get(main, {}):
            single.append(picked[main][0] == gt(main))
    pct = lambda xs: 100 * sum(xs) / len(xs) if xs else None
    metrics.update(accuracy=pct(list(hits.values())), accuracy_single=pct(single),
                   by_category={c: pct(v) for c, v in sorted(cats.items())},
                   by_l2_category={c: pct(v) for c, v in sorted(l2.items())})
    return metrics, predictions


def write_submission(upload_dir, experiment, header, rows, predictions):
    """DIR/NAME.xlsx via openpyxl, else DIR/NAME.tsv. Returns (path, note or None)."""
    cols = [c for c in header if c != "image"] + ["prediction"]
    cell = lambda c, v: int(v) if c == "index" and str(v).strip().isdigit() else v  # numeric index, as in the TSV
    table = [[cell(c, row.get(c, "")) for c in cols[:-1]] + [predictions.get(key(row["index"]), "")] for row in rows]
    try:
        import openpyxl
        from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    except ImportError:
        path = os.path.join(upload_dir, experiment + ".tsv")
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(cols)
            w.writerows(table)
        return path, "openpyxl is not installed: wrote TSV; convert it to .xlsx before uploading to MMBench"
    path = os.path.join(upload_dir, experiment + ".xlsx")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(cols)
    for values in table:
        ws.append([ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v for v in values])
    with atomic_path(path) as tmp:
        wb.save(tmp)
    return path, None


def main(argv=None):
    ap = argparse.ArgumentParser(description="MMBench circular accuracy + submission file")
    ap.add_argument("--annotation-file", required=True, help="mmbench_dev_20230712.tsv (or the CN/test TSV)")
    ap.add_argument("--result-file", required=True, help="answers .jsonl")
    ap.add_argument("--upload-dir", required=True)
    ap.add_argument("--experiment", required=True, help="submission file name (without extension)")
    ap.add_argument("--json", action="store_true", help="print metrics as one JSON object on the last line")
    args = ap.parse_args(argv)
    header, rows = read_tsv(args.annotation_file)
    m, preds = score_mmbench(read_answers(args.result_file), rows)
    path, note = write_submission(args.upload_dir, args.experiment, header, rows, preds)
    m["submission"] = path
    lines = [f"MMBench: {m['n']} questions answered ({m['rows']} TSV rows), {m['missing']} without answers, "
             f"{m['no_match']} answers matching no option, {m['refused']} refused, "
             f"{m['incomplete_rounds']} with missing rounds"]
    if m["accuracy"] is None:
        lines.append("no ground truth in the TSV (test split): upload the submission file to score it")
    else:
        single = "n/a" if m["accuracy_single"] is None else f"{m['accuracy_single']:.2f}"
        lines.append(f"circular accuracy {m['accuracy']:.2f} (single pass, main rows' first round: {single})")
        lines += [f"  {c:<40} {a:6.2f}" for c, a in m["by_category"].items()]
    lines.append(f"wrote {path}" + (f"\nnote: {note}" if note else ""))
    report(m, lines, args.json)


if __name__ == "__main__":
    cli(main)
