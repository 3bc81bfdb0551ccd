"""llava.eval.eval_video_qa_judge: the reference's judge request and aggregation (Video-LLaVA@984e65b
``videollava/eval/video/eval_video_qa.py``), against a fake OpenAI-compatible server on 127.0.0.1 started here."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llava.eval import eval_video_qa_judge as judge_mod
from llava.eval._io import EvalError

ROOT = Path(__file__).resolve().parents[2]


class FakeOpenAI:
    """``POST /v1/chat/completions``: records each request body; answers ``{'pred': 'yes', 'score': 4.8}`` when
    the user message's correct answer equals its prediction, else ``{'pred': 'no', 'score': 1}``. ``fail`` is a list
    of HTTP codes returned (in order) before any real answer; ``delay`` seconds per request."""

    def __init__(self, fail=(), delay=0.0, reply=None):
        self.requests, self.fail, self.delay, self.reply = [], list(fail), delay, reply
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    code = fake.fail.pop(0) if fake.fail else 200
                time.sleep(fake.delay)
                if code != 200:
                    self.send_response(code)
                    self.end_headers()
                    return
                user = body["messages"][1]["content"]
                answer = re.search(r"^Correct Answer: (.*)$", user, re.M).group(1)
                pred = re.search(r"^Predicted Answer: (.*)$", user, re.M).group(1)
                text = fake.reply(answer, pred) if fake.reply else (
                    "{'pred': 'yes', 'score': 4.8}" if answer == pred else "{'pred': 'no', 'score': 1}")
                out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(**kw):
        servers.append(FakeOpenAI(**kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def write_preds(path, rows, **run):
    run = run or {"method": "learnpruner", "budget": 456, "model_id": "m", "model_fingerprint": "f"}
    with open(path, "w") as f:
        for i, (q, a, p) in enumerate(rows):
            f.write(json.dumps({"id": f"v{i}", "question": q, "answer": a, "pred": p, **run}) + "\n")
    return str(path)


def openai_judge(server, **kw):
    return judge_mod.OpenAIJudge(server.url, "gpt-4.1", key="sk-test", backoff=0.01, **kw)


def test_request_is_the_reference_prompt(fake, tmp_path):
    """One item -> one POST to {url}/chat/completions with model, the reference's system message and user message
    (question, correct answer, predicted answer on their own lines), the bearer key, and no temperature (the
    reference sends none)."""
    server = fake()
    preds = write_preds(tmp_path / "p.jsonl", [("what is the man doing?", "dance", "dancing")])
    report = judge_mod.judge_file(preds, str(tmp_path / "j"), openai_judge(server), progress=False)
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert set(body) == {"model", "messages"} and body["model"] == "gpt-4.1"
    system, user = body["messages"]
    assert system["role"] == "system" and system["content"].startswith("You are an intelligent chatbot")
    assert "Consider synonyms or paraphrases as valid matches." in system["content"]
    assert user["role"] == "user" and (
        "Question: what is the man doing?\nCorrect Answer: dance\nPredicted Answer: dancing\n\n" in user["content"])
    assert user["content"].endswith("{'pred': 'yes', 'score': 4.8}.")  # the reference's f-string braces, once
    assert report["count"] == 1 and report["no"] == 1 and report["judge"]["model"] == "gpt-4.1"


def test_temperature_is_sent_only_when_given(fake, tmp_path):
    server = fake()
    preds = write_preds(tmp_path / "p.jsonl", [("q", "a", "a")])
    judge_mod.judge_file(preds, str(tmp_path / "j"), openai_judge(server, temperature=0.0), progress=False)
    assert server.requests[0]["body"]["temperature"] == 0.0


def test_retries_429_and_500_then_succeeds(fake, tmp_path):
    """429, 500, 503 then an answer: four requests, one verdict."""
    server = fake(fail=[429, 500, 503])
    preds = write_preds(tmp_path / "p.jsonl", [("q", "cat", "cat")])
    report = judge_mod.judge_file(preds, str(tmp_path / "j"), openai_judge(server, retries=3), progress=False)
    assert len(server.requests) == 4 and report["yes"] == 1


def test_gives_up_after_retries_with_one_error(fake, tmp_path):
    """Always 500, retries=2: 3 requests, then one error naming the endpoint and the rerun; 401 is not retried."""
    server = fake(fail=[500] * 10)
    preds = write_preds(tmp_path / "p.jsonl", [("q", "cat", "cat")])
    with pytest.raises(EvalError, match=r"did not answer after 3 attempts \(HTTP 500\).*rerun"):
        judge_mod.judge_file(preds, str(tmp_path / "j"), openai_judge(server, retries=2), progress=False)
    assert len(server.requests) == 3
    server401 = fake(fail=[401] * 10)
    with pytest.raises(EvalError, match="HTTP 401"):
        judge_mod.judge_file(preds, str(tmp_path / "k"), openai_judge(server401, retries=5), progress=False)
    assert len(server401.requests) == 1


def test_cache_means_no_requests_on_rerun_and_never_mixes_judges(fake, tmp_path):
    """Five items, two of them the same (question, answer, pred): four requests; the rerun sends none and gives
    the same report; another judge model on the same output dir is refused."""
    server = fake()
    rows = [("q1", "a", "a"), ("q2", "b", "c"), ("q3", "d", "d"), ("q1", "a", "a"), ("q5", "e", "f")]
    preds = write_preds(tmp_path / "p.jsonl", rows)
    first = judge_mod.judge_file(preds, str(tmp_path / "j"), openai_judge(server, requests_per_second=50),
                                 concurrency=3, progress=False)  # fmt: skip
    assert len(server.requests) == 4 and first["judged_now"] == 4
    again = judge_mod.judge_file(preds, str(tmp_path / "j"), openai_judge(server), progress=False)
    assert len(server.requests) == 4 and again["judged_now"] == 0
    assert {k: again[k] for k in ("accuracy", "average_score", "count")} == {
        k: first[k] for k in ("accuracy", "average_score", "count")}
    other = judge_mod.OpenAIJudge(server.url, "gpt-4o", backoff=0.01)
    with pytest.raises(EvalError, match="never mixed"):
        judge_mod.judge_file(preds, str(tmp_path / "j"), other, progress=False)


def test_aggregation_follows_the_reference_by_hand(fake, tmp_path):
    """Replies per prediction (the reference's loop: count += 1; score = int(score); sum += score; then 'yes' in
    pred.lower() -> yes, elif 'no' in pred.lower() -> no, all in one try):

    ======  =======================================  =====  =====  ===
    pred    reply                                    count  sum    y/n
    ======  =======================================  =====  =====  ===
    p0      {'pred': 'yes', 'score': 4.8}            1      +4     yes
    p1      {'pred': 'Yes', 'score': 5}              1      +5     yes
    p2      {'pred': 'no', 'score': 2}               1      +2     no
    p3      {'pred': 'not sure', 'score': 3}         1      +3     no ('no' in 'not sure')
    p4      {'pred': 'maybe', 'score': 1}            1      +1     neither
    p5      {'pred': 'yes', 'score': '4.8'}          1      +0     neither (int('4.8') raises)
    ======  =======================================  =====  =====  ===

    count 6, sum 15 -> average score 15/6 = 2.5; accuracy = yes/(yes+no) = 2/4 = 50.0 %."""
    replies = {"p0": "{'pred': 'yes', 'score': 4.8}", "p1": "{'pred': 'Yes', 'score': 5}",
               "p2": "{'pred': 'no', 'score': 2}", "p3": "{'pred': 'not sure', 'score': 3}",
               "p4": "{'pred': 'maybe', 'score': 1}", "p5": "{'pred': 'yes', 'score': '4.8'}"}  # fmt: skip
    server = fake(reply=lambda answer, pred: replies[pred])
    preds = write_preds(tmp_path / "p.jsonl", [(f"q{i}", "a", f"p{i}") for i in range(6)])
    report = judge_mod.judge_file(preds, str(tmp_path / "j"), openai_judge(server), progress=False)
    assert (report["count"], report["yes"], report["no"]) == (6, 2, 2)
    assert report["average_score"] == pytest.approx(2.5) and report["accuracy"] == pytest.approx(50.0)
    saved = json.loads((tmp_path / "j" / "report.json").read_text())
    assert saved["accuracy"] == report["accuracy"] and saved["run"]["method"] == "learnpruner"


def test_unparseable_reply_is_retried_then_reported(fake, tmp_path):
    """A reply that is not a dict string is asked again (attempts=2), then one error names the item."""
    server = fake(reply=lambda answer, pred: "The answer is correct.")
    preds = write_preds(tmp_path / "p.jsonl", [("q", "a", "a")])
    with pytest.raises(EvalError, match=r"1 item\(s\) got no parseable verdict in 2 attempts \(v0: not a Python"):
        judge_mod.judge_file(preds, str(tmp_path / "j"), openai_judge(server), attempts=2, progress=False)
    assert len(server.requests) == 2


def test_mixed_runs_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    write_preds(path, [("q", "a", "a")])
    with open(path, "a") as f:
        f.write(json.dumps({"id": "x", "question": "q", "answer": "a", "pred": "a", "method": "fastv",
                            "budget": 456, "model_id": "m", "model_fingerprint": "f"}) + "\n")  # fmt: skip
    with pytest.raises(EvalError, match="mixes answers"):
        judge_mod.judge_file(str(path), str(tmp_path / "j"), judge_mod.ExactJudge(), progress=False)


def test_truncated_last_verdict_line_is_dropped(tmp_path):
    """A run killed mid-write leaves half a line: it is cut off and that item is judged again."""
    preds = write_preds(tmp_path / "p.jsonl", [("q0", "a", "a"), ("q1", "b", "c")])
    out = tmp_path / "j"
    judge_mod.judge_file(preds, str(out), judge_mod.ExactJudge(), progress=False)
    lines = (out / "verdicts.jsonl").read_text().splitlines()
    (out / "verdicts.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    report = judge_mod.judge_file(preds, str(out), judge_mod.ExactJudge(), progress=False)
    assert report["judged_now"] == 1 and report["count"] == 2
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == 2


def test_kill_and_resume_loses_and_duplicates_nothing(fake, tmp_path):
    """The CLI in a subprocess, 24 items at 0.15 s per request, concurrency 2: SIGKILL once at least 6 verdicts
    are on disk, rerun to the end. The verdict file then holds each item exactly once, the rerun asked only for
    items without a verdict, and every item was asked at most twice (once more only if it was in flight)."""
    server = fake(delay=0.15)
    rows = [(f"q{i}", "a", "a" if i % 3 else "b") for i in range(24)]
    preds = write_preds(tmp_path / "p.jsonl", rows)
    out = tmp_path / "j"
    cmd = [sys.executable, "-m", "llava.eval.eval_video_qa_judge", "--pred-path", preds, "--output-dir", str(out),
           "--judge-url", server.url, "--judge-model", "gpt-4.1", "--concurrency", "2", "--no-progress", "--json"]
    env = dict(os.environ, OPENAI_API_KEY="sk-test")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache = out / "verdicts.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (cache.exists() and len(cache.read_text().splitlines()) >= 6):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {json.loads(line)["id"] for line in cache.read_text().splitlines() if line.strip().endswith("}")}
    assert 6 <= len(done_before) < 24
    asked_before = len(server.requests)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = [json.loads(line)["id"] for line in cache.read_text().splitlines()]
    assert sorted(ids) == sorted(f"v{i}" for i in range(24))  # all there, none twice
    asked_after = [r["body"]["messages"][1]["content"] for r in server.requests[asked_before:]]
    assert len(asked_after) == 24 - len(done_before)
    assert not any(f"Question: q{v[1:]}\n" in m for v in done_before for m in asked_after)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # i % 3 == 0 -> pred "b" != "a" -> no: i = 0, 3, ..., 21 -> 8 no, 16 yes; score 16 * 4 + 8 * 1 = 72 over 24
    assert (report["yes"], report["no"], report["count"]) == (16, 8, 24)
    assert report["average_score"] == pytest.approx(3.0) and report["judged_now"] == 24 - len(done_before)


def test_exact_judge_and_cli_report(tmp_path, capsys):
    """exact: yes/5 when the normalised answer is the prediction or one of its words ('Left.' -> 'left'), else
    no/0. Items: (left, 'Left.') yes, (left, 'to the left') yes, (red circle, 'red') no -> accuracy 2/3 = 66.7,
    score 10/3 = 3.33."""
    preds = write_preds(tmp_path / "p.jsonl", [("q0", "left", "Left."), ("q1", "left", "to the left"),
                                               ("q2", "red circle", "red")])  # fmt: skip
    report = judge_mod.main(["--pred-path", preds, "--output-dir", str(tmp_path / "j"), "--judge", "exact",
                             "--no-progress"])  # fmt: skip
    assert (report["yes"], report["no"]) == (2, 1) and report["average_score"] == pytest.approx(10 / 3)
    assert "judge exact exact: accuracy 66.7 (yes 2, no 1), average score 3.33 over 3 items" in capsys.readouterr().out


def test_bad_arguments_give_one_line(tmp_path):
    preds = write_preds(tmp_path / "p.jsonl", [("q", "a", "a")])
    base = [sys.executable, "-m", "llava.eval.eval_video_qa_judge", "--pred-path", preds, "--output-dir",
            str(tmp_path / "j")]  # fmt: skip
    for extra, message in ((["--judge-model", "gpt-4.1"], "--judge openai needs --judge-url"),
                           (["--judge", "local"], "--judge local needs --judge-model"),
                           (["--judge", "local", "--judge-model", str(tmp_path / "nope")], "needs a model folder")):  # fmt: skip
        result = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.strip().startswith("error:"), result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_local_judge_is_a_causal_lm_folder(tmp_path):
    """A tiny random Llama saved here: LocalJudge's reply is the greedy continuation of the two messages (no chat
    template: joined by blank lines), the same tokens as calling generate directly; its identity carries the
    folder's fingerprint, so retraining the judge never reuses its cache."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learnpruner_ext.tiny import build_sp_tokenizer

    tokenizer = build_sp_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    folder = tmp_path / "judge"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    judge = judge_mod.LocalJudge(str(folder), max_new_tokens=6)
    messages = judge_mod.judge_messages("q", "left", "right")
    ids = tokenizer("\n\n".join(m["content"] for m in messages) + "\n", return_tensors="pt").input_ids
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        direct = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert judge.reply(messages) == tokenizer.decode(direct[0, ids.shape[1] :], skip_special_tokens=True)
    identity = judge.identity
    assert identity["backend"] == "local" and len(identity["fingerprint"]) == 16
    with pytest.raises(ValueError):
        judge_mod.parse_verdict(judge.reply(messages) + " ) not a dict")
    assert ast.literal_eval(judge_mod.ExactJudge().reply(messages)) == {"pred": "no", "score": 0}
