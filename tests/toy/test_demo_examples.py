"""The demo's shipped example files (llava/serve/demo_examples/) are what toyworld.demo_examples writes."""

import json

import numpy as np
from PIL import Image

from llava.serve.examples import EXAMPLES_DIR, make_examples
from toyworld.demo_examples import EXAMPLE_QUESTION_TYPES, write_examples


def test_shipped_examples_match_the_generator(tmp_path):
    entries = write_examples(tmp_path / "fresh")
    assert json.loads((EXAMPLES_DIR / "examples.json").read_text()) == entries, (
        "llava/serve/demo_examples is stale; rewrite it with: python -m toyworld.demo_examples")
    assert len(entries) == len(EXAMPLE_QUESTION_TYPES)
    for entry in entries:
        fresh = np.asarray(Image.open(tmp_path / "fresh" / entry["image"]))
        shipped = np.asarray(Image.open(EXAMPLES_DIR / entry["image"]))
        assert np.array_equal(fresh, shipped), entry["image"]


def test_demo_reads_the_shipped_examples(tmp_path):
    """``make_examples`` copies the shipped images into the folder Gradio serves from, questions unchanged."""
    examples = make_examples(tmp_path)
    shipped = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    assert [q for _, q in examples] == [e["question"] for e in shipped]
    assert [str(tmp_path / e["image"]) for e in shipped] == [p for p, _ in examples]
    for entry in shipped:
        assert (tmp_path / entry["image"]).read_bytes() == (EXAMPLES_DIR / entry["image"]).read_bytes()
    assert examples[0][1] == "What shape is the red object?"  # scene 0 of seed 0 asks its shape question
