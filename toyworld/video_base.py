"""A toy Video-LLaVA initialised from the trained toy LLaVA: the starting point of the toy video base.

    python -m toyworld.video_base --image-model checkpoints/toy-llava --out outputs/toy_video/init [--frames 8]

Video-LLaVA-7B shares one architecture between its two CLIP towers; here both ``image_tower`` and
``video_tower`` start as the toy LLaVA's tower, the projector and the LLM are copied, and ``<video>`` is added to
the vocabulary (a zero embedding and LM-head row, as the tiny factory does). The image path is then exactly the
toy LLaVA (tested), and video QA training (``llava.train.train_full`` on video samples) starts from a model that
already reads frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import VideoLlavaConfig, VideoLlavaImageProcessor

from learnpruner_ext.modeling import PrunableVideoLlavaForConditionalGeneration
from learnpruner_ext.tiny import VIDEO_FRAMES, VIDEO_TOKEN


def video_llava_from_llava(image_model: str | Path, frames: int = VIDEO_FRAMES):
    """The toy LLaVA at ``image_model`` as a Video-LLaVA -> (model, tokenizer, VideoLlavaImageProcessor)."""
    from llava.model.builder import load_pretrained_model

    tokenizer, llava, processor, _ = load_pretrained_model(str(image_model), device="cpu", dtype="float32")
    if llava.config.model_type != "llava":
        raise ValueError(f"{image_model} is a {llava.config.model_type} checkpoint; give a LLaVA-1.5-style (llava) one")
    if getattr(llava.config, "image_aspect_ratio", "pad") == "pad" and processor.crop_size["height"] != processor.crop_size["width"]:
        raise ValueError("the toy LLaVA pads images to squares; a Video-LLaVA needs a square crop size")
    tokenizer.add_tokens([VIDEO_TOKEN], special_tokens=True)
    text = llava.config.text_config.to_dict()
    text["vocab_size"] = len(tokenizer)
    per_frame = llava.num_vision_tokens + 1  # patches + [CLS]
    config = VideoLlavaConfig(
        vision_config=llava.config.vision_config.to_dict(), text_config=text,
        image_token_index=llava.config.image_token_id, video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        projector_hidden_act=llava.config.projector_hidden_act, vision_feature_layer=llava.config.vision_feature_layer,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        image_seq_length=llava.num_vision_tokens, video_seq_length=frames * per_frame, tie_word_embeddings=False,
    )  # fmt: skip
    model = PrunableVideoLlavaForConditionalGeneration(config).eval()
    source, inner = llava.model, model.model
    with torch.no_grad():
        inner.image_tower.load_state_dict(source.vision_tower.state_dict())
        inner.video_tower.load_state_dict(source.vision_tower.state_dict())
        inner.multi_modal_projector.load_state_dict(source.multi_modal_projector.state_dict())
        same = {k: v for k, v in source.language_model.state_dict().items() if k != "embed_tokens.weight"}
        missing, unexpected = inner.language_model.load_state_dict(same, strict=False)
        assert missing == ["embed_tokens.weight"] and not unexpected, (missing, unexpected)
        n = source.language_model.embed_tokens.weight.shape[0]  # the vocabulary before <video>
        for grown, weight in ((inner.language_model.embed_tokens.weight, source.language_model.embed_tokens.weight),
                              (model.lm_head.weight, llava.lm_head.weight)):  # fmt: skip
            grown[:n] = weight
            grown[n:] = 0.0  # <video>: a zero row, as the tiny factory gives <image>
    video_processor = VideoLlavaImageProcessor(
        size=processor.size, crop_size=processor.crop_size, image_mean=processor.image_mean, image_std=processor.image_std,
        resample=processor.resample,
    )  # fmt: skip
    return model, tokenizer, video_processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-model", default="checkpoints/toy-llava", help="the trained toy LLaVA")
    parser.add_argument("--out", required=True)
    parser.add_argument("--frames", type=int, default=VIDEO_FRAMES)
    args = parser.parse_args(argv)
    model, tokenizer, processor = video_llava_from_llava(args.image_model, args.frames)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"wrote toy Video-LLaVA to {out} ({args.frames} x {model.config.video_seq_length // args.frames} tokens per video)")


if __name__ == "__main__":
    main()
