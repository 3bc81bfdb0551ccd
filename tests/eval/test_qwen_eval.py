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


def test_max_pixels_sets_the_resolution_and_the_run_identity(qwen_eval, tmp_path):
    """--max-pixels 4704 (6 merged tokens of 28 x 28 px) with the checkpoint's min_pixels 3136: smart_resize takes
    a.png (112 x 84, area 9408 > 4704) by beta = sqrt(9408 / 4704) = 1.414 to floor(84 / 1.414 / 28) * 28 = 56 by
    floor(112 / 1.414 / 28) * 28 = 56 -> 2 x 2 = 4 merged tokens; b.png (200 x 30 -> 196 x 28, area 5488 > 4704)
    by beta = sqrt(6000 / 4704) = 1.129 to 28 (at least one factor) by floor(200 / 1.129 / 28) * 28 = 168
    -> 1 x 6 = 6 tokens. Without the flag: the checkpoint's range (18816 is below the 1280-token cap), 12 and 7."""
    root, path = qwen_eval
    args = ["--conv-mode", "qwen2_5_vl"]
    small = _run(root, path, tmp_path / "small.jsonl", *args, "--max-pixels", "4704", "--batch-size", "2")
    assert [r["image_tokens"] for r in small] == [4, 6, 4]
    settings = small[0]["metadata"]["settings"]
    assert (settings["min_pixels"], settings["max_pixels"]) == (3136, 4704)
    default = _run(root, path, tmp_path / "default.jsonl", *args)
    assert [r["image_tokens"] for r in default] == [12, 7, 12]
    assert default[0]["metadata"]["settings"]["max_pixels"] == 18816
    with pytest.raises(ValueError, match=r"other settings \(max_pixels: file 4704 vs now 9408\)"):  # never mixed
        _run(root, path, tmp_path / "small.jsonl", *args, "--max-pixels", "9408")


def test_pixel_flags_are_refused_on_fixed_resolution_families(tmp_path):
    from llava.model.builder import QWEN_PAPER_MAX_PIXELS, image_pixels_for

    llava = save_tiny_checkpoint(tmp_path / "llava")
    with pytest.raises(ValueError, match="--min-pixels/--max-pixels set Qwen2.5-VL's dynamic resolution.*drop the flags"):
        image_pixels_for(llava, max_pixels=4704)
    assert image_pixels_for(llava) is None
    assert QWEN_PAPER_MAX_PIXELS == 1003520  # 1280 merged tokens x 28 x 28 px


def test_decoding_stops_at_the_templates_end_of_turn():
    """The tiny/toy Qwen tokenizer's eos is ``</s>``, but ChatML ends a turn with ``<|im_end|>``: decoding must stop
    there (real Qwen2.5-VL stops there through its generation config). Biasing ``<|im_end|>`` to come first, the
    answer is that one token and nothing after it; Vicuna's ``</s>`` and plain's text ``\\n`` add no stop token."""
    import torch

    from learnpruner_ext.tiny import build_tiny_model, build_tiny_qwen_model
    from llava.inference import GenerationSettings, build_prompt, prepare_batch, stop_token_ids

    model, tokenizer, processor = build_tiny_qwen_model(seed=0)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer, "qwen2_5_vl") == [tokenizer.eos_token_id, im_end]
    _, llava_tokenizer, _ = build_tiny_model(seed=0)
    for conv in ("vicuna_v1", "plain"):
        assert stop_token_ids(llava_tokenizer, conv) == [llava_tokenizer.eos_token_id]
    batch = prepare_batch(model, tokenizer, processor, [random_image(0, (56, 56))], [build_prompt("Hi?", "qwen2_5_vl")])
    kwargs = GenerationSettings(max_new_tokens=6).kwargs(tokenizer, "qwen2_5_vl")
    with torch.inference_mode():
        out = model.generate(**batch, **kwargs, sequence_bias={(im_end,): 1e4})
    assert out[0, batch["input_ids"].shape[1]:].tolist() == [im_end]
