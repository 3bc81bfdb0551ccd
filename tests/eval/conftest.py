"""Fixtures for the answer-generator / eval-script / sweep tests: a tiny random LLaVA, a random LPM, a mini
benchmark suite (minibench.py) and one run of every eval script."""

from __future__ import annotations

from pathlib import Path

import pytest

from minibench import ROOT, SCRIPT_CASES, build_minibench, script_command


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from learnpruner_ext.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", format="hf", text_layers=4, image_size=56)


@pytest.fixture(scope="session")
def tiny_lpm(tmp_path_factory) -> Path:
    import torch

    from learnpruner_ext import LearnablePruningModule

    torch.manual_seed(1)
    lpm = LearnablePruningModule(32, 16)  # the tiny CLIP tower gives 32-d features
    lpm.trained = True  # random, but marked trained: no warning in the tests
    path = tmp_path_factory.mktemp("lpm") / "lpm"
    lpm.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory) -> Path:
    return build_minibench(tmp_path_factory.mktemp("data") / "eval")


@pytest.fixture(scope="session")
def script_runs(tmp_path_factory, tiny_ckpt, tiny_lpm):
    """Run every benchmark script and sweep.sh once, two at a time -> ({name: (returncode, output)}, eval root)."""
    import subprocess
    import time

    root = build_minibench(tmp_path_factory.mktemp("scripts") / "eval")
    pending, running, done = list(SCRIPT_CASES) + ["sweep"], {}, {}
    while pending or running:
        while pending and len(running) < 2:
            name = pending.pop(0)
            cmd, env = script_command(name, root, tiny_ckpt, tiny_lpm)
            log = open(root.parent / f"{name}.log", "w+")
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.seek(0)
                done[name] = (proc.returncode, log.read())
                log.close()
                del running[name]
        time.sleep(0.1)
    return done, root
