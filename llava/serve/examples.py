"""The demo's example inputs, read from the files shipped in ``llava/serve/demo_examples/``.

They are toy-world scenes written by ``python -m toyworld.demo_examples``; ``llava`` does not import the
toy world (the toy world builds on ``llava``), so the demo only reads ``examples.json`` and the images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent / "demo_examples"


def make_examples(out_dir: Path, examples_dir: Path = EXAMPLES_DIR) -> list[tuple[str, str]]:
    """(image path, question) pairs, the images copied into ``out_dir`` (a folder Gradio may serve from)."""
    index = Path(examples_dir) / "examples.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing; write the demo examples with: python -m toyworld.demo_examples")
    examples = []
    for entry in json.loads(index.read_text()):
        path = Path(out_dir) / entry["image"]
        shutil.copyfile(Path(examples_dir) / entry["image"], path)
        examples.append((str(path), entry["question"]))
    return examples
