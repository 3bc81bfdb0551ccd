"""scripts/v1_5/eval/<bench>.sh end to end on a tiny model and a mini benchmark suite (EVAL_ROOT in tmp):
answers generated (chunked where CUDA_VISIBLE_DEVICES lists several devices), merged, scored, metrics written.
The scripts run once, in parallel, in the session fixture `script_runs` (conftest.py)."""

from __future__ import annotations

import json

import pytest

from minibench import SCRIPT_CASES as CASES


@pytest.mark.parametrize("bench", list(CASES))
def test_script_end_to_end(bench, script_runs):
    results, root = script_runs
    rc, output = results[bench]
    assert rc == 0, output[-3000:]
    folder, split, n_questions, metric = CASES[bench]
    method, budget = ("none", None) if bench == "textvqa" else ("learnpruner", 8)
    run = f"tiny-llava-{method}-{budget or 'full'}"  # textvqa runs with CKPT only: METHOD none, no BUDGET
    run_dir = root / folder / "answers" / split / run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert isinstance(metrics[metric], (int, float)), metrics
    merged = [json.loads(line) for line in open(run_dir / "merge.jsonl")]
    rounds = 2 + 3 + 4 + 2 if bench == "mmbench" else n_questions  # mmbench runs with ALL_ROUNDS=1
    assert len(merged) == rounds
    assert {(r["method"], r["budget"]) for r in merged} == {(method, budget)}
    if bench == "gqa":  # CUDA_VISIBLE_DEVICES=0,1 -> two chunks, merged
        assert (run_dir / "2_0.jsonl").is_file() and (run_dir / "2_1.jsonl").is_file()
        assert (run_dir / "testdev_balanced_predictions.json").is_file()
    else:
        assert (run_dir / "1_0.jsonl").is_file()
    if bench == "vqav2":
        sub = json.loads((root / "vqav2" / "answers_upload" / split / f"{run}.json").read_text())
        assert len(sub) == 5 and metrics["submission_unanswered"] == 1
    if bench.startswith("mmbench"):
        assert metrics["n"] == 4 and metrics["missing"] == 0
        assert list((root / folder / "answers_upload" / split).glob(f"{run}.*"))


def test_budget_without_method_is_refused(tmp_path):
    """`pope.sh CKPT none 16` would have written answers to a run folder named ...-none-16 for an unpruned model."""
    import subprocess

    from minibench import ROOT

    env = {"PATH": "/usr/bin:/bin", "EVAL_ROOT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(["bash", "scripts/v1_5/eval/pope.sh", str(tmp_path / "ckpt"), "none", "16"], cwd=ROOT, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error: BUDGET=16 was given but METHOD is 'none'")
    assert not list(tmp_path.iterdir())  # nothing was created
