"""Tiny, randomly initialised LLaVA checkpoints for tests and examples (no hub access).

    python -m learnpruner_ext.tiny --out DIR --format {hf,llava} [--text-layers N] [--image-size S]
        [--patch-size P] [--seed N]

``hf`` writes a ``LlavaForConditionalGeneration`` folder (as llava-hf does); ``llava`` writes the
original LLaVA layout (``LlavaLlamaForCausalLM`` config with ``mm_*`` keys, ``model.mm_projector.*``
weights, and the CLIP tower in its own folder ``DIR/clip-vision-tower``). Both are loaded back through
``llava.model.builder.load_pretrained_model``. With ``--text-layers 32 --image-size 336 --patch-size 14``
the geometry is LLaVA-1.5's: 576 vision tokens, 32 layers, stage-2 layer 12.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaTokenizer, LlavaConfig

from .modeling import PrunableLlavaForConditionalGeneration

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
VISION_TOWER_DIR = "clip-vision-tower"

# Words the tiny tokenizer should know as whole tokens: the prompt templates and the toy world.
_CORPUS = """A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. A chat between a curious human and an artificial
intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: ASSISTANT: Answer the question using a single word or phrase. Answer with the option's letter from the
given choices directly. Please answer yes or no. What color is the background? What shape is the object?
How many shapes are there? How many objects are there? Is there a in the image? Is the on the left or the
right? Is it at the top or the bottom? What letters are written in the image? What is shown? Describe the image.
red green blue yellow purple orange white gray black beige pink brown cyan circle square triangle star cross
diamond small large yes no left right top bottom one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V
W X Y Z the of and to in is it that this with for on are as be at by from or an image picture photo there"""


def build_tokenizer(vocab_size: int = 512) -> LlamaTokenizer:
    """A Llama-style (metaspace BPE) tokenizer trained offline on a small built-in corpus."""
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    alphabet = sorted(set(_CORPUS) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"()-/\n "))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet)
    model.train_from_iterator(_CORPUS.split("\n") * 4, trainer)
    spec = json.loads(model.to_str())["model"]
    return LlamaTokenizer(
        vocab=spec["vocab"],
        merges=[tuple(m) for m in spec["merges"]],
        add_bos_token=True,
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        model_max_length=2048,
    )


def tiny_configs(
    tokenizer: LlamaTokenizer,
    text_layers: int = 4,
    image_size: int = 56,
    patch_size: int = 14,
    vision_layers: int = 3,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    rope_theta: float = 10000.0,
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # exercise grouped-query attention
        max_position_embeddings=2048,
        rope_theta=rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
        image_aspect_ratio="pad",
        tie_word_embeddings=False,
    )


def image_processor_for(image_size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def build_tiny_model(seed: int = 0, **geometry) -> tuple[PrunableLlavaForConditionalGeneration, LlamaTokenizer, CLIPImageProcessorPil]:
    """A random tiny model in memory, with its tokenizer and image processor."""
    tokenizer = build_tokenizer()
    config = tiny_configs(tokenizer, **geometry)
    torch.manual_seed(seed)
    model = PrunableLlavaForConditionalGeneration(config).eval()
    return model, tokenizer, image_processor_for(config.vision_config.image_size)


def _save_llava_format(model: PrunableLlavaForConditionalGeneration, tokenizer, processor, out: Path) -> None:
    """Original LLaVA layout: Llama weights + ``model.mm_projector.{0,2}`` + a separate CLIP folder."""
    config = model.config
    state = model.state_dict()
    weights = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            weights["model." + key[len("model.language_model.") :]] = value
        elif key.startswith("model.multi_modal_projector.linear_1."):
            weights["model.mm_projector.0." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.multi_modal_projector.linear_2."):
            weights["model.mm_projector.2." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("lm_head."):
            weights[key] = value
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    llava_config = config.text_config.to_dict()
    llava_config.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        mm_vision_tower=VISION_TOWER_DIR,
        mm_hidden_size=config.vision_config.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=config.vision_feature_layer,
        mm_vision_select_feature="patch",
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        tokenizer_model_max_length=2048,
    )
    (out / "config.json").write_text(json.dumps(llava_config, indent=2))
    tokenizer.save_pretrained(out)
    tower = CLIPVisionModel(config.vision_config)
    tower.load_state_dict(model.model.vision_tower.state_dict())
    tower.save_pretrained(out / VISION_TOWER_DIR)
    processor.save_pretrained(out / VISION_TOWER_DIR)


def save_tiny_checkpoint(out: str | Path, format: str = "hf", seed: int = 0, **geometry) -> Path:
    """Write a tiny random checkpoint; the same seed gives the same weights in both formats."""
    if format not in ("hf", "llava"):
        raise ValueError(f"format must be 'hf' or 'llava', got {format!r}")
    out = Path(out)
    model, tokenizer, processor = build_tiny_model(seed=seed, **geometry)
    if format == "hf":
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        processor.save_pretrained(out)
    else:
        _save_llava_format(model, tokenizer, processor, out)
    return out


def random_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A reproducible noise image (width, height) for tests and smoke runs."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", choices=["hf", "llava"], default="hf")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.image_size % args.patch_size:
        parser.error(f"--image-size {args.image_size} must be a multiple of --patch-size {args.patch_size}")
    path = save_tiny_checkpoint(
        args.out, args.format, args.seed, text_layers=args.text_layers, image_size=args.image_size, patch_size=args.patch_size
    )
    n = (args.image_size // args.patch_size) ** 2
    print(f"wrote tiny {args.format}-format LLaVA to {path} ({n} vision tokens, {args.text_layers} LLM layers)")


if __name__ == "__main__":
    main()
