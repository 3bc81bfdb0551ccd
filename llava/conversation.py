"""Conversation templates with upstream LLaVA's exact prompt strings.

``vicuna_v1`` / ``llava_v1`` produce ``"<system> USER: <image>\\nQ ASSISTANT:"``; finished assistant turns
end with ``</s>``. ``qwen2_5_vl`` is Qwen2.5-VL's ChatML template as its processor's chat template renders it:
``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<|vision_start|><image><|vision_end|>Q
<|im_end|>\\n<|im_start|>assistant\\n`` (``<image>`` is expanded to the image's placeholders when tokenised).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum


class SeparatorStyle(Enum):
    TWO = "two"  # "<system> ROLE: msg<sep>ROLE: msg<sep2>..."
    PLAIN = "plain"  # messages concatenated, for projector pretraining
    CHATML = "chatml"  # "<|im_start|>role\nmsg<|im_end|>\n" per turn (Qwen)


@dataclass
class Conversation:
    system: str
    roles: tuple[str, str]
    messages: list[list] = field(default_factory=list)
    sep_style: SeparatorStyle = SeparatorStyle.TWO
    sep: str = " "
    sep2: str = "</s>"
    version: str = "v1"
    image_wrap: tuple[str, str] = ("", "")  # CHATML: the tokens around the image ("<image>\n" becomes wrapped)

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        if self.sep_style is SeparatorStyle.PLAIN:
            return "".join((message or "") + self.sep2 for _, message in self.messages)
        if self.sep_style is SeparatorStyle.CHATML:
            start, end = self.image_wrap
            parts = [f"<|im_start|>system\n{self.system}<|im_end|>\n"]
            for role, message in self.messages:
                if message is None:
                    parts.append(f"<|im_start|>{role}\n")
                else:
                    message = message.replace("<image>\n", f"{start}<image>{end}", 1)
                    parts.append(f"<|im_start|>{role}\n{message}<|im_end|>\n")
            return "".join(parts)
        seps = (self.sep, self.sep2)
        parts = [self.system + seps[0]]
        for i, (role, message) in enumerate(self.messages):
            parts.append(f"{role}: {message}{seps[i % 2]}" if message else f"{role}:")
        return "".join(parts)

    def copy(self) -> "Conversation":
        return copy.deepcopy(self)


conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
)
conv_llava_v1 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
)
conv_llava_plain = Conversation(system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="", sep2="\n", version="plain")

conv_qwen2_5_vl = Conversation(
    system="You are a helpful assistant.", roles=("user", "assistant"), sep_style=SeparatorStyle.CHATML,
    sep="", sep2="<|im_end|>", version="qwen2_5_vl", image_wrap=("<|vision_start|>", "<|vision_end|>"),
)  # fmt: skip

conv_templates = {
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llava_v1": conv_llava_v1,
    "plain": conv_llava_plain,
    "qwen2_5_vl": conv_qwen2_5_vl,
}
FAMILY_CONV_MODES = {"qwen2_5_vl": ("qwen2_5_vl",)}  # families that need their own template (others: any)
default_conversation = conv_vicuna_v1


def check_conv_mode(family: str, conv_mode: str) -> None:
    """Refuse a template the model family was not trained with (a silent source of wrong answers)."""
    allowed = FAMILY_CONV_MODES.get(family)
    if allowed and conv_mode not in allowed:
        raise ValueError(f"a {family} checkpoint needs --conv-mode {' or '.join(allowed)} (its chat template), "
                         f"got {conv_mode!r}")  # fmt: skip


def get_conv_template(name: str) -> Conversation:
    if name not in conv_templates:
        raise ValueError(f"unknown --conv-mode {name!r}; choose one of {', '.join(conv_templates)}")
    return conv_templates[name].copy()
