"""Original-format LLaVA folders load as upstream LLaVA loads them (haotian-liu/LLaVA c121f04, transformers 4.31-4.37).

The folders are written by ``learnpruner_ext.tiny --format llava`` in the layout of ``liuhaotian/llava-v1.5-7b``:
a sentencepiece ``tokenizer.model`` (no ``tokenizer.json``), ``pytorch_model-*.bin`` shards with their index,
``mm_vision_tower`` a hub id resolved from an offline Hugging Face cache, and (as folders saved without
DeepSpeed carry them) the tower's weights again as ``model.vision_tower.vision_tower.vision_model.*``.
"""

import json
import warnings

import pytest
import sentencepiece as spm
import torch
from PIL import Image
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoTokenizer

from learnpruner_ext.tiny import CLIP_HUB_ID, CLIP_MEAN, hub_cache_folder, save_tiny_checkpoint
from learnpruner_ext.visualize import processor_background
from llava.inference import build_prompt, prepare_batch
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model, resolve_device
from llava.model.tokenizer import SlowLlamaTokenizer

QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]
IMAGE_PLACEHOLDER = -200  # upstream's IMAGE_TOKEN_INDEX, spliced in by its tokenizer_image_token


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-home") / "hub"


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory, hf_cache, tiny_geometry):
    """llava-v1.5-7b's layout; same seed and geometry as the session's ``tiny_hf``."""
    out = tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny"
    return save_tiny_checkpoint(out, "llava", seed=0, weights="bin-shards", tower_keys_in_llm=True,
                                tower_hub_id=CLIP_HUB_ID, hf_cache=hf_cache, **tiny_geometry)  # fmt: skip


@pytest.fixture()
def offline_cache(monkeypatch, hf_cache):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def load(path):
    tokenizer, model, processor, _ = load_pretrained_model(str(path), None, None, device="cpu", dtype="float32")
    return tokenizer, model, processor


def logits_of(loaded, images):
    tokenizer, model, processor = loaded
    batch = prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in QUESTIONS])
    return batch["input_ids"], model(**batch).logits


def test_real_layout_is_written_as_upstream_writes_it(real_layout, hf_cache):
    names = {p.name for p in real_layout.iterdir()}
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "pytorch_model.bin.index.json",
            "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"} <= names  # fmt: skip
    assert "tokenizer.json" not in names and not any(n.endswith(".safetensors") for n in names)
    config = json.loads((real_layout / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["mm_vision_tower"] == CLIP_HUB_ID and config["transformers_version"].startswith("4.")
    assert {"use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tokenizer_model_max_length",
            "tokenizer_padding_side", "rope_theta", "pad_token_id", "torch_dtype"} <= set(config)  # fmt: skip
    assert (config["image_aspect_ratio"], config["mm_projector_type"], config["mm_vision_select_layer"]) == ("pad", "mlp2x_gelu", -2)
    tokenizer_config = json.loads((real_layout / "tokenizer_config.json").read_text())
    assert (tokenizer_config["tokenizer_class"], tokenizer_config["legacy"], tokenizer_config["add_bos_token"]) == ("LlamaTokenizer", False, True)
    # <image> is not in the vocabulary: the weights cover exactly the sentencepiece pieces
    sp = spm.SentencePieceProcessor(model_file=str(real_layout / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2) and config["vocab_size"] == sp.get_piece_size()
    index = json.loads((real_layout / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert index["model.embed_tokens.weight"] != index["lm_head.weight"]  # really sharded
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in index)
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias"} <= set(index)
    tower = hub_cache_folder(hf_cache, CLIP_HUB_ID)
    tower_config = json.loads((tower / "config.json").read_text())
    assert tower_config["architectures"] == ["CLIPVisionModel"]
    from safetensors import safe_open

    with safe_open(str(tower / "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())  # transformers 4.x CLIPVisionModel names


def test_real_layout_loads_and_equals_hf_format(real_layout, tiny_hf, images, offline_cache):
    """The same seed in both formats: identical prompt ids and logits (bin shards, hub-id tower, tower keys)."""
    loaded = load(real_layout)
    assert isinstance(loaded[0], SlowLlamaTokenizer)
    ids, logits = logits_of(loaded, images)
    ref_ids, ref_logits = logits_of(load(tiny_hf), images)
    assert torch.equal(ids, ref_ids)
    assert (logits - ref_logits).abs().max() == 0


def test_prompt_ids_equal_sentencepiece_and_upstream_recipe(real_layout, offline_cache):
    """Ground truth: the sentencepiece library itself. Upstream's tokenizer_image_token tokenizes each chunk
    with BOS and strips BOS from all chunks but the first; the slow Llama tokenizer with ``legacy: false``
    gives sp's ids for text that does not follow a special token."""
    tokenizer, model, _ = load(real_layout)
    sp = spm.SentencePieceProcessor(model_file=str(real_layout / "tokenizer.model"))
    prompt = build_prompt(QUESTIONS[0])
    before, after = prompt.split("<image>")
    n = model.num_image_tokens
    ours = tokenizer_image_token(prompt, tokenizer, model.config.image_token_id, num_image_tokens=n)
    expected = [sp.bos_id(), *sp.encode(before), *[model.config.image_token_id] * n, *sp.encode(after)]
    assert ours == expected
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    upstream = chunks[0] + [IMAGE_PLACEHOLDER] + chunks[1][1:]
    assert [IMAGE_PLACEHOLDER if t == model.config.image_token_id else t for t in ours[: len(chunks[0]) + 1]] + ours[len(chunks[0]) + n :] == upstream
    assert sp.id_to_piece(ours[1]).startswith("▁")  # the leading ▁ that AutoTokenizer on model_type llava drops:
    with warnings.catch_warnings():  # AutoConfig reading the 4.x config's rope_scaling: null
        warnings.simplefilter("ignore", FutureWarning)
        auto = AutoTokenizer.from_pretrained(real_layout)
    assert auto(before).input_ids != [sp.bos_id(), *sp.encode(before)]


@pytest.mark.parametrize("legacy", [False, True])
def test_legacy_flag_after_special_tokens(real_layout, tmp_path, legacy):
    """transformers 4.36 ``LlamaTokenizer``: ``legacy: true`` encodes the text after ``</s>`` with sentencepiece's
    dummy prefix ``▁``; ``legacy: false`` encodes it without (sp with ``add_dummy_prefix`` off)."""
    for name in ("tokenizer.model", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((real_layout / name).read_bytes())
    config = json.loads((real_layout / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    tokenizer = SlowLlamaTokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    proto = sentencepiece_model_pb2.ModelProto.FromString((tmp_path / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    tail = (sp if legacy else no_prefix).encode("USER: yes")
    assert tokenizer("Hi</s>USER: yes").input_ids == [1, *sp.encode("Hi"), 2, *tail]
    assert sp.encode("USER: yes") != no_prefix.encode("USER: yes")  # the two readings really differ
    text = "A chat\nwith  spaces, digits 2024 and bytes ü"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == sp.decode(sp.encode(text)) == text


def test_tower_keys_ignored_unless_unfreeze(real_layout, tmp_path, images, offline_cache):
    """Upstream builds CLIPVisionTower with delay_load=True, so the LLM weights' tower keys have no module and
    are dropped; the tower comes from mm_vision_tower. With ``unfreeze_mm_vision_tower`` the tower is built
    first and those keys overwrite it."""
    folder = tmp_path / "llava-zeroed-tower-keys"
    folder.mkdir()
    for f in real_layout.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    for shard in folder.glob("pytorch_model-*.bin"):
        state = torch.load(shard, weights_only=True)
        state = {k: torch.zeros_like(v) if k.startswith("model.vision_tower.") else v for k, v in state.items()}
        torch.save(state, shard)
    _, ref = logits_of(load(real_layout), images)
    _, ignored = logits_of(load(folder), images)
    assert (ignored - ref).abs().max() == 0
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "unfreeze_mm_vision_tower": True}))
    _, used = logits_of(load(folder), images)
    assert (used - ref).abs().max() > 1e-3


def test_hub_id_tower_from_hf_home(real_layout, hf_cache, monkeypatch, tiny_geometry):
    """As huggingface_hub: without HF_HUB_CACHE the cache is HF_HOME/hub."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_cache.parent))
    _, model, _ = load(real_layout)
    assert model.num_vision_tokens == (tiny_geometry["image_size"] // tiny_geometry["patch_size"]) ** 2


def test_hub_id_tower_missing_names_id_and_fix(real_layout, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match=r"openai/clip-vit-large-patch14-336.*HF_HUB_CACHE"):
        load(real_layout)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_bin_shard_names_the_file(real_layout, tmp_path, offline_cache):
    folder = tmp_path / "llava-truncated"
    folder.mkdir()
    for f in real_layout.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    truncate(folder / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(ValueError, match=r"pytorch_model-00002-of-00002\.bin.*truncated or corrupt"):
        load(folder)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"pytorch_model-00002-of-00002\.bin.*missing"):
        load(folder)


@pytest.mark.parametrize("fmt", ["llava", "hf"])
def test_truncated_safetensors_names_the_file(tmp_path, fmt):
    folder = save_tiny_checkpoint(tmp_path / fmt, fmt, seed=0, text_layers=1)
    truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        load(folder)


def test_pad_colour_truncates_like_upstream():
    """Upstream: ``expand2square(image, tuple(int(x*255) for x in image_processor.image_mean))``. CLIP's mean
    x 255 = (122.77, 116.75, 104.09), truncated (122, 116, 104); rounding would give (123, 117, 104)."""

    class Recorder:
        image_mean = CLIP_MEAN

        def __call__(self, images, return_tensors):
            self.images = images
            return {"pixel_values": torch.zeros(len(images), 3, 1, 1)}

    recorder = Recorder()
    wide = Image.new("RGB", (4, 2), (0, 0, 0))
    process_images([wide], recorder, None)
    square = recorder.images[0]
    assert square.size == (4, 4)
    assert square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((0, 1)) == (0, 0, 0)
    assert processor_background(recorder) == (122, 116, 104)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_value_error():
    with pytest.raises(ValueError, match="CUDA is not available; use --device cpu"):
        resolve_device("cuda")


def test_projector_only_folder_with_model_base(real_layout, tmp_path, images, offline_cache):
    """Upstream's ``model_base`` branch: LLM weights and tokenizer from the base, ``mm_projector.bin`` from the
    checkpoint folder (a stage-1 output: config.json + mm_projector.bin only)."""
    base, projector = tmp_path / "vicuna-base", tmp_path / "llava-v1.5-mlp2x-projector"
    base.mkdir(), projector.mkdir()
    state = {}
    for shard in real_layout.glob("pytorch_model-*.bin"):
        state.update(torch.load(shard, weights_only=True))
    torch.save({k: v for k, v in state.items() if "mm_projector" not in k}, base / "pytorch_model.bin")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).write_bytes((real_layout / name).read_bytes())
    torch.save({k: v for k, v in state.items() if "mm_projector" in k}, projector / "mm_projector.bin")
    (projector / "config.json").write_bytes((real_layout / "config.json").read_bytes())
    tokenizer, model, processor, _ = load_pretrained_model(str(projector), str(base), None, device="cpu", dtype="float32")
    _, logits = logits_of((tokenizer, model, processor), images)
    _, ref = logits_of(load(real_layout), images)
    assert (logits - ref).abs().max() == 0


def test_llava_1_6_anyres_is_refused_clearly(tiny_llava, tmp_path):
    folder = tmp_path / "llava-v1.6-like"
    folder.mkdir()
    for f in tiny_llava.iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}))
    with pytest.raises(ValueError, match="anyres.*not supported"):
        load(folder)
