"""``load_pretrained_model`` with upstream LLaVA's signature and return shape.

Two checkpoint layouts load onto the same class, :class:`PrunableLlavaForConditionalGeneration`:

* HF format (``LlavaForConditionalGeneration``, as llava-hf publishes): loaded by ``from_pretrained``.
* Original LLaVA format (``LlavaLlamaForCausalLM`` config with ``mm_vision_tower``, ``mm_projector_type=
  mlp2x_gelu``, weights ``model.mm_projector.*``, CLIP tower in its own folder): the config and weight
  names are mapped at load time.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.initialization import no_init_weights
from transformers.utils import is_torchvision_available

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.modeling import PrunableLlavaForConditionalGeneration

from ..constants import DEFAULT_IMAGE_TOKEN

DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[2] / "checkpoints" / "toy-llava"
_CLIP_VISION_MODULES = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def image_processor_class():
    """torchvision's fast processor when installed, else the PIL one (same outputs, no warning)."""
    return CLIPImageProcessor if is_torchvision_available() else CLIPImageProcessorPil


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def is_llava_format(model_path: str | Path) -> bool:
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return False
    return "mm_vision_tower" in json.loads(config.read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    out = {}
    for f in bins:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def _resolve_vision_tower(name: str, model_path: Path) -> Path:
    for candidate in (Path(name), model_path / name):
        if (candidate / "config.json").is_file():
            return candidate
    try:  # a hub id that is already in the local HF cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any failure means "not available offline"
        raise FileNotFoundError(
            f"vision tower {name!r} (mm_vision_tower in {model_path}/config.json) is not available locally; "
            "download it and set mm_vision_tower to its folder"
        ) from err


def _load_llava_format(model_path: Path, model_base: str | None, dtype: torch.dtype, attn: str):
    raw = json.loads((model_path / "config.json").read_text())
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise NotImplementedError(f"mm_projector_type {raw.get('mm_projector_type')!r}: only mlp2x_gelu is supported")
    if raw.get("mm_vision_select_feature", "patch") != "patch" or raw.get("mm_use_im_start_end"):
        raise NotImplementedError("only mm_vision_select_feature='patch' without image start/end tokens is supported")
    tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=True)
    added = tokenizer.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tower_path = _resolve_vision_tower(raw["mm_vision_tower"], model_path)
    text_config = LlamaConfig(**{k: v for k, v in raw.items() if not k.startswith("mm_") and k not in ("architectures", "model_type")})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig.from_pretrained(tower_path),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default",
        image_aspect_ratio=raw.get("image_aspect_ratio", "pad"),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
    )
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    config._attn_implementation = attn

    state = {}
    for key, value in _weights(model_path).items():
        if key.startswith("model.mm_projector."):
            layer, param = key[len("model.mm_projector.") :].split(".")
            state[f"model.multi_modal_projector.linear_{1 if layer == '0' else 2}.{param}"] = value
        elif key.startswith("model.vision_tower.vision_tower."):
            state["model.vision_tower." + key[len("model.vision_tower.vision_tower.") :]] = value
        elif key.startswith("model."):
            state["model.language_model." + key[len("model.") :]] = value
        else:
            state[key] = value
    if model_base is not None:  # projector-only / delta checkpoints: LLM weights come from the base
        base = {"model.language_model." + k[len("model.") :] if k.startswith("model.") else k: v
                for k, v in _weights(Path(model_base)).items()}  # fmt: skip
        state = {**base, **state}
    for key, value in _weights(tower_path).items():  # CLIPModel ("vision_model.*") or CLIPVisionModel keys
        key = key[len("vision_model.") :] if key.startswith("vision_model.") else key
        if key.split(".")[0] in _CLIP_VISION_MODULES:
            state.setdefault("model.vision_tower." + key, value)

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = PrunableLlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    vocab = state["model.language_model.embed_tokens.weight"].shape[0]
    if vocab != config.text_config.vocab_size:
        raise ValueError(f"embedding has {vocab} rows but config vocab_size is {config.text_config.vocab_size}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"LLaVA-format checkpoint {model_path} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if added:  # the tokenizer gained <image>: grow the embeddings; the new row is never read (features replace it)
        model.resize_token_embeddings(len(tokenizer))
        model.generation_config.suppress_tokens = [config.image_token_id]
    image_processor = image_processor_class().from_pretrained(tower_path)
    return tokenizer, model.to(dtype), image_processor


def load_pretrained_model(
    model_path: str | None,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map=None,
    device: str | None = "auto",
    use_flash_attn: bool = False,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = None,
    pruning: PruningConfig | None = None,
):
    """Load a LLaVA checkpoint in either format -> ``(tokenizer, model, image_processor, context_len)``.

    ``model_path=None`` loads the built-in default (the toy checkpoint shipped in ``checkpoints/``).
    ``pruning`` attaches a method with :func:`learnpruner_ext.apply_pruning`.
    """
    if load_8bit or load_4bit:
        raise NotImplementedError("8/4-bit loading is not supported by this toolkit")
    if model_path is None:
        model_path = DEFAULT_MODEL_PATH
        if not (Path(model_path) / "config.json").is_file():
            raise FileNotFoundError(
                f"no --model-path given and the built-in default {model_path} is missing; pass --model-path or "
                "create a tiny model with `python -m learnpruner_ext.tiny --out DIR`"
            )
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (config.json missing); hub downloads are not used")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    attn = attn_implementation or ("flash_attention_2" if use_flash_attn else "sdpa")

    if is_llava_format(path):
        tokenizer, model, image_processor = _load_llava_format(path, model_base, torch_dtype, attn)
    else:
        if model_base is not None:
            warnings.warn("--model-base is ignored for HF-format checkpoints", stacklevel=2)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = PrunableLlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
        image_processor = image_processor_class().from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model = model.to(torch_device).eval()
    if pruning is not None:
        apply_pruning(model, pruning)
    context_len = getattr(model.config.text_config, "max_position_embeddings", 2048)
    return tokenizer, model, image_processor, context_len
