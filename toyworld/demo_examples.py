"""The demo's example inputs: toy-world scenes, each with a question the scene answers.

    python -m toyworld.demo_examples [--out llava/serve/demo_examples]

The demo (``llava.serve.gradio_web_server``) lives in ``llava/`` and must not import the toy world, so it
ships the files this writes (``examples.json`` plus one PNG per example) and only reads them
(``llava.serve.examples``). ``tests/toy/test_demo_examples.py`` regenerates them and fails if the shipped
files differ. One example per question type in :data:`EXAMPLE_QUESTION_TYPES`, asked as the toy benchmark
asks; scene ``i`` is drawn from ``numpy.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .generate import draw_scene, scene_with_questions

EXAMPLE_QUESTION_TYPES = ("shape", "count", "background")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llava" / "serve" / "demo_examples"
IMAGE_SIZE = 192  # the toy world's image side (toyworld.generate's default)


def write_examples(out_dir: Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> list[dict]:
    """Write ``toy_example_{i}.png`` and ``examples.json`` (``[{"image": file name, "question": ...}]``) into
    ``out_dir``; returns the JSON's entries."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, qtype in enumerate(EXAMPLE_QUESTION_TYPES):
        rng = np.random.default_rng([seed, i])
        scene, [(question, _, _)] = scene_with_questions(rng, image_size, [(qtype, None)])
        name = f"toy_example_{i}.png"
        draw_scene(scene, image_size=image_size).save(out_dir / name)
        entries.append({"image": name, "question": question})
    (out_dir / "examples.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder the demo reads (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for entry in write_examples(Path(args.out), seed=args.seed):
        print(f"{args.out}/{entry['image']}: {entry['question']!r}")


if __name__ == "__main__":
    main()
