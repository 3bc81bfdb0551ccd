"""Conversation templates with upstream LLaVA's exact prompt strings.

``vicuna_v1`` / ``llava_v1`` produce ``"<system> USER: <image>\\nQ ASSISTANT:"``; finished assistant turns
end with ``</s>``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum


class SeparatorStyle(Enum):
    TWO = "two"  # "<system> ROLE: msg<sep>ROLE: msg<sep2>..."
    PLAIN = "plain"  # messages concatenated, for projector pretraining


@dataclass
class Conversation:
    system: str
    roles: tuple[str, str]
    messages: list[list] = field(default_factory=list)
    sep_style: SeparatorStyle = SeparatorStyle.TWO
    sep: str = " "
    sep2: str = "</s>"
    version: str = "v1"

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        if self.sep_style is SeparatorStyle.PLAIN:
            return "".join((message or "") + self.sep2 for _, message in self.messages)
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

conv_templates = {
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llava_v1": conv_llava_v1,
    "plain": conv_llava_plain,
}
default_conversation = conv_vicuna_v1


def get_conv_template(name: str) -> Conversation:
    if name not in conv_templates:
        raise ValueError(f"unknown --conv-mode {name!r}; choose one of {', '.join(conv_templates)}")
    return conv_templates[name].copy()
