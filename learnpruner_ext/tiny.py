"""Tiny, randomly initialised LLaVA checkpoints for tests and examples (no hub access).

    python -m learnpruner_ext.tiny --out DIR [--family {llava,llava_next,qwen2_5_vl,video_llava}] --format {hf,llava} [--text-layers N] [--image-size S]
        [--patch-size P] [--seed N] [--weights {safetensors,bin,bin-shards}] [--tower-keys-in-llm]
        [--tower-hub-id ID --hf-cache DIR]

``hf`` writes a ``LlavaForConditionalGeneration`` folder (as llava-hf does: a fast ``tokenizer.json``
with ``<image>`` added). ``llava`` writes the folder as upstream LLaVA's training code (haotian-liu/LLaVA
c121f04, transformers 4.31-4.37) writes it: a ``LlavaLlamaForCausalLM`` config with its ``mm_*`` keys,
``model.*`` / ``model.mm_projector.{0,2}`` / ``lm_head`` weights over the sentencepiece vocabulary only
(upstream never adds ``<image>`` to the tokenizer), a slow-tokenizer folder (``tokenizer.model`` +
``tokenizer_config.json`` + ``special_tokens_map.json``, no ``tokenizer.json``), and the CLIP tower saved as
a transformers-4.x ``CLIPVisionModel`` (``vision_model.*`` keys) in its own folder, named in
``mm_vision_tower`` by absolute path or, with ``--tower-hub-id``, as a hub id inside a Hugging Face cache.
Both formats hold the same weights for the same seed and load back through
``llava.model.builder.load_pretrained_model``. With ``--text-layers 32 --image-size 336 --patch-size 14``
the geometry is LLaVA-1.5's: 576 vision tokens, 32 layers, stage-2 layer 12.

``--family llava_next`` writes a ``LlavaNextForConditionalGeneration`` folder (``hf`` format) with its real
``LlavaNextProcessor`` (anyres: grid pinpoints ``S x {1,2,3}`` as llava-v1.6's 336 x {1,2,3}, so a 56 px tiny model
has 5 x 16 = 80 reference tokens and images of different aspect get different crop counts and N_i).

``--family qwen2_5_vl`` writes a ``Qwen2_5_VLForConditionalGeneration`` folder: window-attention ViT with a 2x2
merger, M-RoPE LLM, Qwen2-VL's real image processor (4-24 merged tokens per image, so N_i follows the image's
size; budgets refer to 24, the config's ``pruning_reference_tokens``) and the tiny tokenizer with Qwen's vision
tokens added. (``Qwen2_5_VLProcessor`` itself needs torchvision for its video half; the toolkit tokenizes
prompts itself, as the processor does.)

``--family video_llava`` writes a ``VideoLlavaForConditionalGeneration`` folder: two tiny CLIP towers
(``image_tower``, ``video_tower``), ``<image>`` and ``<video>`` tokens, 8-frame videos of 8 x (P + 1) tokens
(8 x 17 = 136 at 56 px; budgets refer to the 8 x 16 = 128 patches), and ``VideoLlavaImageProcessor``, which
also preprocesses each video frame (transformers' video processor needs torchvision).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlamaTokenizer, LlavaConfig
from transformers import LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor, Qwen2_5_VLConfig
from transformers import Qwen2VLImageProcessorPil, VideoLlavaConfig, VideoLlavaImageProcessor

from .modeling import PrunableLlavaForConditionalGeneration, PrunableLlavaNextForConditionalGeneration
from .modeling import PrunableQwen2_5_VLForConditionalGeneration, PrunableVideoLlavaForConditionalGeneration

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_TOKEN = "<image>"
VISION_TOWER_DIR = "clip-vision-tower"
CLIP_HUB_ID = "openai/clip-vit-large-patch14-336"  # LLaVA-1.5's mm_vision_tower
SP_VOCAB_SIZE = 511  # + <image> = 512 ids, the size of the older BPE tiny tokenizer
UPSTREAM_TRANSFORMERS = "4.37.2"  # the version upstream LLaVA (c121f04) pins; written into saved configs
WEIGHT_LAYOUTS = ("safetensors", "bin", "bin-shards")
FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "video_llava")
VIDEO_TOKEN = "<video>"
VIDEO_FRAMES = 8  # Video-LLaVA samples 8 frames per video
QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
QWEN_TOKEN_RANGE = (4, 24)  # tiny Qwen: min/max merged tokens per image (the real model's paper input: 1280)
GRID_MULTIPLES = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]  # llava-v1.6's pinpoints / 336
BIN_SHARDS = 2  # like llava-v1.5-7b's pytorch_model-0000{1,2}-of-00002.bin

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
    """The toy world's tokenizer (metaspace BPE in ``tokenizers``, trained on the built-in corpus), kept as the
    shipped ``checkpoints/toy-llava`` was trained with it. Tiny checkpoints use :func:`build_sp_tokenizer`."""
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


def sentencepiece_model(vocab_size: int = SP_VOCAB_SIZE) -> bytes:
    """A Llama-style sentencepiece BPE model (serialised ``tokenizer.model``) trained offline on the corpus.

    Llama's trainer settings: ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad piece, byte fallback, a dummy prefix
    space, identity normalisation without whitespace folding, digits split. Single-threaded, so the same
    bytes on every call.
    """
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.split("\\n") * 4),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def _slow_tokenizer_files(out: Path, max_length: int) -> None:
    """``tokenizer.model`` + the two JSON files a transformers-4.31 slow ``LlamaTokenizer`` saves for
    llava-v1.5-7b (``legacy: false``, BOS added, pad set to ``<unk>`` by upstream's train.py), no ``tokenizer.json``."""
    (out / "tokenizer.model").write_bytes(sentencepiece_model())

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": added("</s>"),
        "legacy": False,
        "model_max_length": max_length,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added("<unk>"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    plain = {k: {f: v for f, v in added(t).items() if f != "__type"} for k, t in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    (out / "special_tokens_map.json").write_text(json.dumps({**plain, "pad_token": "<unk>"}, indent=2))


def build_sp_tokenizer(max_length: int = 2048) -> LlamaTokenizer:
    """The fast (tokenizers) conversion of :func:`sentencepiece_model` with ``<image>`` added, as llava-hf ships
    it: the same ids as the slow tokenizer on prompt text, ``<image>`` at id ``vocab_size``, pad = ``<unk>``."""
    with tempfile.TemporaryDirectory() as tmp:
        _slow_tokenizer_files(Path(tmp), max_length)
        tokenizer = LlamaTokenizer.from_pretrained(tmp, pad_token="<unk>")
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


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


def tiny_next_config(tokenizer: LlamaTokenizer, **geometry) -> LlavaNextConfig:
    """LLaVA-NeXT geometry on the tiny tower and LLM: anyres grids of ``image_size`` crops."""
    base = tiny_configs(tokenizer, **geometry)
    size = base.vision_config.image_size
    return LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=base.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[h * size, w * size] for h, w in GRID_MULTIPLES],
        image_seq_length=base.image_seq_length,
        tie_word_embeddings=False,
    )


def next_processor_for(config: LlavaNextConfig, tokenizer: LlamaTokenizer) -> LlavaNextProcessor:
    """The real anyres processor, configured as llava-hf's NeXT processors are (+1 [CLS], ``default`` strategy)."""
    size = config.vision_config.image_size
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_pad=True,
    )  # fmt: skip
    return LlavaNextProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )  # fmt: skip


def build_tiny_next_model(seed: int = 0, **geometry):
    """A random tiny LLaVA-NeXT in memory -> (model, tokenizer, LlavaNextProcessor)."""
    tokenizer = build_sp_tokenizer()
    config = tiny_next_config(tokenizer, **geometry)
    model = _random_model(PrunableLlavaNextForConditionalGeneration, config, seed)
    return model, tokenizer, next_processor_for(config, tokenizer)


def tiny_qwen_config(tokenizer: LlamaTokenizer, text_layers: int = 4, vision_layers: int = 4,
                     vision_hidden: int = 32, text_hidden: int = 64, rope_theta: float = 10000.0,
                     patch_size: int = 14, window_patches: int = 4,
                     reference_tokens: int = QWEN_TOKEN_RANGE[1]) -> Qwen2_5_VLConfig:  # fmt: skip
    """Qwen2.5-VL geometry on a tiny scale: ``patch_size`` px patches (14 as the real model), 2x2 merge, windows of
    ``window_patches`` x ``window_patches`` patches (the real model: 112 px / 14 = 8; tiny default 4, so small images
    still hold several windows), full attention in ViT blocks 1 and the last (window attention elsewhere), M-RoPE
    sections summing to half the head dim. ``reference_tokens`` is the N budgets refer to (paper's input: 1280)."""
    head_dim = text_hidden // 4
    third = head_dim // 2 // 3
    mrope = [head_dim // 2 - 2 * third, third, third]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_TOKENS}
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=4, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=window_patches * patch_size,
                           fullatt_block_indexes=[1, vision_layers - 1], out_hidden_size=text_hidden, in_channels=3),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": rope_theta}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        pruning_reference_tokens=reference_tokens, tie_word_embeddings=False,
    )  # fmt: skip


def qwen_image_processor(min_tokens: int = QWEN_TOKEN_RANGE[0], max_tokens: int = QWEN_TOKEN_RANGE[1],
                         patch_size: int = 14) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's real image processor (smart resize to multiples of 2 x ``patch_size`` px within the pixel range
    of ``min_tokens``..``max_tokens`` merged tokens)."""
    merged_pixels = (2 * patch_size) ** 2
    return Qwen2VLImageProcessorPil(
        min_pixels=min_tokens * merged_pixels, max_pixels=max_tokens * merged_pixels,
        patch_size=patch_size, merge_size=2, temporal_patch_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip


def build_qwen_tokenizer() -> LlamaTokenizer:
    """The tiny sentencepiece tokenizer plus Qwen2.5-VL's vision and ChatML tokens (as special tokens)."""
    tokenizer = build_sp_tokenizer()
    tokenizer.add_tokens(QWEN_TOKENS, special_tokens=True)
    return tokenizer


def build_tiny_qwen_model(seed: int = 0, **geometry):
    """A random tiny Qwen2.5-VL in memory -> (model, tokenizer with Qwen's vision tokens, image processor)."""
    tokenizer = build_qwen_tokenizer()
    config = tiny_qwen_config(tokenizer, **geometry)
    return _random_model(PrunableQwen2_5_VLForConditionalGeneration, config, seed), tokenizer, qwen_image_processor()


def tiny_video_llava_config(tokenizer: LlamaTokenizer, frames: int = VIDEO_FRAMES, **geometry) -> VideoLlavaConfig:
    """Video-LLaVA geometry on the tiny tower and LLM: both towers share the CLIP config, as in Video-LLaVA-7B."""
    base = tiny_configs(tokenizer, **geometry)
    return VideoLlavaConfig(
        vision_config=base.vision_config, text_config=base.text_config,
        image_token_index=base.image_token_id, video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=base.image_seq_length, video_seq_length=frames * (base.image_seq_length + 1),
        tie_word_embeddings=False,
    )  # fmt: skip


def video_llava_processor(image_size: int) -> VideoLlavaImageProcessor:
    """Video-LLaVA's image processor (shortest edge, centre crop, CLIP normalisation), used for frames too."""
    return VideoLlavaImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD)  # fmt: skip


def build_tiny_video_llava_model(seed: int = 0, frames: int = VIDEO_FRAMES, **geometry):
    """A random tiny Video-LLaVA in memory -> (model, tokenizer with ``<video>``, VideoLlavaImageProcessor)."""
    tokenizer = build_sp_tokenizer()
    tokenizer.add_tokens([VIDEO_TOKEN], special_tokens=True)
    config = tiny_video_llava_config(tokenizer, frames, **geometry)
    model = _random_model(PrunableVideoLlavaForConditionalGeneration, config, seed)
    with torch.no_grad():  # <video> rows too, as _random_model does for <image>
        model.get_input_embeddings().weight[config.video_token_id].zero_()
        model.lm_head.weight[config.video_token_id].zero_()
    return model, tokenizer, video_llava_processor(config.vision_config.image_size)


def _random_model(model_class, config, seed: int):
    """``model_class(config)`` from ``seed``, with zero ``<image>`` rows in the embedding and the LM head."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[config.image_token_id].zero_()
        model.lm_head.weight[config.image_token_id].zero_()
    return model


def image_processor_for(image_size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def build_tiny_model(seed: int = 0, **geometry) -> tuple[PrunableLlavaForConditionalGeneration, LlamaTokenizer, CLIPImageProcessorPil]:
    """A random tiny model in memory, with its (sentencepiece-derived) tokenizer and image processor.

    The ``<image>`` rows of the embedding and the LM head are zero: the original-format loader adds that token
    itself and zero-fills its rows, so both formats of one seed hold identical weights.
    """
    tokenizer = build_sp_tokenizer()
    config = tiny_configs(tokenizer, **geometry)
    model = _random_model(PrunableLlavaForConditionalGeneration, config, seed)
    return model, tokenizer, image_processor_for(config.vision_config.image_size)


def _upstream_text_config(text: LlamaConfig, vocab_size: int) -> dict:
    """The ``LlamaConfig`` keys a transformers 4.36/4.37 ``config.json`` has (``rope_theta``, ``rope_scaling``)."""
    rope = text.rope_parameters or {}
    return {
        "attention_bias": text.attention_bias,
        "attention_dropout": text.attention_dropout,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "initializer_range": text.initializer_range,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pad_token_id": text.pad_token_id,
        "pretraining_tp": 1,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": UPSTREAM_TRANSFORMERS,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _save_clip_tower(model: PrunableLlavaForConditionalGeneration, processor, folder: Path) -> None:
    """The tower as a transformers-4.x ``CLIPVisionModel.save_pretrained`` writes it (``vision_model.*`` keys),
    with a preprocessor_config.json in openai/clip-vit-large-patch14-336's own form."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = model.config.vision_config
    weights = {"vision_model." + k: v.contiguous() for k, v in model.model.vision_tower.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in vision.to_diff_dict().items() if k not in ("dtype", "transformers_version", "architectures")}
    config.update(architectures=["CLIPVisionModel"], torch_dtype="float32", transformers_version=UPSTREAM_TRANSFORMERS)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    preprocessor = {
        "crop_size": vision.image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(processor.image_mean),
        "image_std": list(processor.image_std),
        "resample": 3,  # bicubic
        "size": vision.image_size,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))


def hub_cache_folder(hf_cache: Path, repo_id: str, revision: str = "main") -> Path:
    """Where ``huggingface_hub`` keeps a model snapshot: ``models--org--name/snapshots/<commit>`` + ``refs/<revision>``.

    The commit is a fixed fake hash (there is no hub here); ``refs/main`` points at it as a real cache does.
    """
    repo = Path(hf_cache) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return repo / "snapshots" / commit


def _save_llm_weights(weights: dict[str, torch.Tensor], out: Path, layout: str) -> None:
    """One ``model.safetensors``, one ``pytorch_model.bin``, or ``pytorch_model-0000i-of-0000n.bin`` shards
    with the ``pytorch_model.bin.index.json`` that transformers 4.x ``save_pretrained`` writes."""
    weights = {k: v.contiguous() for k, v in weights.items()}
    if layout == "safetensors":
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(weights, out / "pytorch_model.bin")
    else:
        keys = list(weights)
        per_shard = -(-len(keys) // BIN_SHARDS)
        weight_map = {}
        for i in range(BIN_SHARDS):
            name = f"pytorch_model-{i + 1:05d}-of-{BIN_SHARDS:05d}.bin"
            shard = {k: weights[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
            torch.save(shard, out / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _save_llava_format(
    model: PrunableLlavaForConditionalGeneration,
    processor,
    out: Path,
    weights: str = "safetensors",
    tower_keys_in_llm: bool = False,
    tower_hub_id: str | None = None,
    hf_cache: str | Path | None = None,
) -> None:
    """Original LLaVA layout, as upstream's train.py + ``safe_save_model_for_hf_trainer`` leave it."""
    config = model.config
    vocab = config.image_token_id  # the sentencepiece vocabulary; <image> (the last id) is not part of it
    if vocab != config.text_config.vocab_size - 1:
        raise ValueError("the tiny model's <image> token must be its last id")
    llm = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            llm["model." + key[len("model.language_model.") :]] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            layer = {"1": 0, "2": 2}[key[len("model.multi_modal_projector.linear_")]]
            llm[f"model.mm_projector.{layer}." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("lm_head."):
            llm[key] = value
        elif key.startswith("model.vision_tower.") and tower_keys_in_llm:  # saved without DeepSpeed / v1.6
            llm["model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower.") :]] = value
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        llm[key] = llm[key][:vocab]
    out.mkdir(parents=True, exist_ok=True)
    _save_llm_weights(llm, out, weights)

    if tower_hub_id is not None:
        if hf_cache is None:
            raise ValueError("tower_hub_id needs hf_cache, the Hugging Face cache folder to write the tower into")
        tower_folder, tower_name = hub_cache_folder(Path(hf_cache), tower_hub_id), tower_hub_id
    else:
        tower_folder = out / VISION_TOWER_DIR
        tower_name = str(tower_folder.resolve())  # upstream's build_vision_tower needs an existing path or a hub id
    _save_clip_tower(model, processor, tower_folder)

    max_length = config.text_config.max_position_embeddings
    llava_config = {
        "_name_or_path": "tiny-vicuna",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **_upstream_text_config(config.text_config, vocab),
        # llava_arch.initialize_vision_modules
        "mm_vision_tower": tower_name,
        "use_mm_proj": True,
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        # train.py
        "image_aspect_ratio": "pad",
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": max_length,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "mm_use_im_start_end": False,
        "mm_projector_lr": None,
        "mm_use_im_patch_token": False,
    }
    (out / "config.json").write_text(json.dumps(dict(sorted(llava_config.items())), indent=2))
    _slow_tokenizer_files(out, max_length)


def save_tiny_checkpoint(
    out: str | Path,
    format: str = "hf",
    seed: int = 0,
    *,
    weights: str = "safetensors",
    tower_keys_in_llm: bool = False,
    tower_hub_id: str | None = None,
    hf_cache: str | Path | None = None,
    family: str = "llava",
    **geometry,
) -> Path:
    """Write a tiny random checkpoint; the same seed gives the same weights in both formats.

    Original-format options (``format="llava"``): ``weights`` is ``safetensors``, ``bin`` or ``bin-shards``
    (two ``pytorch_model-*.bin`` shards with their index); ``tower_keys_in_llm`` also writes the tower as
    ``model.vision_tower.vision_tower.vision_model.*`` in the LLM weights; ``tower_hub_id`` with ``hf_cache``
    writes the tower into that Hugging Face cache and names it by hub id in ``mm_vision_tower``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family != "llava" and (format != "hf" or weights != "safetensors" or tower_keys_in_llm or tower_hub_id):
        raise ValueError(f"--family {family} writes the Hugging Face layout only (format 'hf')")
    if family == "llava_next":
        out = Path(out)
        model, tokenizer, processor = build_tiny_next_model(seed=seed, **geometry)
        model.save_pretrained(out)
        processor.save_pretrained(out)  # the tokenizer files and the image processor
        return out
    if family == "video_llava":
        out = Path(out)
        model, tokenizer, processor = build_tiny_video_llava_model(seed=seed, **geometry)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        processor.save_pretrained(out)
        return out
    if family == "qwen2_5_vl":
        out = Path(out)
        text_layers = geometry.pop("text_layers", 4)
        geometry.pop("image_size", None), geometry.pop("patch_size", None)  # Qwen's ViT is 14 px patches, any size
        model, tokenizer, processor = build_tiny_qwen_model(seed=seed, text_layers=text_layers, **geometry)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        processor.save_pretrained(out)
        return out
    if format not in ("hf", "llava"):
        raise ValueError(f"format must be 'hf' or 'llava', got {format!r}")
    if weights not in WEIGHT_LAYOUTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_LAYOUTS)}, got {weights!r}")
    if format == "hf" and (weights != "safetensors" or tower_keys_in_llm or tower_hub_id):
        raise ValueError("weights, tower_keys_in_llm and tower_hub_id apply to format='llava' only")
    out = Path(out)
    model, tokenizer, processor = build_tiny_model(seed=seed, **geometry)
    if format == "hf":
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        processor.save_pretrained(out)
    else:
        _save_llava_format(model, processor, out, weights, tower_keys_in_llm, tower_hub_id, hf_cache)
    return out


def random_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A reproducible noise image (width, height) for tests and smoke runs."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", choices=FAMILIES, default="llava", help="VLM family (llava: LLaVA-1.5)")
    parser.add_argument("--format", choices=["hf", "llava"], default="hf")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    llava = parser.add_argument_group("original (--format llava) layout")
    llava.add_argument("--weights", choices=WEIGHT_LAYOUTS, default="safetensors", help="LLM weight files")
    llava.add_argument("--tower-keys-in-llm", action="store_true", help="also write model.vision_tower.vision_tower.* keys")
    llava.add_argument("--tower-hub-id", help=f"write the tower into --hf-cache under this hub id (e.g. {CLIP_HUB_ID})")
    llava.add_argument("--hf-cache", help="Hugging Face hub cache folder for --tower-hub-id (e.g. ~/.cache/huggingface/hub)")
    args = parser.parse_args(argv)
    if args.image_size % args.patch_size:
        parser.error(f"--image-size {args.image_size} must be a multiple of --patch-size {args.patch_size}")
    if args.format == "hf" and (args.weights != "safetensors" or args.tower_keys_in_llm or args.tower_hub_id):
        parser.error("--weights, --tower-keys-in-llm and --tower-hub-id apply to --format llava only")
    if args.family != "llava" and args.format != "hf":
        parser.error(f"--family {args.family} writes the Hugging Face layout only: use --format hf")
    if bool(args.tower_hub_id) != bool(args.hf_cache):
        parser.error("--tower-hub-id and --hf-cache go together")
    path = save_tiny_checkpoint(
        args.out, args.format, args.seed, weights=args.weights, tower_keys_in_llm=args.tower_keys_in_llm,
        tower_hub_id=args.tower_hub_id, hf_cache=args.hf_cache, family=args.family,
        text_layers=args.text_layers, image_size=args.image_size, patch_size=args.patch_size,
    )  # fmt: skip
    n = (args.image_size // args.patch_size) ** 2
    if args.family == "qwen2_5_vl":
        lo, hi = QWEN_TOKEN_RANGE
        print(f"wrote tiny Qwen2.5-VL to {path} ({lo}-{hi} merged vision tokens per image, {args.text_layers} LLM layers)")
    elif args.family == "video_llava":
        print(f"wrote tiny Video-LLaVA to {path} ({VIDEO_FRAMES} x {n + 1} tokens per video, {n} per image, "
              f"{args.text_layers} LLM layers)")
    elif args.family == "llava_next":
        print(f"wrote tiny LLaVA-NeXT to {path} ({n} tokens per crop, {args.text_layers} LLM layers)")
    else:
        print(f"wrote tiny {args.format}-format LLaVA to {path} ({n} vision tokens, {args.text_layers} LLM layers)")


if __name__ == "__main__":
    main()
