"""Batched question answering shared by run_llava, the eval answer generators and the demo."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learnpruner_ext.cut import left_pad

from .constants import DEFAULT_IMAGE_TOKEN
from .conversation import check_conv_mode, get_conv_template
from .mm_utils import image_inputs, tokenizer_image_token, video_inputs


def build_prompt(question: str, conv_mode: str = "vicuna_v1", with_image: bool = True) -> str:
    """One user turn with the image first (unless the question already places ``<image>``); ``with_image=False``
    for a text-only prompt (the question as it is).

    Refuses (``ValueError``) an empty question and one with more than one ``<image>`` (one image per prompt).
    """
    if not with_image:
        conv = get_conv_template(conv_mode)
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()
    if not question or not question.strip():
        raise ValueError("the question is empty; give a question about the image (e.g. --query 'What is shown?')")
    if question.count(DEFAULT_IMAGE_TOKEN) > 1:
        raise ValueError(
            f"the question contains {question.count(DEFAULT_IMAGE_TOKEN)} '{DEFAULT_IMAGE_TOKEN}' tokens but one image is "
            f"given; remove the extra '{DEFAULT_IMAGE_TOKEN}' (the image is placed before the question by default)"
        )
    if DEFAULT_IMAGE_TOKEN not in question:
        question = DEFAULT_IMAGE_TOKEN + "\n" + question
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def left_padded(ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded ``input_ids`` [B, S] and ``attention_mask`` [B, S] (0 on the padding)."""
    rows = [torch.tensor(x, dtype=torch.long) for x in ids]
    return left_pad(rows, pad_token_id), left_pad([torch.ones_like(r) for r in rows], 0)


def is_video(item) -> bool:
    """A visual input is an image (``PIL.Image``) or a video: a list of frames (``llava.video.load_video``)."""
    return isinstance(item, (list, tuple))


def prepare_batch(model, tokenizer, image_processor, images: list, prompts: list[str]) -> dict:
    """Left-padded ``input_ids``/``attention_mask`` with each ``<image>`` expanded to its image's N_i placeholders
    (``model.image_token_counts``: N for LLaVA-1.5, the anyres count for LLaVA-NeXT, t*h*w/4 for Qwen2.5-VL), and
    the vision inputs. An item of ``images`` may be a video (a list of frames, Video-LLaVA): its prompt's
    ``<image>`` marker becomes F x (P + 1) ``<video>`` placeholders."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    stills = [item for item in images if not is_video(item)]
    videos = [item for item in images if is_video(item)]
    vision = image_inputs(stills, image_processor, model.config) if stills else {}
    layout = vision.get("image_grid_thw", vision.get("image_sizes"))  # what the family counts N_i from
    still_counts = iter(model.image_token_counts(layout, num_images=len(stills)) if stills else [])
    if videos:
        vision.update(video_inputs(videos, image_processor, model.config))
        video_counts = iter(model.video_token_counts([len(v) for v in videos]))
    placeholder = {False: model.config.image_token_id, True: getattr(model.config, "video_token_id", None)}
    ids = []
    for item, prompt in zip(images, prompts):
        count = next(video_counts) if is_video(item) else next(still_counts)
        ids.append(tokenizer_image_token(prompt, tokenizer, placeholder[is_video(item)], num_image_tokens=count,
                                         expected_images=1))  # fmt: skip
    input_ids, attention_mask = left_padded(ids, tokenizer.pad_token_id)
    dtype = next(model.parameters()).dtype
    batch = {"input_ids": input_ids.to(model.device), "attention_mask": attention_mask.to(model.device)}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in vision:
            batch[key] = vision[key].to(model.device, dtype)
    for key in ("image_sizes", "image_grid_thw"):
        if key in vision:
            batch[key] = vision[key].to(model.device)
    if "image_grid_thw" in vision:  # M-RoPE: generate() builds 3D positions from the image tokens' type (1)
        batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    return batch


@dataclass
class GenerationSettings:
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    max_new_tokens: int = 128

    def __post_init__(self):
        if not (isinstance(self.num_beams, int) and self.num_beams >= 1):
            raise ValueError(f"--num_beams must be an integer >= 1 (1 = greedy), got {self.num_beams!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"--max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p!r}")

    def kwargs(self, tokenizer, conv_mode: str) -> dict:
        sampling = self.temperature > 0
        out = dict(
            do_sample=sampling,
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(tokenizer, conv_mode),
        )
        if sampling:
            out.update(temperature=self.temperature, top_p=self.top_p)
        return out


def stop_token_ids(tokenizer, conv_mode: str) -> list[int]:
    """Where decoding stops: the tokenizer's eos and the template's end-of-turn marker when the tokenizer holds it
    as one special token (ChatML's ``<|im_end|>``; Vicuna's ``</s>`` is the eos already; plain's ``\\n`` is text).
    Real Qwen2.5-VL checkpoints stop there through their generation config; a tokenizer whose eos is ``</s>``
    (the tiny and toy Qwen models) would otherwise run past the answer."""
    end = get_conv_template(conv_mode).sep2
    special = {token.content: i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids = [tokenizer.eos_token_id, special.get(end)]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.inference_mode()
def generate_answers(
    model, tokenizer, image_processor, images: list, questions: list[str],
    conv_mode: str = "vicuna_v1", settings: GenerationSettings | None = None,
) -> list[str]:  # fmt: skip
    """Answer each (image or video, question) pair; batched greedy decoding equals one-by-one decoding."""
    settings = settings or GenerationSettings()
    check_conv_mode(model.family, conv_mode)
    batch = prepare_batch(model, tokenizer, image_processor, images, [build_prompt(q, conv_mode) for q in questions])
    output = model.generate(**batch, **settings.kwargs(tokenizer, conv_mode))
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
