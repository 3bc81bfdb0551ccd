"""Environment for the training tests that launch ``finetune_lpm.sh`` / ``train_lpm.py`` as subprocesses on CPU."""
from __future__ import annotations

import os
import socket
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
