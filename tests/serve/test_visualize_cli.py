"""llava.serve.visualize (the CLI) and learnpruner_ext.visualize (its drawing code): one panel per method, clear
error for unregistered methods, the padded square exactly as the model's preprocessing pads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from learnpruner_ext import available_methods
from learnpruner_ext.tiny import random_image as make_image
from learnpruner_ext.visualize import pad_to_square
from llava.mm_utils import expand2square

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "llava.serve.visualize", *args], cwd=ROOT, env=env,
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


@pytest.mark.parametrize("size", [(70, 56), (56, 70), (71, 56), (56, 56)])
def test_pad_to_square_is_the_models_padding(size):
    """The core's own pad (no ``llava`` import) equals ``llava.mm_utils.expand2square`` pixel for pixel, and
    the box is where the image landed: a 70x56 image on a 70x70 square starts at y = (70 - 56) // 2 = 7;
    71x56 starts at y = 15 // 2 = 7 (rounded down, as upstream's ``(side - h) // 2``)."""
    background = (122, 116, 104)  # CLIP's mean, int(x * 255) truncated (processor_background)
    image = make_image(3, size=size)
    square, box = pad_to_square(image, background)
    assert np.array_equal(np.asarray(square), np.asarray(expand2square(image.convert("RGB"), background)))
    w, h = size
    side = max(size)
    assert square.size == (side, side)
    assert box == ((side - w) // 2, (side - h) // 2, (side - w) // 2 + w, (side - h) // 2 + h)
    pixels = np.asarray(square)
    if w != h:  # the square's corner is padding
        assert tuple(pixels[0, 0]) == background
    assert np.array_equal(pixels[box[1]:box[3], box[0]:box[2]], np.asarray(image.convert("RGB")))
