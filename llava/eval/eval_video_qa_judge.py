"""Judge-scored video QA (MSVD-QA, MSRVTT-QA, TGIF-QA): accuracy and the 0-5 score of Video-LLaVA's GPT judge.

    python -m llava.eval.eval_video_qa_judge --pred-path RUN/merge.jsonl --output-dir RUN/judge \
        --judge openai --judge-url https://api.openai.com/v1 --judge-model gpt-4.1 [--judge-key-env OPENAI_API_KEY]
        [--concurrency 8] [--requests-per-second 5] [--json]
    python -m llava.eval.eval_video_qa_judge --pred-path ... --output-dir ... --judge local --judge-model LM_FOLDER
    python -m llava.eval.eval_video_qa_judge --pred-path ... --output-dir ... --judge exact

The rule is Video-LLaVA's ``videollava/eval/video/eval_video_qa.py`` (PKU-YuanGroup/Video-LLaVA@984e65b), itself
Video-ChatGPT's: for each answer line (``id``, ``question``, ``answer``, ``pred``) the judge gets the same system and
user messages (:func:`judge_messages`, verbatim) and must reply with a Python dict string ``{'pred': 'yes'|'no',
'score': N}``, read with ``ast.literal_eval``. Aggregation, quirks included:

* ``count`` = every judged item; ``score_sum += int(score)`` (``int`` truncates: 4.8 counts 4); an item whose score
  ``int()`` rejects (``'4.8'``, a string) is still in ``count`` (the reference increments first) with nothing added
  to the sum and, as the same ``try`` covers both, no yes/no either;
* ``yes`` when ``"yes" in pred.lower()``, else ``no`` when ``"no" in pred.lower()`` (substrings: ``'not sure'``
  counts no), else neither;
* **accuracy** = yes / (yes + no), reported in percent as the paper's tables (the reference prints the fraction);
  **average score** = score_sum / count; items keyed by ``id``: a repeated id is judged once, with its last line,
  as the reference's dict keeps the last.

Deliberate deviations: the reference retries an unparseable or failed reply forever; here each item gets
``--retries`` attempts (HTTP 429/5xx/timeouts back off exponentially), then the run stops with one error naming the
items, and a rerun resumes. The reference sends no temperature (the API default, 1.0); ``--temperature`` is sent
only when given, so the default request is the reference's. Verdicts are cached in ``OUTPUT_DIR/verdicts.jsonl``
by (question, answer, prediction, judge model): a rerun or a killed run resumes without asking again, and a cache
never mixes judges. The report names the judge (backend, model, URL) that produced the numbers.

Judges: ``openai`` (any OpenAI-compatible ``/chat/completions`` endpoint; key from ``--judge-key-env``), ``local``
(a causal-LM folder through transformers, greedy, its chat template when it has one) and ``exact`` (no model: yes
and 5 when the normalised answer is the normalised prediction or one of its words, else no and 0).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from tqdm import tqdm

from ._io import EvalError, check_same_run, cli, read_jsonl

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {pred}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


def judge_messages(question: str, answer: str, pred: str) -> list[dict]:
    """The reference's two chat messages for one item."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer, pred=pred)}]  # fmt: skip


def parse_verdict(text: str) -> dict:
    """``ast.literal_eval`` of the reply, as the reference; a dict with 'pred' and 'score' or ValueError."""
    try:
        verdict = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        raise ValueError(f"not a Python dict string: {text[:80]!r} ({type(err).__name__})") from None
    if not isinstance(verdict, dict) or "pred" not in verdict or "score" not in verdict:
        raise ValueError(f"expected {{'pred': ..., 'score': ...}}, got {text[:80]!r}")
    return verdict


class JudgeError(EvalError):
    """A judge request that failed after its retries."""


@dataclass
class OpenAIJudge:
    """Any OpenAI-compatible chat endpoint (``{url}/chat/completions``), with retries and a request-rate limit."""

    url: str
    model: str
    key: str | None = None
    temperature: float | None = None
    timeout: float = 60.0
    retries: int = 5
    requests_per_second: float | None = None
    backoff: float = 1.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _next: float = 0.0

    @property
    def identity(self) -> dict:
        return {"backend": "openai", "model": self.model, "url": self.url}

    def _wait_turn(self) -> None:
        if not self.requests_per_second:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + 1.0 / self.requests_per_second
        time.sleep(max(0.0, start - now))

    def reply(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = None
        for attempt in range(self.retries + 1):
            self._wait_turn()
            request = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as err:
                if err.code not in (408, 409, 429) and err.code < 500:
                    raise JudgeError(f"{self.url}: HTTP {err.code} {err.reason}; check --judge-url, --judge-model "
                                     "and the API key") from None  # fmt: skip
                last = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise JudgeError(f"{self.url} did not answer after {self.retries + 1} attempts ({last}); check that the "
                         "endpoint is up and --judge-url is right, then rerun (judged items are kept)")  # fmt: skip


@dataclass
class LocalJudge:
    """A causal-LM folder run through transformers (greedy; its chat template when it has one)."""

    path: str
    max_new_tokens: int = 32
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(self.path):
            raise EvalError(f"--judge local needs a model folder as --judge-model, got {self.path!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path).eval()

    @property
    def identity(self) -> dict:
        from ..model.fingerprint import folder_fingerprint

        return {"backend": "local", "model": os.path.abspath(self.path), "fingerprint": folder_fingerprint(self.path)}

    def reply(self, messages: list[dict]) -> str:
        import torch

        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)["input_ids"]  # fmt: skip
        else:
            ids = self.tokenizer("\n\n".join(m["content"] for m in messages) + "\n", return_tensors="pt").input_ids
        with self._lock, torch.inference_mode():  # one generate at a time
            out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)  # fmt: skip
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


class ExactJudge:
    """No model: yes (score 5) when the normalised answer equals the normalised prediction or is one of its words."""

    identity = {"backend": "exact", "model": "exact"}

    def reply(self, messages: list[dict]) -> str:
        fields = dict(re.findall(r"^(Correct Answer|Predicted Answer): (.*)$", messages[1]["content"], re.M))
        answer, pred = _normalize(fields.get("Correct Answer", "")), _normalize(fields.get("Predicted Answer", ""))
        match = bool(answer) and (answer == pred or answer in pred.split())
        return str({"pred": "yes" if match else "no", "score": 5 if match else 0})


def cache_key(question: str, answer: str, pred: str, judge: dict) -> str:
    return hashlib.sha256(json.dumps([question, answer, pred, judge], sort_keys=True).encode()).hexdigest()


def read_cache(path: str, judge: dict) -> dict:
    """{key: verdict} of ``verdicts.jsonl``; a truncated last line (a killed run) is dropped; another judge's
    verdicts are refused."""
    cache = {}
    if not os.path.exists(path):
        return cache
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    good = 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            good += len(raw) + 1
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            if i == len(lines) - 1:  # killed mid-write
                break
            raise EvalError(f"{path}:{i + 1}: corrupt verdict line; delete it (or the file) and rerun") from None
        if rec["judge"] != judge:
            raise EvalError(f"{path} holds verdicts of judge {rec['judge']} but this run uses {judge}; verdicts of "
                            "different judges are never mixed: use another --output-dir")  # fmt: skip
        cache[rec["key"]] = rec["verdict"]
        good += len(raw) + 1
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return cache


def aggregate(verdicts: list[dict]) -> dict:
    """The reference's summary over one verdict per item (see the module docstring). As there, one ``try`` covers
    the score and the yes/no: a score ``int()`` rejects skips the item's yes/no too; a non-string 'pred' keeps the
    score already added but counts neither yes nor no."""
    count = score_sum = yes = no = 0
    for verdict in verdicts:
        count += 1
        try:
            score_sum += int(verdict["score"])
            pred = verdict["pred"].lower()
        except (TypeError, ValueError, AttributeError, KeyError):
            continue
        if "yes" in pred:
            yes += 1
        elif "no" in pred:
            no += 1
    return {"accuracy": 100 * yes / (yes + no) if yes + no else 0.0, "average_score": score_sum / count if count else 0.0,
            "yes": yes, "no": no, "count": count}  # fmt: skip


def judge_file(pred_path: str, output_dir: str, judge, concurrency: int = 4, attempts: int = 3,
               progress: bool = True) -> dict:  # fmt: skip
    """Judge every item of ``pred_path`` (cached, concurrent, resumable) -> the report. Items with the same
    (question, answer, prediction) are asked once; a request that fails after its retries stops the run (the
    requests not yet started are cancelled; every verdict already received is in the cache)."""
    items = {}
    records = read_jsonl(pred_path, "video QA answers", ("id", "question", "answer", "pred"))
    check_same_run(records)
    for r in records:
        items[str(r["id"])] = r  # the reference's dict: one item per id, the last line wins
    os.makedirs(output_dir, exist_ok=True)
    cache_path = os.path.join(output_dir, "verdicts.jsonl")
    identity = judge.identity
    cache = read_cache(cache_path, identity)
    keys = {i: cache_key(str(r["question"]), str(r["answer"]), str(r["pred"]), identity) for i, r in items.items()}
    todo = list({keys[i]: i for i in items if keys[i] not in cache}.values())  # one ask per key
    failed, lock = {}, threading.Lock()

    def one(item_id: str) -> None:
        r = items[item_id]
        messages = judge_messages(r["question"], r["answer"], r["pred"])
        for _ in range(attempts):
            text = judge.reply(messages)
            try:
                verdict = parse_verdict(text)
                break
            except ValueError as err:
                failed[item_id] = str(err)
        else:
            return
        failed.pop(item_id, None)
        with lock, open(cache_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": keys[item_id], "id": item_id, "judge": identity, "verdict": verdict, "raw": text}) + "\n")
            f.flush()
        cache[keys[item_id]] = verdict

    pool = ThreadPoolExecutor(max(1, concurrency))
    try:
        futures = [pool.submit(one, i) for i in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc="judge", disable=not progress,
                           file=sys.stderr):  # fmt: skip
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        listed = "; ".join(f"{i}: {why}" for i, why in list(failed.items())[:5])
        raise EvalError(f"{len(failed)} item(s) got no parseable verdict in {attempts} attempts ({listed}); rerun to "
                        "retry them (the other verdicts are kept)")  # fmt: skip
    report = {**aggregate([cache[keys[i]] for i in items]), "judge": identity, "judged_now": len(todo),
              "pred_path": pred_path, "run": {k: records[0].get(k) for k in ("model_id", "method", "budget")}}  # fmt: skip
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def build_judge(args):
    if args.judge == "exact":
        return ExactJudge()
    if not args.judge_model:
        raise EvalError(f"--judge {args.judge} needs --judge-model (a model name for openai, a folder for local)")
    if args.judge == "local":
        return LocalJudge(args.judge_model)
    if not args.judge_url:
        raise EvalError("--judge openai needs --judge-url, e.g. https://api.openai.com/v1")
    return OpenAIJudge(args.judge_url, args.judge_model, os.environ.get(args.judge_key_env), args.temperature,
                       args.timeout, args.retries, args.requests_per_second)  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pred-path", required=True, help="answers of llava.eval.model_video_qa (merge.jsonl)")
    p.add_argument("--output-dir", required=True, help="verdict cache (verdicts.jsonl) and report.json")
    p.add_argument("--judge", choices=("openai", "local", "exact"), default="openai")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (openai)")
    p.add_argument("--judge-model", help="model name (openai; the paper: gpt-4.1) or causal-LM folder (local)")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--temperature", type=float, default=None, help="sent only when given (the reference sends none)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--requests-per-second", type=float, default=None, help="rate limit (default: none)")
    p.add_argument("--retries", type=int, default=5, help="retries of a failed request (429, 5xx, timeouts)")
    p.add_argument("--attempts", type=int, default=3, help="asks per item when the reply is not a verdict")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line last")
    args = p.parse_args(argv)
    report = judge_file(args.pred_path, args.output_dir, build_judge(args), args.concurrency, args.attempts,
                        progress=not args.no_progress)  # fmt: skip
    j = report["judge"]
    print(f"judge {j['backend']} {j['model']}{' @ ' + j['url'] if 'url' in j else ''}: accuracy {report['accuracy']:.1f} "
          f"(yes {report['yes']}, no {report['no']}), average score {report['average_score']:.2f} over {report['count']} items")  # fmt: skip
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    cli(main)
