"""learnpruner_ext.visualize: one panel per method, clear error for unregistered methods."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from learnpruner_ext import available_methods
from learnpruner_ext.tiny import random_image as make_image

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "learnpruner_ext.visualize", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_one_panel_per_method(tiny_hf, tmp_path):
    image = tmp_path / "in.png"
    make_image(5, size=(70, 56)).save(image)
    methods = [m for m in ["learnpruner", "vispruner", "fastv", "none"] if m in available_methods()]
    out = tmp_path / "fig.png"
    proc = run_cli("--model-path", str(tiny_hf), "--image-file", str(image), "--query", "What is shown?",
                   "--methods", ",".join(methods), "--budget", "8", "--out", str(out), "--max-new-tokens", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [p["method"] for p in summary["panels"]] == methods
    figure = Image.open(out)
    assert figure.width == summary["panel_width"] * len(methods)
    assert all(p["answer"] is not None for p in summary["panels"])


def test_unregistered_method_lists_available(tmp_path):
    proc = run_cli("--image-file", "x.png", "--query", "q", "--methods", "learnpruner,no_such_method",
                   "--budget", "8", "--out", str(tmp_path / "f.png"))  # fmt: skip
    assert proc.returncode != 0
    assert "no_such_method" in proc.stderr and "available:" in proc.stderr
    assert all(m in proc.stderr for m in available_methods())
