"""Environment for the training tests that launch ``finetune_lpm.sh`` / ``train_lpm.py`` as subprocesses on CPU."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(**extra) -> dict:
    """One CPU thread, DeepSpeed on CPU, offline hub, the repository importable; ``extra`` on top."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}  # fmt: skip


def run_logged(cmd, log: Path, env=None, timeout=420) -> str:
    """Run ``cmd`` from the repository root, write its stdout + stderr to ``log``, assert it succeeded."""
    proc = subprocess.run(cmd, cwd=REPO, env=env or script_env(), capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


def finetune_env(dataset, max_steps, launcher, extra_args="", **env) -> dict:
    """The environment of ``finetune_script``: ``env`` overrides the defaults (e.g. NUM_GPUS, DS_CONFIG), ``extra_args``
    are appended to EXTRA_ARGS."""
    return script_env(**{
        "NUM_GPUS": "1", "GLOBAL_BATCH": "4", "PER_DEVICE_BATCH": "4", "DATA": str(dataset),
        "IMAGES": str(dataset.parent / "images"), "DATA_FRACTION": "1.0", "LR": "1e-2", "LAUNCHER": launcher,
        "MASTER_PORT": str(free_port()),
        "EXTRA_ARGS": f"--use_cpu True --max_steps {max_steps} --save_steps 2 --lpm_hidden 64 --dataloader_num_workers 0 "
        f"--lpm_init_keep_bias 1.0 {extra_args}".strip(),
        **env,
    })  # fmt: skip


def finetune_script(base, dataset, out, max_steps, launcher, log, extra_args="", **env) -> str:
    """scripts/v1_5/finetune_lpm.sh as documented (ZeRO-2, bf16, checkpointing), shrunk to a tiny CPU run."""
    env = finetune_env(dataset, max_steps, launcher, extra_args, **env)
    return run_logged(["bash", "scripts/v1_5/finetune_lpm.sh", str(base), str(out)], log, env)
