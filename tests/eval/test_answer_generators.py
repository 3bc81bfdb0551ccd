"""Answer generators (llava/eval/model_vqa_{loader,science,mmbench}.py + answer_loop.py) on a tiny model:
batching equals batch size 1, resume after an interruption, and input errors before any model work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llava.eval import answer_loop, eval_mmbench, model_vqa_loader, model_vqa_mmbench, model_vqa_science
from llava.eval.answer_loop import InputError, get_chunk
from llava.model.fingerprint import folder_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gen_args(ckpt, lpm, answers, method="learnpruner", budget=8, batch=1, tokens=4):
    argv = ["--model-path", str(ckpt), "--answers-file", str(answers), "--temperature", "0", "--conv-mode",
            "vicuna_v1", "--max_new_tokens", str(tokens), "--device", "cpu", "--batch-size", str(batch),
            "--no-progress", "--pruning-method", method]
    if budget is not None:
        argv += ["--visual-token-budget", str(budget)]
    if method == "learnpruner":
        argv += ["--lpm-path", str(lpm)]
    return argv


def mme_args(root):
    return ["--question-file", str(root / "MME" / "llava_mme.jsonl"),
            "--image-folder", str(root / "MME" / "MME_Benchmark_release_version")]


def sqa_args(root):
    return ["--question-file", str(root / "scienceqa" / "llava_test_CQM-A.json"),
            "--image-folder", str(root / "scienceqa" / "images" / "test"), "--single-pred-prompt"]


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def by_key(lines, key):
    keys = [key(r) for r in lines]
    assert len(keys) == len(set(keys)), "duplicate answers"
    return {key(r): r for r in lines}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a generator gets as far as loading the model."""
    import llava.model.builder as builder

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input error was raised")

    monkeypatch.setattr(builder, "load_pretrained_model", boom)


# ------------------------------------------------------------------------------------------ batching
def test_loader_batch4_equals_batch1(tiny_ckpt, tiny_lpm, eval_root, tmp_path):
    """MME: question ids repeat (two questions per image), images of different sizes, learnpruner two-stage."""
    a1, a4 = tmp_path / "b1.jsonl", tmp_path / "b4.jsonl"
    model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, a1, batch=1) + mme_args(eval_root))
    s = model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, a4, batch=4) + mme_args(eval_root))
    assert s.generated == 6
    r1, r4 = by_key(read(a1), model_vqa_loader.answer_key), by_key(read(a4), model_vqa_loader.answer_key)
    assert len(r1) == 6 and r1.keys() == r4.keys()
    for k in r1:
        assert r1[k]["text"] == r4[k]["text"]
        assert r1[k]["vision_tokens_per_layer"] == r4[k]["vision_tokens_per_layer"] == [12, 12, 4, 4]
    line = r4[next(iter(r4))]
    assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata", "method", "budget",
            "vision_tokens_per_layer", "r1", "r2", "convention"} <= set(line)
    assert (line["method"], line["budget"], line["r1"], line["r2"], line["convention"]) == ("learnpruner", 8, 12, 4, "average")
    assert line["model_id"] == "tiny-llava"


def test_science_text_only_and_batching(tiny_ckpt, tiny_lpm, eval_root, tmp_path):
    a1, a3 = tmp_path / "b1.jsonl", tmp_path / "b3.jsonl"
    model_vqa_science.main(gen_args(tiny_ckpt, tiny_lpm, a1, batch=1) + sqa_args(eval_root))
    model_vqa_science.main(gen_args(tiny_ckpt, tiny_lpm, a3, batch=3) + sqa_args(eval_root))
    r1, r3 = by_key(read(a1), model_vqa_science.answer_key), by_key(read(a3), model_vqa_science.answer_key)
    assert set(r1) == set(r3) == {(str(i),) for i in range(10, 15)}
    assert {k: v["text"] for k, v in r1.items()} == {k: v["text"] for k, v in r3.items()}
    suffix = "\nAnswer with the option's letter from the given choices directly."
    with_image, text_only = r1[("10",)], r1[("11",)]
    assert with_image["prompt"].startswith("<image>\nContext:") and with_image["prompt"].endswith(suffix)
    assert text_only["prompt"].startswith("Context:") and text_only["prompt"].endswith(suffix)
    assert text_only["metadata"]["text_only"] and text_only["vision_tokens_per_layer"] == [0, 0, 0, 0]
    assert with_image["vision_tokens_per_layer"] == [12, 12, 4, 4]


def test_mmbench_all_rounds_schema(tiny_ckpt, tiny_lpm, eval_root, tmp_path):
    tsv = eval_root / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv"
    out = tmp_path / "mmb.jsonl"
    args = ["--question-file", str(tsv), "--single-pred-prompt", "--all-rounds", "--lang", "cn"]
    model_vqa_mmbench.main(gen_args(tiny_ckpt, tiny_lpm, out, batch=3) + args)
    lines = read(out)
    assert len(lines) == 2 + 3 + 4 + 2  # one round per option
    row3 = [r for r in lines if r["question_id"] == 2]
    assert [r["round_id"] for r in row3] == [0, 1, 2, 3]
    assert row3[1]["options"] == ["green", "blue", "yellow", "red"] and row3[1]["option_char"] == ["B", "C", "D", "A"]
    assert row3[1]["prompt"].endswith("\nA. green\nB. blue\nC. yellow\nD. red")
    hinted = [r for r in lines if r["question_id"] == 1][0]
    assert hinted["prompt"].startswith("A hint.\n")
    # the scorer accepts the lines as they are
    header, rows = eval_mmbench.read_tsv(str(tsv))
    from llava.eval._io import read_jsonl

    metrics, _ = eval_mmbench.score_mmbench(read_jsonl(str(out)), rows)
    assert metrics["n"] == 4 and metrics["missing"] == 0 and metrics["incomplete_rounds"] == 0


# ------------------------------------------------------------------------------------------ chunks
def test_get_chunk_partitions():
    items = list(range(10))
    chunks = [get_chunk(items, 3, k) for k in range(3)]
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # upstream: ceil(10 / 3) per chunk
    assert [get_chunk([1, 2], 4, k) for k in range(4)] == [[1], [2], [], []]
    with pytest.raises(InputError, match="chunk-idx"):
        get_chunk(items, 2, 2)


def test_chunks_cover_all_questions(tiny_ckpt, tiny_lpm, eval_root, tmp_path):
    full = tmp_path / "full.jsonl"
    model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, full, batch=4) + mme_args(eval_root))
    merged = []
    for k in range(4):  # 6 questions in 4 chunks of 2: the last chunk is empty but its file exists
        part = tmp_path / f"4_{k}.jsonl"
        model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, part, batch=4) + mme_args(eval_root)
                              + ["--num-chunks", "4", "--chunk-idx", str(k)])
        merged += read(part)
    key = model_vqa_loader.answer_key
    assert {key(r): r["text"] for r in merged} == {key(r): r["text"] for r in read(full)}
    assert len(merged) == 6 and os.path.getsize(tmp_path / "4_3.jsonl") == 0


# ------------------------------------------------------------------------------------------ resume
def test_resume_drops_truncated_last_line(tiny_ckpt, tiny_lpm, eval_root, tmp_path):
    ref = tmp_path / "ref.jsonl"
    model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, ref, batch=2) + mme_args(eval_root))
    lines = ref.read_text(encoding="utf-8").splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2], encoding="utf-8")  # killed mid-write
    s = model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, part, batch=2) + mme_args(eval_root))
    assert (s.already, s.generated) == (2, 4)
    key = model_vqa_loader.answer_key
    got = by_key(read(part), key)  # parses: the partial line is gone; no duplicates
    assert {k: r["text"] for k, r in got.items()} == {key(r): r["text"] for r in read(ref)}
    s = model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, part, batch=2) + mme_args(eval_root))
    assert (s.already, s.generated) == (6, 0)  # complete: nothing to do

    # a complete last record that only lacks its newline is kept
    part.write_text("".join(lines[:3]).rstrip("\n"), encoding="utf-8")
    s = model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, part, batch=2) + mme_args(eval_root))
    assert (s.already, s.generated) == (3, 3) and len(by_key(read(part), key)) == 6


def test_resume_after_sigkill(tiny_ckpt, tiny_lpm, eval_root, tmp_path):
    """Kill model_vqa_loader (SIGKILL) after its first answers, restart: all ids answered exactly once."""
    src = [json.loads(x) for x in open(eval_root / "pope" / "llava_pope_test.jsonl")]
    questions = [dict(src[i % len(src)], question_id=1000 + i) for i in range(20)]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "answers.jsonl"
    argv = gen_args(tiny_ckpt, tiny_lpm, answers, batch=1, tokens=16) + [
        "--question-file", str(qfile), "--image-folder", str(eval_root / "pope" / "val2014")]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llava.eval.model_vqa_loader", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if answers.exists() and answers.read_text().count("\n") >= 2:
                break
            time.sleep(0.05)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = answers.read_text().count("\n")
    s = model_vqa_loader.main(argv + ["--batch-size", "4"])  # the batch size is not part of a run's identity
    ids = [r["question_id"] for r in read(answers)]
    assert sorted(ids) == [1000 + i for i in range(20)]  # none missing, none twice
    if killed:
        assert before < 20 and s.already == before and s.generated == 20 - before


# ------------------------------------------------------------------------------------------ errors
def test_refuses_answers_of_another_run(tiny_ckpt, tiny_lpm, eval_root, tmp_path):
    answers = tmp_path / "a.jsonl"
    model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, answers, method="none", budget=None, batch=4) + mme_args(eval_root))
    with pytest.raises(InputError, match=r"another run.*method='none'.*method='learnpruner' budget=8"):
        model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, answers, budget=8) + mme_args(eval_root))
    answers.write_text("")
    model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, answers, budget=8, batch=4) + mme_args(eval_root))
    content = answers.read_text()
    with pytest.raises(InputError, match="budget=4"):
        model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, answers, budget=4) + mme_args(eval_root))
    with pytest.raises(InputError, match="max_new_tokens: file 4 vs now 5"):
        model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, answers, budget=8, tokens=5) + mme_args(eval_root))
    assert answers.read_text() == content  # the refused runs changed nothing


def test_refuses_another_model_of_the_same_name(tiny_ckpt, tiny_lpm, eval_root, tmp_path):
    """Two checkpoints both called tiny-llava (same shapes, other weights) never share an answers file; a copy of
    the same checkpoint elsewhere does (the fingerprint covers content, not location)."""
    import shutil

    from learnpruner_ext.tiny import save_tiny_checkpoint

    copy = shutil.copytree(tiny_ckpt, tmp_path / "copy" / "tiny-llava")
    other = save_tiny_checkpoint(tmp_path / "other" / "tiny-llava", format="hf", seed=1, text_layers=4, image_size=56)
    assert folder_fingerprint(copy) == folder_fingerprint(tiny_ckpt) != folder_fingerprint(other)
    answers = tmp_path / "a.jsonl"
    model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, answers, batch=4) + mme_args(eval_root))
    content = answers.read_text()
    assert {r["model_fingerprint"] for r in read(answers)} == {folder_fingerprint(tiny_ckpt)}
    s = model_vqa_loader.main(gen_args(copy, tiny_lpm, answers) + mme_args(eval_root))
    assert s.generated == 0 and s.already == s.total  # the same weights: resumed, nothing redone
    with pytest.raises(InputError, match=rf"another run.*model_fingerprint='{folder_fingerprint(tiny_ckpt)}'.*"
                                         rf"model_fingerprint='{folder_fingerprint(other)}'"):
        model_vqa_loader.main(gen_args(other, tiny_lpm, answers) + mme_args(eval_root))
    assert answers.read_text() == content


def test_run_identity_is_the_pruning_config(tiny_ckpt, tiny_lpm, eval_root, tmp_path, monkeypatch):
    """metadata.settings.pruning is asdict(PruningConfig) + the LPM's fingerprint; a resume with another value of
    any field, or with the LPM retrained in place, is refused naming the key; for method none they do not matter."""
    import shutil
    from dataclasses import asdict

    import torch

    import llava.model.builder as builder
    from learnpruner_ext import LearnablePruningModule, PruningConfig

    lpm = shutil.copytree(tiny_lpm, tmp_path / "lpm")
    answers = tmp_path / "a.jsonl"
    model_vqa_loader.main(gen_args(tiny_ckpt, lpm, answers, batch=4) + mme_args(eval_root))
    settings = read(answers)[0]["metadata"]["settings"]
    config = PruningConfig("learnpruner", 8, lpm_path=str(lpm))
    identity = {k: v for k, v in asdict(config).items() if k != "atp_path"}  # left out when unset (older files resume)
    assert settings["pruning"] == {**identity, "lpm_fingerprint": folder_fingerprint(lpm)}
    assert settings["max_new_tokens"] == 4 and settings["conv_mode"] == "vicuna_v1"
    content = answers.read_text()
    monkeypatch.setattr(builder, "load_pretrained_model", lambda *a, **k: pytest.fail("model loaded"))
    for extra, key in [(["--pruning-ratio", "2"], "pruning.ratio: file 3.0 vs now 2.0"),
                       (["--pruning-layer", "2"], "pruning.layer: file None vs now 2"),
                       (["--position-mode", "original"], "pruning.position_mode: file 'contiguous' vs now 'original'"),
                       (["--method-option", "hidden_features=256"], r"pruning.options: file \{\} vs now \{.hidden_features.: 256\}")]:
        with pytest.raises(InputError, match=rf"other settings \({key}"):
            model_vqa_loader.main(gen_args(tiny_ckpt, lpm, answers) + mme_args(eval_root) + extra)
    torch.manual_seed(5)
    retrained = LearnablePruningModule(32, 16)
    retrained.trained = True
    retrained.save_pretrained(lpm)  # same folder, other weights
    with pytest.raises(InputError, match=r"other settings \(pruning.lpm_fingerprint: file '[0-9a-f]+' vs now '[0-9a-f]+'\)"):
        model_vqa_loader.main(gen_args(tiny_ckpt, lpm, answers) + mme_args(eval_root))
    assert answers.read_text() == content
    monkeypatch.undo()
    none = tmp_path / "none.jsonl"
    model_vqa_loader.main(gen_args(tiny_ckpt, lpm, none, method="none", budget=None, batch=4) + mme_args(eval_root))
    assert "pruning" not in read(none)[0]["metadata"]["settings"]
    s = model_vqa_loader.main(gen_args(tiny_ckpt, lpm, none, method="none", budget=None) + mme_args(eval_root)
                              + ["--pruning-ratio", "2", "--pruning-seed", "3"])
    assert s.generated == 0 and s.already == 6  # hyper-parameters of a method that does nothing do not matter


def test_answer_api_needs_the_pruning_attached(tiny_ckpt, eval_root, tmp_path):
    """answer(loaded=...) does not attach pruning itself (the sweep attaches it once): a mismatch is an error."""
    from learnpruner_ext import PruningConfig, apply_pruning
    from llava.inference import GenerationSettings
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_ckpt), device="cpu")
    apply_pruning(model, PruningConfig("vispruner", 8))
    task = model_vqa_loader.task(argparse_namespace(question_file=str(eval_root / "pope" / "llava_pope_test.jsonl"),
                                                    image_folder=str(eval_root / "pope" / "val2014")))
    with pytest.raises(ValueError, match="the loaded model carries pruning .*vispruner.* but this run asks for .*random"):
        answer_loop.answer(task, str(tmp_path / "a.jsonl"), PruningConfig("random", 8), GenerationSettings(),
                           conv_mode="vicuna_v1", model_path=str(tiny_ckpt), loaded=(tokenizer, model, processor))
    s = answer_loop.answer(task, str(tmp_path / "b.jsonl"), PruningConfig("vispruner", 8),
                           GenerationSettings(max_new_tokens=2), conv_mode="vicuna_v1", model_path=str(tiny_ckpt),
                           loaded=(tokenizer, model, processor), batch_size=3, progress=False)
    assert s.generated == 6 and {(r["method"], r["budget"], r["r1"]) for r in read(s.answers_file)} == {("vispruner", 8, 8)}


def argparse_namespace(**kw):
    import argparse

    return argparse.Namespace(num_chunks=1, chunk_idx=0, **kw)


def test_answers_file_is_a_folder(tiny_ckpt, tiny_lpm, eval_root, tmp_path, no_model):
    with pytest.raises(InputError, match=r"--answers-file .* is a folder; give a file path"):
        model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, tmp_path) + mme_args(eval_root))


def test_malformed_question_line(eval_root, tmp_path, no_model, tiny_ckpt, tiny_lpm):
    lines = (eval_root / "MME" / "llava_mme.jsonl").read_text().splitlines()
    bad = tmp_path / "q.jsonl"
    bad.write_text("\n".join(lines[:3] + ['{"question_id": "x", "image": "a.png", "text": "Is'] + lines[3:]) + "\n")
    with pytest.raises(InputError, match=r"q\.jsonl:4: malformed question line"):
        model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, tmp_path / "a.jsonl") +
                              ["--question-file", str(bad), "--image-folder", str(eval_root / "MME")])
    bad.write_text(lines[0] + "\n" + json.dumps({"question_id": 1, "text": "no image key"}) + "\n")
    with pytest.raises(InputError, match=r"q\.jsonl:2: .*lacks key\(s\) \['image'\]"):
        model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, tmp_path / "a.jsonl") + ["--question-file", str(bad)])
    assert not (tmp_path / "a.jsonl").exists()


def test_missing_image_named_before_generation(eval_root, tmp_path, no_model, tiny_ckpt, tiny_lpm):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "COCO_val2014_000000000000.jpg", "text": "?"}) + "\n"
                 + json.dumps({"question_id": 2, "image": "nope.jpg", "text": "?"}) + "\n")
    with pytest.raises(InputError, match=r"1 image file\(s\) not found: .*val2014/nope\.jpg \(.*q\.jsonl:2\)"):
        model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, tmp_path / "a.jsonl") +
                              ["--question-file", str(q), "--image-folder", str(eval_root / "pope" / "val2014")])


def test_science_and_mmbench_bad_input(eval_root, tmp_path, no_model, tiny_ckpt, tiny_lpm):
    sqa = json.loads((eval_root / "scienceqa" / "llava_test_CQM-A.json").read_text())
    bad = tmp_path / "sqa.json"
    bad.write_text(json.dumps(sqa[:2] + [{"id": "99"}]))
    with pytest.raises(InputError, match=r"entry 2 \(id '99'\).*conversations"):
        model_vqa_science.main(gen_args(tiny_ckpt, tiny_lpm, tmp_path / "a.jsonl") + ["--question-file", str(bad)])
    tsv = (eval_root / "mmbench" / "mmbench_dev_20230712.tsv").read_text().splitlines()
    cells = tsv[2].split("\t")
    cells[9] = "not*base64!"
    (tmp_path / "m.tsv").write_text("\n".join([tsv[0], tsv[1], "\t".join(cells)] + tsv[3:]) + "\n")
    with pytest.raises(InputError, match=r"m\.tsv:3: the 'image' cell is not valid base64"):
        model_vqa_mmbench.main(gen_args(tiny_ckpt, tiny_lpm, tmp_path / "a.jsonl") + ["--question-file", str(tmp_path / "m.tsv")])


def test_answers_for_other_questions_refused(tiny_ckpt, tiny_lpm, eval_root, tmp_path, no_model):
    ok = tmp_path / "ok.jsonl"
    line = {"question_id": "elsewhere/1.png", "prompt": "?", "text": "yes", "method": "learnpruner", "budget": 8,
            "model_id": "tiny-llava", "model_fingerprint": folder_fingerprint(tiny_ckpt)}
    ok.write_text(json.dumps(line) + "\n")
    with pytest.raises(InputError, match="not in this chunk of the question file"):
        model_vqa_loader.main(gen_args(tiny_ckpt, tiny_lpm, ok) + mme_args(eval_root))


def test_cli_error_exit(tmp_path, monkeypatch, capsys):
    """The CLI entry point turns input errors into one line on stderr and exit code 1 (no traceback)."""
    q = tmp_path / "q.jsonl"
    q.write_text("{not json\n")
    monkeypatch.setattr(sys, "argv", ["model_vqa_loader", "--question-file", str(q), "--answers-file", str(tmp_path / "a")])
    with pytest.raises(SystemExit) as exc:
        answer_loop.cli(model_vqa_loader.main)
    assert str(exc.value).startswith(f"error: {q}:1: malformed question line")
