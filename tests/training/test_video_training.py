"""Video samples in the training data (``"video"`` instead of ``"image"``) through LazySupervisedDataset, the
collator and ``llava.train.train_full`` on a tiny Video-LLaVA: the toy video base's training path."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("av")

from learnpruner_ext.tiny import random_image, save_tiny_checkpoint  # noqa: E402
from llava.model.builder import load_pretrained_model  # noqa: E402
from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset  # noqa: E402
from llava.video import save_video  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Video-LLaVA and 3 video samples + 1 image sample + 1 text-only sample."""
    root = tmp_path_factory.mktemp("video_train")
    model = save_tiny_checkpoint(root / "model", family="video_llava")
    rng = np.random.default_rng(0)
    for v in range(3):
        frames = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(9)]
        save_video(frames, root / "data" / "clips" / f"c{v}.mp4")
    random_image(5, (56, 56)).save(root / "data" / "still.png")
    turns = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    data = [{"id": f"v{v}", "video": f"clips/c{v}.mp4", "conversations": turns("Which way does it move?", "left")}
            for v in range(3)]
    data += [{"id": "i0", "image": "still.png", "conversations": turns("What color?", "red")},
             {"id": "t0", "conversations": turns("Say yes.", "yes")}]
    (root / "train.json").write_text(json.dumps(data))
    return root, model


def test_video_items_fill_the_video_placeholders(world):
    root, path = world
    tokenizer, model, processor, _ = load_pretrained_model(str(path), device="cpu", dtype="float32")
    ds = LazySupervisedDataset(root / "train.json", tokenizer, processor, num_image_tokens=model.num_image_tokens,
                               image_token_id=model.config.image_token_id, image_folder=root / "data",
                               model_config=model.config, video_token_counts=model.video_token_counts)  # fmt: skip
    video, image = ds[0], ds[3]
    assert video["pixel_values_videos"].shape == (8, 3, 56, 56) and "pixel_values" not in video
    assert int((video["input_ids"] == model.config.video_token_id).sum()) == 8 * 17
    assert int((image["input_ids"] == model.config.image_token_id).sum()) == 16
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([ds[i] for i in range(5)])
    assert batch["pixel_values_videos"].shape == (3, 8, 3, 56, 56) and batch["pixel_values"].shape == (1, 3, 56, 56)
    out = model(**batch)  # one forward over videos, an image and a text-only prompt
    assert torch.isfinite(out.loss)


def test_missing_video_is_reported_before_training(world, tmp_path):
    root, path = world
    tokenizer, model, processor, _ = load_pretrained_model(str(path), device="cpu", dtype="float32")
    data = json.loads((root / "train.json").read_text()) + [
        {"id": "gone", "video": "clips/nope.mp4", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]}]
    (tmp_path / "train.json").write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match="sample gone: .*nope.mp4: missing"):
        LazySupervisedDataset(tmp_path / "train.json", tokenizer, processor, num_image_tokens=16,
                              image_token_id=model.config.image_token_id, image_folder=root / "data",
                              model_config=model.config, video_token_counts=model.video_token_counts)  # fmt: skip


def test_train_full_trains_on_videos_and_saves_a_loadable_video_llava(world, tmp_path):
    from llava.train import train_full

    root, path = world
    summary = train_full.main(["--model_name_or_path", str(path), "--data_path", str(root / "train.json"),
                               "--image_folder", str(root / "data"), "--output_dir", str(tmp_path / "out"),
                               "--max_steps", "3", "--batch_size", "5", "--lr", "1e-3", "--freeze_vision",
                               "--logging_steps", "1", "--preprocess_workers", "0"])  # fmt: skip
    assert summary["steps"] == 3 and summary["samples"] == 5
    assert all(np.isfinite(h["loss"]) for h in summary["history"])
    _, trained, _, _ = load_pretrained_model(str(tmp_path / "out"), device="cpu", dtype="float32")
    _, init, _, _ = load_pretrained_model(str(path), device="cpu", dtype="float32")
    assert torch.equal(trained.model.video_tower.embeddings.patch_embedding.weight,
                       init.model.video_tower.embeddings.patch_embedding.weight)  # --freeze_vision: both towers
    assert not torch.equal(trained.lm_head.weight, init.lm_head.weight)
