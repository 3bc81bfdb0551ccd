"""Small shared helpers for the benchmark scorers (llava/eval/eval_*.py).

- read_jsonl / load_json: read answer/question/annotation files; bad input raises EvalError
  naming the file (and line) and what to do about it.
- read_answers / check_same_run: an answer file, refused if it mixes runs (RUN_KEYS differ across lines).
- write_atomic / atomic_path: output files appear whole or not at all (temp file + rename).
- report / cli: readable summary, and with --json ONE JSON object on the last stdout line.
"""
import contextlib
import json
import os
import sys
import tempfile

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class EvalError(ValueError):
    """Bad scorer input. The message says which file/line and what to do."""


def key(x):
    """Question ids compare as strings: 12, "12" and " 12" are the same id."""
    return str(x).strip()


def where(r):
    """Human-readable location of a result record, for error messages."""
    return r.get("_where") or f"result with question_id {r.get('question_id')!r}"


def _need_file(path, what):
    if not os.path.isfile(path):
        raise EvalError(f"{what} not found: {path} (check the path; see docs/evaluation.md for the data layout)")


def load_json(path, what="annotation file"):
    _need_file(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: not valid JSON ({e}); is this really the {what}?") from None


def read_jsonl(path, what="result file", required=("question_id", "text"), allow_empty=False):
    """List of dicts, one per non-blank line; each gets "_where" = "path:line" for error messages."""
    _need_file(path, what)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: malformed JSON line ({e.msg}) in the {what}; "
                                "fix or delete the line (a truncated file? re-run answer generation)") from None
            if not isinstance(r, dict):
                raise EvalError(f"{path}:{lineno}: expected a JSON object per line in the {what}, got {type(r).__name__}")
            missing = [k for k in required if k not in r]
            if missing:
                raise EvalError(f"{path}:{lineno}: line lacks key(s) {missing}; is this the right {what}?")
            r["_where"] = f"{path}:{lineno}"
            records.append(r)
    if not records and not allow_empty:
        raise EvalError(f"{what} {path} is empty; did answer generation finish (and were the chunks merged)?")
    return records


# Fields of every answer line that name the run it came from (written by llava/eval/answer_loop.py).
RUN_KEYS = ("method", "budget", "model_id", "model_fingerprint")
_ABSENT = object()


def check_same_run(records):
    """Refuse answers of more than one run: each RUN_KEYS field must have the same value on every line,
    or be absent from every line (plain upstream answer files have none of them). Names the first
    conflicting line and the line it disagrees with (the first line)."""
    if not records:
        return
    first = records[0]
    for r in records[1:]:
        for k in RUN_KEYS:
            a, b = first.get(k, _ABSENT), r.get(k, _ABSENT)
            if a != b:
                show = lambda v: "no " + repr(k) if v is _ABSENT else f"{k}={v!r}"
                raise EvalError(f"{where(r)}: {show(b)}, but {where(first)} has {show(a)}: this file mixes answers "
                                "of different runs (method, budget or model). Score each run's answers separately: "
                                "re-generate into a fresh --answers-file, or merge only the chunks of one run")


def read_answers(path, what="result file", allow_empty=False):
    """An answer file (read_jsonl) whose lines all come from one run (check_same_run)."""
    records = read_jsonl(path, what, allow_empty=allow_empty)
    check_same_run(records)
    return records


def check_unique(results, keyfn=lambda r: key(r["question_id"])):
    seen = {}
    for r in results:
        k = keyfn(r)
        if k in seen:
            raise EvalError(f"{where(r)}: duplicate answer for {k!r} (first at {where(seen[k])}); "
                            "were chunk files concatenated twice?")
        seen[k] = r


def clean(r):
    """A result record without our bookkeeping keys (for writing back out)."""
    return {k: v for k, v in r.items() if not k.startswith("_")}


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path next to `path`; on success rename it onto `path`, on error delete it."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def report(metrics, lines, as_json):
    """Print the readable summary; with as_json the metrics go on the last line as one JSON object."""
    print("\n".join(lines), flush=True)
    if as_json:
        print(json.dumps(metrics, ensure_ascii=False), flush=True)


def cli(main, argv=None):
    """Run a scorer's main(); input errors end the process with a one-line message, exit code 1."""
    try:
        main(argv)
    except EvalError as e:
        sys.exit(f"error: {e}")
