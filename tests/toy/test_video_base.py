"""toyworld.video_base: the toy LLaVA as a Video-LLaVA (both towers = the toy tower, <video> added). The image
path must be exactly the toy LLaVA's, so video training starts from the trained image model."""

import pytest
import torch

from learnpruner_ext.tiny import random_image
from llava.inference import build_prompt, prepare_batch
from toyworld.video_base import video_llava_from_llava

pytestmark = pytest.mark.usefixtures("no_grad")


def test_image_path_equals_the_toy_llava(tmp_path):
    """Square images (the toy LLaVA's 'pad' is then a no-op): next-token logits of the converted model equal the
    toy LLaVA's on the original vocabulary, and the new <video> column is 0 (a zero LM-head row)."""
    from llava.model.builder import load_pretrained_model

    model, tokenizer, processor = video_llava_from_llava("checkpoints/toy-llava", frames=4)
    tok0, llava, proc0, _ = load_pretrained_model("checkpoints/toy-llava", device="cpu", dtype="float32")
    images = [random_image(i, (192, 192)) for i in range(2)]
    prompts = [build_prompt(q) for q in ("What color is the circle?", "How many shapes are there?")]
    ours = model(**prepare_batch(model, tokenizer, processor, images, prompts)).logits[:, -1]
    ref = llava(**prepare_batch(llava, tok0, proc0, images, prompts)).logits[:, -1]
    n = ref.shape[-1]
    assert ours.shape[-1] == n + 1 and model.config.video_token_id == n
    assert (ours[:, :n] - ref).abs().max() <= 1e-5 and bool((ours[:, n] == 0).all())
    assert model.config.video_seq_length == 4 * (llava.num_vision_tokens + 1)
    out = tmp_path / "video"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    _, loaded, _, _ = load_pretrained_model(str(out), device="cpu", dtype="float32")
    assert loaded.family == "video_llava" and loaded.video_token_counts([4]) == [4 * (llava.num_vision_tokens + 1)]
    assert torch.equal(loaded.model.video_tower.embeddings.patch_embedding.weight,
                       llava.model.vision_tower.embeddings.patch_embedding.weight)  # fmt: skip
