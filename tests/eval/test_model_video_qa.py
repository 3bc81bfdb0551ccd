"""llava.eval.model_video_qa on a tiny random Video-LLaVA and videos written with PyAV: Video-LLaVA's layout, run
identity, resume, chunking, --limit, and clear errors."""

import json

import pytest

pytest.importorskip("av")

from learnpruner_ext.tiny import random_image, save_tiny_checkpoint  # noqa: E402
from llava.eval import answer_loop, model_video_qa  # noqa: E402
from llava.video import save_video  # noqa: E402

ANSWERS = ["left", "circle", "three", "red"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """4 questions over 3 videos (video 'v1' asked twice), in Video-LLaVA's test_q.json / test_a.json layout."""
    root = tmp_path_factory.mktemp("video_qa")
    model = save_tiny_checkpoint(root / "model", family="video_llava")
    (root / "videos").mkdir()
    for v in range(3):
        save_video([random_image(10 * v + f, (64, 48)) for f in range(10)], root / "videos" / f"v{v}.mp4", fps=5)
    names = ["v0", "v1", "v1", "v2"]
    questions = [{"video_name": n, "question": f"question {i}?", "question_id": f"q{i}"} for i, n in enumerate(names)]
    (root / "test_q.json").write_text(json.dumps(questions))
    (root / "test_a.json").write_text(json.dumps([{"answer": a, "question_id": f"q{i}"} for i, a in enumerate(ANSWERS)]))
    return root, model


def run(bench, out, *extra):
    root, model = bench
    return model_video_qa.main([
        "--model-path", str(model), "--video-dir", str(root / "videos"), "--gt-file-question", str(root / "test_q.json"),
        "--gt-file-answers", str(root / "test_a.json"), "--answers-file", str(out), "--max_new_tokens", "3",
        "--device", "cpu", "--dtype", "float32", "--no-progress", *extra,
    ])  # fmt: skip


def lines(path):
    return [json.loads(line) for line in open(path)]


def test_answers_in_video_llava_layout_with_run_identity_and_resume(bench, tmp_path):
    out = tmp_path / "a.jsonl"
    summary = run(bench, out, "--pruning-method", "random", "--visual-token-budget", "40", "--batch-size", "3")
    assert (summary.total, summary.generated) == (4, 4)
    recs = lines(out)
    assert [r["id"] for r in recs] == ["q0", "q1", "q2", "q3"] and [r["answer"] for r in recs] == ANSWERS
    assert all(isinstance(r["pred"], str) and r["method"] == "random" and r["budget"] == 40 for r in recs)
    assert recs[0]["image_tokens"] == 8 * 17 and recs[0]["vision_tokens_per_layer"] == [40] * 4
    assert recs[0]["metadata"]["settings"]["num_frames"] == 8
    assert run(bench, out, "--pruning-method", "random", "--visual-token-budget", "40").generated == 0  # resumed
    with pytest.raises(answer_loop.InputError, match="another run"):
        run(bench, out, "--pruning-method", "random", "--visual-token-budget", "20")


def test_batched_answers_equal_single_ones(bench, tmp_path):
    run(bench, tmp_path / "b1.jsonl", "--batch-size", "1")
    run(bench, tmp_path / "b4.jsonl", "--batch-size", "4")
    assert [r["pred"] for r in lines(tmp_path / "b1.jsonl")] == [r["pred"] for r in lines(tmp_path / "b4.jsonl")]


def test_chunks_pair_answers_by_position_in_the_whole_file_and_limit_keeps_the_first(bench, tmp_path):
    """The reference restarts its answer index in every chunk (chunk 1 of 2 would get answers 0 and 1); here
    chunk 1 of 2 holds q2, q3 with their own answers 'three', 'red'. --limit 3 keeps q0..q2 before chunking."""
    run(bench, tmp_path / "c.jsonl", "--num-chunks", "2", "--chunk-idx", "1")
    assert [(r["id"], r["answer"]) for r in lines(tmp_path / "c.jsonl")] == [("q2", "three"), ("q3", "red")]
    run(bench, tmp_path / "l.jsonl", "--limit", "3")
    assert [r["id"] for r in lines(tmp_path / "l.jsonl")] == ["q0", "q1", "q2"]


def test_bad_inputs_get_one_clear_error(bench, tmp_path):
    root, _ = bench
    questions = json.loads((root / "test_q.json").read_text())
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps(questions + [{"video_name": "nope", "question": "?", "question_id": "q9"}]))
    answers = tmp_path / "a.json"
    answers.write_text(json.dumps([{"answer": a} for a in ANSWERS + ["x"]]))
    with pytest.raises(answer_loop.InputError, match=r"1 video\(s\) not found .*nope .*check --video-dir"):
        model_video_qa.load_items(str(bad), str(answers), str(root / "videos"))
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps([{"answer": "a", "question_id": "q1"}, {"answer": "b", "question_id": "q0"}] * 2))
    with pytest.raises(answer_loop.InputError, match="paired by position"):
        model_video_qa.load_items(str(root / "test_q.json"), str(swapped), str(root / "videos"))
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"answer": "a"}]))
    with pytest.raises(answer_loop.InputError, match="1 answers for the 4 questions"):
        model_video_qa.load_items(str(root / "test_q.json"), str(short), str(root / "videos"))


def test_tgif_script_generates_merges_and_judges(bench, tmp_path):
    """scripts/v1_5/eval/tgif.sh CKPT random 40 with LIMIT=3 on Video-LLaVA's layout: answers of the first 3
    questions under answers/3/<ckpt>-random-40/, merged, judged (no JUDGE_ARGS: the exact judge, said so in the
    log) into judge/report.json with the run's identity."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    root, model = bench
    bench_dir = tmp_path / "GPT_Zero_Shot_QA" / "TGIF_Zero_Shot_QA"
    shutil.copytree(root / "videos", bench_dir / "mp4")
    for name in ("test_q.json", "test_a.json"):
        shutil.copy(root / name, bench_dir / name)
    env = {k: v for k, v in os.environ.items() if k not in ("JUDGE_ARGS", "METHOD", "BUDGET", "CKPT", "LPM")}
    env.update(EVAL_ROOT=str(tmp_path), CUDA_VISIBLE_DEVICES="", LIMIT="3", OMP_NUM_THREADS="1",
               EXTRA_ARGS="--device cpu --max_new_tokens 3 --batch-size 2 --no-progress")  # fmt: skip
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["bash", "scripts/v1_5/eval/tgif.sh", str(model), "random", "40"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "judge: exact matching" in proc.stdout + proc.stderr
    run_dir = bench_dir / "answers" / "3" / f"{model.name}-random-40"
    assert [r["id"] for r in lines(run_dir / "merge.jsonl")] == ["q0", "q1", "q2"]
    report = json.loads((run_dir / "judge" / "report.json").read_text())
    assert report["count"] == 3 and report["judge"]["backend"] == "exact"
    assert report["run"]["method"] == "random" and report["run"]["budget"] == 40
