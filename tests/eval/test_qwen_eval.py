"""The eval generators on a tiny Qwen2.5-VL: model_vqa_loader answers with its ChatML template, a batch of
different image sizes equals one-by-one answering, and a LLaVA template is refused (issue 17 item 6, first part)."""

import json

import pytest

from learnpruner_ext.tiny import random_image, save_tiny_checkpoint
from llava.eval import model_vqa_loader


@pytest.fixture(scope="module")
def qwen_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_eval")
    path = save_tiny_checkpoint(root / "model", family="qwen2_5_vl", seed=0)
    (root / "img").mkdir()
    for name, size in (("a.png", (112, 84)), ("b.png", (200, 30))):  # N_i = 12 and 7
        random_image(len(name), size).save(root / "img" / name)
    rows = [("a.png", "What color?"), ("b.png", "How many?"), ("a.png", "Is there a cat?")]
    (root / "q.jsonl").write_text("".join(json.dumps({"question_id": i, "image": im, "text": t}) + "\n"
                                          for i, (im, t) in enumerate(rows)))  # fmt: skip
    return root, str(path)


def _run(root, path, answers, *extra):
    model_vqa_loader.main(["--model-path", path, "--question-file", str(root / "q.jsonl"), "--image-folder",
                           str(root / "img"), "--answers-file", str(answers), "--max_new_tokens", "3", "--temperature",
                           "0", "--no-progress", *extra])  # fmt: skip
    return [json.loads(line) for line in answers.read_text().splitlines()]


def test_vqa_loader_on_qwen_batch_equals_singles(qwen_eval, tmp_path):
    root, path = qwen_eval
    args = ["--conv-mode", "qwen2_5_vl", "--pruning-method", "vispruner", "--visual-token-budget", "6",
            "--position-mode", "original"]  # fmt: skip
    batched = _run(root, path, tmp_path / "batched.jsonl", *args, "--batch-size", "3")
    single = _run(root, path, tmp_path / "single.jsonl", *args, "--batch-size", "1")
    assert [r["text"] for r in batched] == [r["text"] for r in single] and len(batched) == 3
    # each line carries its own prompt's accounting, not the batch's maximum
    assert [r["vision_tokens_per_layer"] for r in batched] == [r["vision_tokens_per_layer"] for r in single]
    settings = batched[0]["metadata"]["settings"]
    assert settings["conv_mode"] == "qwen2_5_vl" and settings["pruning"]["position_mode"] == "original"
    assert [r["image_tokens"] for r in batched] == [12, 7, 12] and [r["r1"] for r in batched] == [6, 6, 6]


def test_vqa_loader_refuses_a_llava_template_on_qwen(qwen_eval, tmp_path):
    root, path = qwen_eval
    with pytest.raises(ValueError, match="a qwen2_5_vl checkpoint needs --conv-mode qwen2_5_vl"):
        _run(root, path, tmp_path / "a.jsonl")
