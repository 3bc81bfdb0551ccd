"""CI-sized run of scripts/toy/video.sh: clips -> toy Video-LLaVA from the shipped toy LLaVA -> video QA training
-> answers of three methods -> the table. A few steps (SMOKE_STEPS); asserts formats and token accounting, not
accuracy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[2]


def test_video_pipeline_runs_end_to_end(tmp_path):
    env = dict(os.environ, WORK=str(tmp_path / "work"), NUM_TRAIN="16", NUM_TEST="6", SMOKE_STEPS="2",
               METHODS="none,learnpruner,random", BUDGETS="256", PYTHON=sys.executable)  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "scripts/toy/video.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    work = tmp_path / "work"
    config = json.loads((work / "model" / "config.json").read_text())
    assert config["model_type"] == "video_llava" and config["video_seq_length"] == 8 * 145
    assert (work / "model" / "lpm" / "lpm.safetensors").is_file()
    rows = {r["run"]: r for r in json.loads((work / "table.json").read_text())}
    assert set(rows) == {"none-full", "learnpruner-256", "random-256"}
    assert rows["none-full"]["avg_tokens"] == 8 * 145 and rows["random-256"]["avg_tokens"] == 256
    assert set(rows["learnpruner-256"]["by_type"]) == {"direction", "appear", "frames"}
    answers = [json.loads(line) for line in open(work / "answers" / "learnpruner-256.jsonl")]
    assert len(answers) == 6 and answers[0]["image_tokens"] == 8 * 145
    assert "| learnpruner-256 | 256 |" in (work / "table.md").read_text()
