"""``load_pretrained_model`` with upstream LLaVA's signature and return shape.

Two checkpoint layouts load onto the same class, :class:`PrunableLlavaForConditionalGeneration`:

* HF format (``LlavaForConditionalGeneration``, as llava-hf publishes): loaded by ``from_pretrained``.
* Original LLaVA format (``LlavaLlamaForCausalLM`` config with ``mm_vision_tower``, ``mm_projector_type=
  mlp2x_gelu``, weights ``model.mm_projector.*``, CLIP tower in its own folder or a hub id in the local HF
  cache): the config and weight names are mapped at load time, following upstream haotian-liu/LLaVA c121f04
  (``llava/model/builder.py``, ``llava_arch.py``, ``multimodal_encoder/clip_encoder.py``) run with
  transformers 4.31-4.37: the slow sentencepiece tokenizer, tower weights from ``mm_vision_tower``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers import LlavaNextImageProcessorPil, Qwen2VLImageProcessorPil, VideoLlavaImageProcessor
from transformers.initialization import no_init_weights
from transformers.utils import is_torchvision_available

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.modeling import PrunableLlavaForConditionalGeneration, PrunableLlavaNextForConditionalGeneration
from learnpruner_ext.modeling import PrunableQwen2_5_VLForConditionalGeneration, PrunableVideoLlavaForConditionalGeneration

from ..constants import DEFAULT_IMAGE_TOKEN
from .tokenizer import SlowLlamaTokenizer

DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[2] / "checkpoints" / "toy-llava"
_CLIP_VISION_MODULES = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
# LlamaConfig fields read from an original-format config.json (transformers 4.31-4.37 names); the rest
# (mm_*, training flags, transformers_version, torch_dtype, ...) are upstream LLaVA's own keys.
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
               "rms_norm_eps", "use_cache", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout",
               "mlp_bias", "pretraining_tp", "bos_token_id", "eos_token_id", "pad_token_id")  # fmt: skip
_TOWER_PREFIX = "model.vision_tower.vision_tower."  # CLIPVisionTower.vision_tower (a CLIPVisionModel)
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read (truncated, corrupt, or inconsistent)."""


# the prunable model class of each supported transformers ``model_type``
PRUNABLE_CLASSES = {"llava": PrunableLlavaForConditionalGeneration, "llava_next": PrunableLlavaNextForConditionalGeneration,
                    "qwen2_5_vl": PrunableQwen2_5_VLForConditionalGeneration,
                    "video_llava": PrunableVideoLlavaForConditionalGeneration}  # fmt: skip


def _hf_model_class(path: Path):
    """The prunable class of an llava-hf folder, by its config's ``model_type``."""
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in PRUNABLE_CLASSES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(PRUNABLE_CLASSES)}")
    return PRUNABLE_CLASSES[model_type]


def image_processor_class():
    """torchvision's fast processor when installed, else the PIL one (same outputs, no warning).

    Imported only when torchvision is there: naming ``CLIPImageProcessor`` without it logs a fallback warning.
    """
    if not is_torchvision_available():
        return CLIPImageProcessorPil
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# Qwen2.5-VL in LearnPruner Table 4: "1280 vision tokens, a fixed input resolution": at most 1280 merged tokens of
# 28 x 28 px (Qwen2.5-VL-7B's own max_pixels, 12845056, would allow 16384)
QWEN_PAPER_MAX_PIXELS = 1280 * 28 * 28


def image_pixels_for(model_path: str | Path | None, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> dict | None:  # fmt: skip
    """The resolution range to load a checkpoint with: for Qwen2.5-VL ``{"min_pixels", "max_pixels"}``, where a
    value not given is the checkpoint's own (``preprocessor_config.json``), the maximum capped at
    ``QWEN_PAPER_MAX_PIXELS`` (the paper's 1280-token input); None for fixed-resolution families, which refuse the
    flags. Part of an answers file's run identity."""
    model_type = checkpoint_model_type(model_path) if model_path else None
    if model_type != "qwen2_5_vl":
        if min_pixels is not None or max_pixels is not None:
            name = model_path or "the toy model"
            raise ValueError(f"--min-pixels/--max-pixels set Qwen2.5-VL's dynamic resolution; {name} is "
                             f"{model_type or 'llava'}, whose processor has a fixed input size: drop the flags")  # fmt: skip
        return None
    saved = Path(model_path) / "preprocessor_config.json"
    saved = _read_json(saved) if saved.is_file() else {}
    size = saved.get("size") or {}
    if min_pixels is None:
        min_pixels = saved.get("min_pixels") or size.get("shortest_edge") or 56 * 56
    if max_pixels is None:
        max_pixels = min(saved.get("max_pixels") or size.get("longest_edge") or QWEN_PAPER_MAX_PIXELS, QWEN_PAPER_MAX_PIXELS)
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < --min-pixels <= --max-pixels, got {min_pixels} and {max_pixels}")
    return {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}


def checkpoint_model_type(model_path: str | Path) -> str | None:
    """The checkpoint's family without loading it: ``"llava"`` for an original LLaVA folder, else its config's
    ``model_type`` (``llava``, ``llava_next``, ``video_llava``, ``qwen2_5_vl``); None without a config.json."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    return "llava" if is_llava_format(model_path) else _read_json(config).get("model_type")


def is_llava_format(model_path: str | Path) -> bool:
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return False
    return "mm_vision_tower" in _read_json(config)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot parse {path}: {err}; the file is truncated or corrupt, download it again") from err


def check_safetensors_complete(path: Path) -> None:
    """Cheap truncation check (header only): the file must be as long as its header says."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len)) if 0 < header_len <= size - 8 else None
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        ends = None
    if ends is None or 8 + header_len + max(ends, default=0) > size:
        raise CheckpointError(f"weights file {path} is truncated or corrupt ({size} bytes, header unreadable or "
                              "promising more); download it again")  # fmt: skip


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or ``torch.save`` file, or one clear error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing (listed in the checkpoint's index); download it again")
    try:
        if path.suffix == ".safetensors":
            check_safetensors_complete(path)
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as err:  # torch.load/zipfile/pickle errors
        raise CheckpointError(f"cannot read weights file {path} ({type(err).__name__}: {err}); it is truncated or "
                              "corrupt, download it again") from err  # fmt: skip


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, as transformers 4.x ``from_pretrained`` picks them: the shards
    named by ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` when present, else every
    ``*.safetensors``, else every ``pytorch_model*.bin``."""
    for name in _WEIGHT_INDEXES:
        if (folder / name).is_file():
            index = _read_json(folder / name)
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{folder / name} has no 'weight_map'; the index is corrupt, download it again")
            return [folder / f for f in sorted(set(index["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    return files


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in weight_files(folder):
        out.update(_read_weights_file(f))
    return out


def _hf_hub_cache() -> str:
    """The hub cache folder as huggingface_hub resolves it, read now (not at import): ``HF_HUB_CACHE``, else
    the older ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _resolve_vision_tower(name: str, model_path: Path) -> Path:
    """``mm_vision_tower`` as a folder (absolute, or relative to the checkpoint or the working directory) or a
    hub id already in the local HF cache (upstream's ``CLIPVisionModel.from_pretrained(name)``, offline)."""
    for candidate in (Path(name).expanduser(), model_path / name):
        if (candidate / "config.json").is_file():
            return candidate
    cache = _hf_hub_cache()
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, cache_dir=cache, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any failure means "not available offline"
        raise FileNotFoundError(
            f"vision tower {name!r} (mm_vision_tower in {model_path}/config.json) is neither a folder nor in the "
            f"Hugging Face cache {cache}; download it there (`huggingface-cli download {name}` on a machine with "
            "network, then copy the cache, or set HF_HUB_CACHE / HF_HOME to it) or set mm_vision_tower to its folder"
        ) from err
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"vision tower {name!r}: the cached snapshot {folder} has no config.json; download it again")
    return folder


def _load_tokenizer(model_path: Path):
    """Upstream's ``AutoTokenizer.from_pretrained(model_path, use_fast=False)``: the slow sentencepiece
    tokenizer when the folder has ``tokenizer.model`` and names a Llama tokenizer, else the saved fast one."""
    config_file = model_path / "tokenizer_config.json"
    tokenizer_class = _read_json(config_file).get("tokenizer_class", "") if config_file.is_file() else ""
    if (model_path / "tokenizer.model").is_file() and tokenizer_class in ("", "LlamaTokenizer", "LlamaTokenizerFast"):
        return SlowLlamaTokenizer.from_pretrained(model_path)
    if not (model_path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {model_path}: expected tokenizer.model (+ tokenizer_config.json) or tokenizer.json")
    return AutoTokenizer.from_pretrained(model_path)


def _check_supported(raw: dict) -> None:
    """Refuse (``CheckpointError``, so the CLIs print ``error: ...``) what this loader does not implement."""
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {raw.get('mm_projector_type')!r}: only mlp2x_gelu is supported")
    if raw.get("mm_vision_select_feature", "patch") != "patch" or raw.get("mm_use_im_start_end"):
        raise CheckpointError("only mm_vision_select_feature='patch' without image start/end tokens is supported")
    if raw.get("image_aspect_ratio", "pad") not in ("pad", "square", "resize", None) or "unpad" in raw.get("mm_patch_merge_type", "flat"):
        raise CheckpointError(
            f"image_aspect_ratio {raw.get('image_aspect_ratio')!r} / mm_patch_merge_type {raw.get('mm_patch_merge_type')!r} "
            "(LLaVA-1.6 anyres) is not supported; use a LLaVA-1.5 checkpoint (image_aspect_ratio 'pad', merge 'flat')"
        )


def _llava_to_hf_names(weights: dict[str, torch.Tensor], use_tower_keys: bool) -> dict[str, torch.Tensor]:
    """``LlavaLlamaForCausalLM`` names -> ours; tower keys kept only when ``use_tower_keys``."""
    state = {}
    for key, value in weights.items():
        if key.startswith("model.mm_projector."):
            layer, param = key[len("model.mm_projector.") :].split(".")
            state[f"model.multi_modal_projector.linear_{1 if layer == '0' else 2}.{param}"] = value
        elif key.startswith(_TOWER_PREFIX):
            if use_tower_keys:
                state["model.vision_tower." + key[len(_TOWER_PREFIX) :].removeprefix("vision_model.")] = value
        elif key.startswith("model."):
            state["model.language_model." + key[len("model.") :]] = value
        else:
            state[key] = value
    return state


def _load_llava_format(model_path: Path, model_base: str | None, dtype: torch.dtype, attn: str):
    raw = _read_json(model_path / "config.json")
    _check_supported(raw)
    tokenizer = _load_tokenizer(Path(model_base) if model_base is not None else model_path)  # as upstream
    # Upstream splices IMAGE_TOKEN_INDEX (-200) into the ids; our model reads config.image_token_id instead,
    # so <image> becomes one extra id after the vocabulary. Chunks never contain it: prompt ids are unchanged.
    added = tokenizer.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tower_path = _resolve_vision_tower(raw["mm_vision_tower"], model_path)
    text_config = LlamaConfig(**{k: raw[k] for k in _LLAMA_KEYS if raw.get(k) is not None}, tie_word_embeddings=raw.get("tie_word_embeddings", False))
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

    # Tower keys in the LLM weights (saved without DeepSpeed, or LLaVA-1.6): upstream builds CLIPVisionTower with
    # delay_load=True, so from_pretrained has no module for them and drops them, then loads the tower from
    # mm_vision_tower -- unless unfreeze_mm_vision_tower, where the tower is built first and they overwrite it.
    use_tower_keys = bool(raw.get("unfreeze_mm_vision_tower", False))
    projector_only = model_base is not None and (model_path / "mm_projector.bin").is_file()  # a stage-1 folder
    own = _read_weights_file(model_path / "mm_projector.bin") if projector_only else _weights(model_path)
    state = _llava_to_hf_names(own, use_tower_keys)
    if model_base is not None:  # projector-only / delta checkpoints: LLM weights come from the base
        state = {**_llava_to_hf_names(_weights(Path(model_base)), use_tower_keys), **state}
    for key, value in _weights(tower_path).items():  # CLIPModel ("vision_model.*") or CLIPVisionModel keys
        key = key.removeprefix("vision_model.")
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
        raise CheckpointError(f"embedding has {vocab} rows but config vocab_size is {config.text_config.vocab_size}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"LLaVA-format checkpoint {model_path} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if added:  # the tokenizer gained <image>: grow the embeddings; its rows are zero (the input row is never read)
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[old:].zero_()
            model.get_output_embeddings().weight[old:].zero_()
        model.generation_config.suppress_tokens = [config.image_token_id]
    # upstream's CLIPImageProcessor (transformers 4.x) is the PIL one; the torchvision port resizes differently
    image_processor = CLIPImageProcessorPil.from_pretrained(tower_path)
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
    image_pixels: dict | None = None,
):
    """Load a LLaVA checkpoint in either format -> ``(tokenizer, model, image_processor, context_len)``.

    ``model_path=None`` loads the built-in default (the toy checkpoint shipped in ``checkpoints/``).
    ``pruning`` attaches a method with :func:`learnpruner_ext.apply_pruning`. ``image_pixels``
    (``{"min_pixels": .., "max_pixels": ..}``, see :func:`image_pixels_for`) sets Qwen2.5-VL's resolution range.
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
        for f in path.glob("*.safetensors"):
            check_safetensors_complete(f)
        try:
            model = _hf_model_class(path).from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
        except (SafetensorError, EOFError, RuntimeError) as err:  # a corrupt pytorch_model*.bin
            raise CheckpointError(f"cannot read the weights in {path} ({type(err).__name__}: {err}); a weights "
                                  "file is truncated or corrupt, download it again") from err  # fmt: skip
        if model.config.model_type == "llava_next":
            image_processor = LlavaNextImageProcessorPil.from_pretrained(path)
        elif model.config.model_type == "video_llava":  # images and video frames (its video processor needs torchvision)
            image_processor = VideoLlavaImageProcessor.from_pretrained(path)
        elif model.config.model_type == "qwen2_5_vl":  # Qwen2_5_VLProcessor's video half needs torchvision
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **(image_pixels or {}))
        else:
            image_processor = image_processor_class().from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model = model.to(torch_device).eval()
    if pruning is not None:
        apply_pruning(model, pruning)
    context_len = getattr(model.config.text_config, "max_position_embeddings", 2048)
    return tokenizer, model, image_processor, context_len
