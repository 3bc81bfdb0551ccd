"""MMBench / MMBench-CN scorer with circular evaluation, plus the submission file.

Answer lines come one per (question, rotation round): "question_id" (the TSV `index`), "round_id" r,
"text". In round r the options were shown rotated by r (original order opts[r:] + opts[:r], shown
as A, B, ...), so the displayed letter at position p is original letter opts[(p + r) % n] (the
line's "option_char" list, when present, gives the same mapping). Circular evaluation: an item is
correct only if every round present maps back to the ground-truth letter. Overall and per-category
accuracy x100 (dev; the test TSV has no answers and is scored by the MMBench server).

    python -m llava.eval.eval_mmbench --annotation-file mmbench_dev_20230712.tsv \
        --result-file answers.jsonl --upload-dir answers_upload --experiment NAME [--json]

Writes DIR/NAME.xlsx (DIR/NAME.tsv if openpyxl is not installed): the TSV's columns (without the
base64 "image") plus "prediction" = round 0's answer mapped back to a letter (raw text if no letter).
"""
import argparse
import csv
import os
import sys
from collections import defaultdict

from llava.eval._io import LETTERS, EvalError, atomic_path, check_unique, cli, key, parse_letter, read_jsonl, report, where


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
    """Original option letter that a round-r answer line chose, or None if no option can be read."""
    n, rid = len(opts), int(r.get("round_id", 0))
    letter = parse_letter(r["text"], n)
    if letter is None:  # the model may have answered with the option text itself
        shown = [t.lower() for t in opts[rid:] + opts[:rid]]
        text = str(r["text"]).strip().rstrip(".").lower()
        letter = LETTERS[shown.index(text)] if text in shown else None
    if letter is None:
        return None
    p = LETTERS.index(letter)
    oc = r.get("option_char")
    return oc[p] if isinstance(oc, list) and len(oc) == n else LETTERS[(p + rid) % n]


def score_mmbench(results, rows):
    """results: answer lines; rows: TSV rows (dicts). Returns (metrics, {index: prediction})."""
    check_unique(results, lambda r: (key(r["question_id"]), int(r.get("round_id", 0))))
    by_index = {key(row["index"]): row for row in rows}
    picked = defaultdict(dict)      # index -> {round: original letter or None}
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
        predictions[idx] = first or (raw0.get(idx, "") if 0 in rounds else "")
    metrics = {"n": len(picked), "missing": len(rows) - len(picked), "unparseable": sum(
        v is None for rounds in picked.values() for v in rounds.values()),
        "incomplete_rounds": sum(len(rounds) < len(options(by_index[i])) for i, rounds in picked.items())}
    if any(_blank(by_index[i].get("answer")) for i in picked):
        metrics["accuracy"] = None  # test split: no ground truth
        return metrics, predictions
    hits, first_hits = {}, {}
    cats, l2 = defaultdict(list), defaultdict(list)
    for idx, rounds in picked.items():
        row = by_index[idx]
        gt = row["answer"].strip().upper()
        hits[idx] = all(v == gt for v in rounds.values())
        first_hits[idx] = rounds[min(rounds)] == gt
        cats[row.get("category") or "?"].append(hits[idx])
        l2[row.get("l2-category") or "?"].append(hits[idx])
    pct = lambda xs: 100 * sum(xs) / len(xs)
    metrics.update(accuracy=pct(list(hits.values())), accuracy_single=pct(list(first_hits.values())),
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
    m, preds = score_mmbench(read_jsonl(args.result_file), rows)
    path, note = write_submission(args.upload_dir, args.experiment, header, rows, preds)
    m["submission"] = path
    lines = [f"MMBench: {m['n']} questions answered, {m['missing']} without answers, "
             f"{m['unparseable']} unreadable answers, {m['incomplete_rounds']} with missing rounds"]
    if m["accuracy"] is None:
        lines.append("no ground truth in the TSV (test split): upload the submission file to score it")
    else:
        lines.append(f"circular accuracy {m['accuracy']:.2f} (single-pass, first round: {m['accuracy_single']:.2f})")
        lines += [f"  {c:<40} {a:6.2f}" for c, a in m["by_category"].items()]
    lines.append(f"wrote {path}" + (f"\nnote: {note}" if note else ""))
    report(m, lines, args.json)


if __name__ == "__main__":
    cli(main)
