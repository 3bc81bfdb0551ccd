"""LLaVA instruction data (the LLaVA-665K format) for LPM training.

An entry is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``; ``image``
is relative to ``image_folder`` and absent for text-only samples. A Video-LLaVA sample has ``"video"`` (relative
to the same folder) instead: its frames are sampled uniformly (``llava.video.load_video``) and fill the
``<video>`` placeholders. The JSON list is read once; tokenising
and image decoding happen per item in ``__getitem__``. Structure and image files of the selected subset
are checked up front (every image decoded in full, as ``__getitem__`` would), so a bad sample stops the run
before training starts, naming the sample; all bad images are reported in one error.

A :class:`RecordFilter` selects what is trained on (issue #21, LPM cross-task generalisation): QA turns by
question type (the ``question_type`` field of a human turn: the toy world's generator writes it; other data can
add it) and whole conversations by source dataset (the first folder of ``image``: ``coco``, ``gqa``, ... in
LLaVA-665K).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, VIDEO_FRAMES
from ..conversation import SeparatorStyle, get_conv_template
from ..mm_utils import image_inputs, load_image

logger = logging.getLogger(__name__)
ROLES = {"human": 0, "gpt": 1}


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--data_fraction must be in (0, 1], got {fraction}")
    return fraction


def select_subset(num_entries: int, fraction: float, seed: int) -> list[int]:
    """Reproducible subset: ``round(fraction · n)`` (at least 1) indices drawn with ``random.Random(seed)``, sorted."""
    check_fraction(fraction)
    if fraction == 1.0:
        return list(range(num_entries))
    count = max(1, round(num_entries * fraction))
    return sorted(random.Random(seed).sample(range(num_entries), count))


def _sample_id(entry, index: int) -> str:
    return str(entry.get("id", f"#{index}")) if isinstance(entry, dict) else f"#{index}"


def check_entry(entry, index: int) -> None:
    """Structural checks of one entry; raises ``ValueError`` naming the sample."""
    sid = _sample_id(entry, index)
    if not isinstance(entry, dict):
        raise ValueError(f"sample {sid}: expected a JSON object, got {type(entry).__name__}")
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"sample {sid}: 'conversations' must be a non-empty list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"sample {sid}: turn {i} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.120}")
        if ROLES[turn["from"]] != i % 2:
            raise ValueError(f"sample {sid}: turns must alternate human/gpt starting with human (turn {i} is {turn['from']!r})")
    if not any(t["from"] == "gpt" for t in turns):
        raise ValueError(f"sample {sid}: the conversation has no assistant ('gpt') turn, so nothing would be supervised")
    if entry.get("image") is not None and entry.get("video") is not None:
        raise ValueError(f"sample {sid}: has both 'image' and 'video'; a sample holds one of them")
    image = visual_path(entry)
    count = sum(t["value"].count(DEFAULT_IMAGE_TOKEN) for t in turns)
    if image is None and count:
        raise ValueError(f"sample {sid}: text-only sample (no 'image') contains {DEFAULT_IMAGE_TOKEN}")
    if image is not None and (not isinstance(image, str) or count > 1):
        raise ValueError(f"sample {sid}: expected one image (or video) path and at most one {DEFAULT_IMAGE_TOKEN}")


def visual_path(entry: dict) -> str | None:
    """The sample's image or video path (relative to the image folder), None for text-only samples."""
    return entry.get("image") if entry.get("image") is not None else entry.get("video")


TEXT_ONLY = "text-only"  # the source of a conversation without an image


def entry_source(entry: dict) -> str:
    """The source dataset of a sample: the first folder of its ``image`` path (LLaVA-665K: ``coco``, ``gqa``,
    ``ocr_vqa``, ``textvqa``, ``vg``; the toy world: ``train``), or ``text-only``."""
    image = visual_path(entry)
    return TEXT_ONLY if image is None else Path(image).parts[0]


def _names(value) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")``; None or "" -> ()."""
    if not value:
        return ()
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


QUESTION_TYPE = "question_type"  # the optional field of a human turn that names its question type


@dataclass(frozen=True)
class RecordFilter:
    """Which training records to keep.

    * ``question_types`` / ``exclude_question_types``: keep only the QA turns whose human turn's
      ``question_type`` field is (is not) listed; a conversation left without turns is dropped, ``<image>`` moves
      to its first kept turn. A type the data does not have, or a turn without the field, is an error.
    * ``sources``: keep only the conversations whose :func:`entry_source` is listed.

    Arguments are comma-separated strings or sequences; :meth:`metadata` is what the LPM checkpoint records.
    """

    question_types: tuple[str, ...] = ()
    exclude_question_types: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("question_types", "exclude_question_types", "sources"):
            object.__setattr__(self, name, _names(getattr(self, name)))
        both = sorted(set(self.question_types) & set(self.exclude_question_types))
        if both:
            raise ValueError(f"question type(s) {both} are in both --question_types and --exclude_question_types; "
                             "name each type in one of them")  # fmt: skip

    def active(self) -> bool:
        return bool(self.question_types or self.exclude_question_types or self.sources)

    def metadata(self) -> dict | None:
        """The filter as the LPM's ``lpm_config.json`` records it (None when everything is kept)."""
        if not self.active():
            return None
        return {"question_types": list(self.question_types), "exclude_question_types": list(self.exclude_question_types),
                "sources": list(self.sources)}  # fmt: skip

    def describe(self) -> str:
        """The filter as command-line flags, e.g. ``--question_types count,position``."""
        flags = {"--question_types": self.question_types, "--exclude_question_types": self.exclude_question_types,
                 "--data_sources": self.sources}  # fmt: skip
        return " ".join(f"{flag} {','.join(names)}" for flag, names in flags.items() if names)

    def _keep_type(self, qtype: str) -> bool:
        return (not self.question_types or qtype in self.question_types) and qtype not in self.exclude_question_types

    def _types_of(self, entries: list, where: str) -> Counter:
        """QA turns by question type in ``entries``; raises on a turn without the field or a type not in the data."""
        by_type = Counter()
        for index, entry in enumerate(entries):
            for i in range(0, len(entry["conversations"]) - 1, 2):
                qtype = entry["conversations"][i].get(QUESTION_TYPE)
                if not isinstance(qtype, str):
                    raise ValueError(
                        f"sample {_sample_id(entry, index)}: turn {i} has no {QUESTION_TYPE!r} field, so its question "
                        "type is unknown; --question_types / --exclude_question_types need data whose human turns "
                        "name their type (the toy world's generator writes it); filter other data with --data_sources"
                    )  # fmt: skip
                by_type[qtype] += 1
        for flag, names in (("--question_types", self.question_types), ("--exclude_question_types", self.exclude_question_types)):
            unknown = [t for t in names if t not in by_type]
            if unknown:
                found = ", ".join(f"{t} {n}" for t, n in by_type.items())
                raise ValueError(f"unknown question type(s) {unknown} in {flag}; {where} has these (QA turns): {found}")
        return by_type

    def apply(self, entries: list, where: str = "the data") -> dict[int, dict]:
        """``{index: filtered entry}`` of the entries that keep at least one QA turn (every entry is checked
        with :func:`check_entry` first); raises ``ValueError`` when a source or type is unknown or nothing matches."""
        for index, entry in enumerate(entries):
            check_entry(entry, index)
        present = Counter(entry_source(e) for e in entries)
        unknown = [s for s in self.sources if s not in present]
        if unknown:
            raise ValueError(f"unknown source(s) {unknown} in --data_sources; the sources in {where} are: "
                             f"{', '.join(f'{s} ({n})' for s, n in sorted(present.items()))}")  # fmt: skip
        typed = bool(self.question_types or self.exclude_question_types)
        chosen = [(i, e) for i, e in enumerate(entries) if not self.sources or entry_source(e) in self.sources]
        if typed:
            self._types_of([e for _, e in chosen], where)
        kept = {}
        for index, entry in chosen:
            if not typed:
                kept[index] = entry
                continue
            turns = []
            for i in range(0, len(entry["conversations"]) - 1, 2):
                human, gpt = entry["conversations"][i : i + 2]
                if self._keep_type(human[QUESTION_TYPE]):
                    turns += [dict(human), dict(gpt)]
            if turns:
                kept[index] = {**entry, "conversations": place_image_token(turns) if visual_path(entry) else turns}
        if not kept:
            raise ValueError(f"no sample in {where} matches {self.describe()}")
        return kept


MISSING = "missing"
MAX_LISTED = 10  # bad images named in the error; the counts cover all of them


class BadImagesError(FileNotFoundError, ValueError):
    """Selected samples whose image is missing (a ``FileNotFoundError``) or cannot be decoded (a ``ValueError``)."""


def check_image(path: str | Path) -> str | None:
    """Why the data loader could not use ``path`` (``"missing"`` or the decoder's error), or None if it can.

    Decodes the whole file with :func:`llava.mm_utils.load_image`, as ``__getitem__`` does. ``Image.verify()``
    is not enough: it passes a truncated JPEG, which only a full decode (``load()``) rejects.
    """
    try:
        load_image(path)
    except FileNotFoundError:
        return MISSING
    except ValueError as err:  # load_image's "cannot read image ..." wraps the decoder's error
        return str(err.__cause__ or err)
    return None


def _threads_per_rank() -> int:
    """``concurrent.futures``' default pool size, ``min(32, cores + 4)``, over the cores this rank gets."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(32, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))) + 4)


def find_bad_images(paths: list[Path], threads: int | None = None) -> dict[int, str]:
    """``{position in paths: reason}`` for every image :func:`check_image` rejects.

    A thread pool decodes the files (Pillow releases the GIL while decoding). Under ``torch.distributed`` each
    rank checks every ``world_size``-th file and the results are gathered, so each image is decoded once.
    """
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = range(rank, len(paths), world)
    bad = {}
    with ThreadPoolExecutor(threads or _threads_per_rank()) as pool, tqdm(
        total=len(mine), desc="checking images", unit="img", disable=rank != 0 or not mine
    ) as bar:
        for i, reason in zip(mine, pool.map(check_image, [paths[i] for i in mine])):
            bar.update()
            if reason is not None:
                bad[i] = reason
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, bad)
        bad = {i: reason for part in parts for i, reason in part.items()}
    return dict(sorted(bad.items()))


def place_image_token(turns: list[dict]) -> list[dict]:
    """Upstream LLaVA's convention: the image goes first in the first human turn, ``"<image>\\n" + text``."""
    turns = [dict(t) for t in turns]
    for turn in turns:
        if DEFAULT_IMAGE_TOKEN in turn["value"]:
            turn["value"] = turn["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    turns[0]["value"] = DEFAULT_IMAGE_TOKEN + "\n" + turns[0]["value"]
    return turns


def build_conversation(turns: list[dict], conv_mode: str) -> tuple[str, list[tuple[int, int]]]:
    """The prompt string of the template and the character spans the model is trained to produce.

    * ``vicuna_v1`` (``SeparatorStyle.TWO``): each assistant span runs from right after ``"ASSISTANT:"`` to the end
      of its ``</s>``, as in upstream LLaVA's ``preprocess_v1`` (the answer and its end-of-turn token are
      supervised, nothing else).
    * ``qwen2_5_vl`` (ChatML, ``SeparatorStyle.CHATML``): each assistant span is the answer and its ``<|im_end|>``,
      after ``<|im_start|>assistant\n``; the role header, the ``\n`` after ``<|im_end|>``, the system and user turns
      are not supervised. ``<|im_end|>`` is the Instruct models' end of turn, so the answer and its stop are learnt,
      as with ``</s>`` above. The text is the template's own ``get_prompt()``, so the image sits in
      ``<|vision_start|><image><|vision_end|>`` exactly as at inference.
    """
    conv = get_conv_template(conv_mode)
    if conv.sep_style is SeparatorStyle.CHATML:
        return _build_chatml(conv, turns)
    if conv.sep_style is not SeparatorStyle.TWO:
        raise ValueError(f"conversation template {conv_mode!r} is not a chat template; use 'v1' (vicuna_v1) or "
                         "'qwen2_5_vl'")  # fmt: skip
    seps = (conv.sep, conv.sep2)
    text, spans = conv.system + seps[0], []
    for i, turn in enumerate(turns):
        role = conv.roles[ROLES[turn["from"]]]
        conv.append_message(role, turn["value"])
        head, body = f"{role}:", f" {turn['value']}{seps[i % 2]}"
        if ROLES[turn["from"]] == 1:
            start = len(text) + len(head)
            spans.append((start, start + len(body)))
        text += head + body
    assert text == conv.get_prompt(), "build_conversation is out of sync with Conversation.get_prompt"
    return text, spans


def _build_chatml(conv, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML: the prompt grows one ``<|im_start|>role\nmsg<|im_end|>\n`` turn at a time (the template renders
    each turn); an assistant turn's span is ``msg<|im_end|>``."""
    text, spans = conv.get_prompt(), []
    for turn in turns:
        role = conv.roles[ROLES[turn["from"]]]
        conv.append_message(role, turn["value"])
        grown = conv.get_prompt()
        head, tail = f"<|im_start|>{role}\n", f"{conv.sep2}\n"
        if not (grown.startswith(text) and grown[len(text) :].startswith(head) and grown.endswith(tail)):
            raise AssertionError("build_conversation is out of sync with the ChatML Conversation.get_prompt")
        if ROLES[turn["from"]] == 1:
            spans.append((len(text) + len(head), len(grown) - 1))  # the answer and <|im_end|>, not the "\n"
        text = grown
    return text, spans


def tokenize_conversation(text: str, spans, tokenizer, num_image_tokens: int, image_token_id: int):
    """``input_ids`` as :func:`llava.mm_utils.tokenizer_image_token` gives them, and labels on the spans.

    A token is supervised when its characters overlap an assistant span (offsets from the fast tokenizer).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise NotImplementedError("LPM training needs a fast (tokenizers-backed) tokenizer for label offsets")
    ids, labels, base = [], [], 0
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            base += len(DEFAULT_IMAGE_TOKEN)
        if chunk or i == 0:
            enc = tokenizer(chunk, add_special_tokens=(i == 0), return_offsets_mapping=True)
            for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
                start, end = start + base, end + base
                supervised = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
                ids.append(tok)
                labels.append(tok if supervised else IGNORE_INDEX)
        base += len(chunk)
    return ids, labels


class LazySupervisedDataset(Dataset):
    """LLaVA-665K-style data, tokenised with a chat template, images processed per item."""

    def __init__(
        self,
        data_path: str | Path,
        tokenizer,
        image_processor,
        num_image_tokens: int,
        image_token_id: int,
        image_folder: str | Path | None = None,
        conv_mode: str = "v1",
        model_max_length: int = 2048,
        data_fraction: float = 1.0,
        data_seed: int = 0,
        skip_missing_images: bool = False,
        model_config=None,
        check_images: bool = True,
        image_token_counts=None,
        record_filter: RecordFilter | None = None,
        video_token_counts=None,
        num_frames: int = VIDEO_FRAMES,
    ):
        check_fraction(data_fraction)
        data_path = Path(data_path)
        if not data_path.is_file():
            raise FileNotFoundError(f"--data_path {data_path} does not exist")
        try:
            if data_path.suffix == ".jsonl":
                entries = [json.loads(line) for line in data_path.read_text().splitlines() if line.strip()]
            else:
                entries = json.loads(data_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--data_path {data_path} is not valid JSON: {err}") from None
        if not isinstance(entries, list):
            raise ValueError(f"--data_path {data_path} must hold a JSON list of samples")
        if not entries:
            raise ValueError(f"--data_path {data_path} holds no samples")
        self.total_entries = len(entries)
        pool = list(range(len(entries)))
        if record_filter is not None and record_filter.active():  # filter first: the fraction is of the matches
            kept = record_filter.apply(entries, f"--data_path {data_path}")
            entries = [kept.get(i, entry) for i, entry in enumerate(entries)]
            pool = sorted(kept)
        self.num_matching = len(pool)
        selected = [pool[j] for j in select_subset(len(pool), data_fraction, data_seed)]
        self.image_folder = Path(image_folder) if image_folder is not None else None
        with_image = []
        for index in selected:
            check_entry(entries[index], index)
            if visual_path(entries[index]) is not None:
                if self.image_folder is None:
                    raise ValueError(f"sample {_sample_id(entries[index], index)} has an image: pass --image_folder")
                with_image.append(index)
        paths = {i: self.image_folder / visual_path(entries[i]) for i in with_image}
        videos = {i for i in with_image if entries[i].get("video") is not None}
        if check_images:  # each file once: LLaVA-665K has several samples on most COCO images
            unique = list(dict.fromkeys(p for i, p in paths.items() if i not in videos))
            found = {unique[k]: reason for k, reason in find_bad_images(unique).items()}
            bad = {i: found[path] for i, path in paths.items() if path in found}
        else:  # existence only; an undecodable image then stops training at its step
            bad = {}
        bad.update({i: MISSING for i, path in paths.items() if (i in videos or not check_images) and not path.is_file()})
        self.num_skipped = len(bad)
        self.num_missing = sum(reason == MISSING for reason in bad.values())
        self.num_unreadable = self.num_skipped - self.num_missing
        if bad and not skip_missing_images:
            items = list(bad.items())
            listed = "; ".join(f"sample {_sample_id(entries[i], i)}: entry {i}, {paths[i]}: {reason}"
                               for i, reason in items[:MAX_LISTED])  # fmt: skip
            if len(items) > MAX_LISTED:
                listed += f"; ... and {len(items) - MAX_LISTED} more (all {len(items)} missing: is --image_folder right?)" \
                    if self.num_missing == len(items) else f"; ... and {len(items) - MAX_LISTED} more"
            raise BadImagesError(
                f"{len(bad)} of {len(selected)} selected samples have an image under --image_folder "
                f"{self.image_folder} that is missing ({self.num_missing}) or cannot be decoded "
                f"({self.num_unreadable}): {listed}. Fix or restore these files, or pass --skip_missing_images True "
                "to train without these samples (--check_images False only checks that the files exist)"
            )
        if bad:
            first = next(iter(bad))
            logger.warning(
                "skipping %d samples whose image is missing (%d) or cannot be decoded (%d); first: %s (%s)",
                len(bad), self.num_missing, self.num_unreadable, paths[first], bad[first],
            )  # fmt: skip
        self.entries = [entries[i] for i in selected if i not in bad]
        if not self.entries:
            raise ValueError(f"no usable samples in {data_path} (selected {len(selected)}, skipped {len(bad)})")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.conv_mode = conv_mode
        self.model_max_length = model_max_length
        self.model_config = model_config
        # N_i from the image's layout (model.image_token_counts) where the family has one (LLaVA-NeXT's image_sizes,
        # Qwen2.5-VL's image_grid_thw); LLaVA-1.5: the fixed num_image_tokens
        self.image_token_counts = image_token_counts
        self.video_token_counts, self.num_frames = video_token_counts, num_frames  # Video-LLaVA samples

    def __len__(self) -> int:
        return len(self.entries)

    def fingerprint(self) -> str:
        """sha256 of the samples trained on, in order: changes with the file's content, subset or skips."""
        return hashlib.sha256(json.dumps(self.entries, sort_keys=True).encode()).hexdigest()

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        sid = _sample_id(entry, index)
        has_image = visual_path(entry) is not None
        turns = place_image_token(entry["conversations"]) if has_image else entry["conversations"]
        text, spans = build_conversation(turns, self.conv_mode)
        image = vision = None
        num_image_tokens = self.num_image_tokens
        if entry.get("video") is not None:
            return self._video_item(entry, sid, text, spans)
        if has_image:
            try:
                image = load_image(self.image_folder / entry["image"])
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"sample {sid}: {err}") from None
            vision = image_inputs([image], self.image_processor, self.model_config)
            layout = next((k for k in LAYOUT_KEYS if k in vision), None)
            if layout is not None and self.image_token_counts is not None:
                num_image_tokens = self.image_token_counts(vision[layout])[0]
        ids, labels = self._tokens(text, spans, num_image_tokens, self.image_token_id, sid, has_image)
        item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "id": sid}
        if vision is not None:
            packed = PACKED_LAYOUT in vision  # Qwen2.5-VL: the image's patches [P_i, C*T*p*p], not a batch of one
            item["pixel_values"] = vision["pixel_values"] if packed else vision["pixel_values"][0]
            item.update({k: vision[k][0] for k in LAYOUT_KEYS if k in vision})  # image_sizes [2] / image_grid_thw [3]
        return item

    def _video_item(self, entry: dict, sid: str, text: str, spans) -> dict:
        """A Video-LLaVA sample: F frames -> ``pixel_values_videos`` [F, 3, H, W] behind F x (P + 1) ``<video>`` ids."""
        from ..mm_utils import video_inputs
        from ..video import load_video  # PyAV, the video extra

        if self.video_token_counts is None or getattr(self.model_config, "video_token_id", None) is None:
            raise ValueError(f"sample {sid} has a video, but the model takes no video input; train a Video-LLaVA checkpoint")
        try:
            frames = load_video(self.image_folder / entry["video"], self.num_frames)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"sample {sid}: {err}") from None
        pixels = video_inputs([frames], self.image_processor, self.model_config)["pixel_values_videos"][0]
        [count] = self.video_token_counts([len(frames)])
        ids, labels = self._tokens(text, spans, count, self.model_config.video_token_id, sid, True)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "id": sid, "pixel_values_videos": pixels}

    def _tokens(self, text, spans, num_image_tokens: int, placeholder: int, sid: str, has_image: bool):
        ids, labels = tokenize_conversation(text, spans, self.tokenizer, num_image_tokens, placeholder)
        if len(ids) > self.model_max_length:
            ids, labels = ids[: self.model_max_length], labels[: self.model_max_length]
            if has_image and ids.count(placeholder) != num_image_tokens:
                raise ValueError(
                    f"sample {sid}: --model_max_length {self.model_max_length} cuts through its "
                    f"{num_image_tokens} image tokens; raise --model_max_length"
                )
        return ids, labels


PACKED_LAYOUT = "image_grid_thw"  # Qwen2.5-VL: the images' patches are concatenated, their grids say where each ends
LAYOUT_KEYS = ("image_sizes", PACKED_LAYOUT)  # what a family counts N_i from, batched beside pixel_values


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads ``input_ids``/``labels``; batches the images of the samples that have one, in batch order:
    stacked ``[B_img, 3, H, W]`` (LLaVA-1.5), crops padded to ``[B_img, max crops, 3, H, W]`` + ``image_sizes``
    (LLaVA-NeXT), patches concatenated to ``[Σ P_i, C*T*p*p]`` + ``image_grid_thw`` ``[B_img, 3]`` (Qwen2.5-VL, as its
    processor batches them)."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(x["input_ids"]) for x in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = item["input_ids"], item["labels"], 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [item["pixel_values"] for item in items if "pixel_values" in item]
        if images and PACKED_LAYOUT in next(item for item in items if "pixel_values" in item):
            batch["pixel_values"] = torch.cat(images)
            batch[PACKED_LAYOUT] = torch.stack([item[PACKED_LAYOUT] for item in items if "pixel_values" in item])
        elif images and "image_sizes" in next(item for item in items if "pixel_values" in item):
            # LLaVA-NeXT: pad the crops to the batch max with zeros, as HF's processor does ([B, max crops, 3, H, W])
            crops = max(len(x) for x in images)
            batch["pixel_values"] = torch.stack([torch.cat([x, x.new_zeros(crops - len(x), *x.shape[1:])]) for x in images])
            batch["image_sizes"] = torch.stack([item["image_sizes"] for item in items if "pixel_values" in item])
        elif images:
            batch["pixel_values"] = torch.stack(images)
        videos = [item["pixel_values_videos"] for item in items if "pixel_values_videos" in item]
        if videos:  # Video-LLaVA: [B_vid, F, 3, H, W]
            batch["pixel_values_videos"] = torch.stack(videos)
        return batch
