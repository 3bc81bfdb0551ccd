"""The loop shared by the answer generators (``model_vqa_loader``, ``model_vqa_science``, ``model_vqa_mmbench``).

A generator only parses its question file into a :class:`Task`: :class:`Item` s (one per prompt to
answer), how an answer line is identified (``answer_key``) and its prompt flags. This module does the rest;
its Python API is :func:`answer` (a ``PruningConfig`` and ``GenerationSettings``, optionally an already
loaded model: the sweep), its CLI :func:`run`:

* upstream LLaVA's flags (``--model-path --model-base --image-folder --question-file --answers-file
  --conv-mode --num-chunks --chunk-idx --temperature --top_p --num_beams --max_new_tokens``), the
  pruning flags (generated from ``PruningConfig``), ``--batch-size``, ``--device``, ``--dtype``;
* chunking (:func:`get_chunk`, upstream's split: ``ceil(n / num_chunks)`` questions per chunk);
* resume: answers already in ``--answers-file`` are skipped; a truncated last line (a run killed
  mid-write) is dropped and redone; a file written by a different method / budget / model /
  settings is refused rather than mixed (the model is identified by its folder name *and* a
  fingerprint of its weights and config, ``llava.model.fingerprint``; the pruning by
  ``dataclasses.asdict(PruningConfig)`` plus the LPM's fingerprint);
* input checks before any model work: malformed question lines (with their line number), missing
  images (all of them, named), answer lines that do not belong to this question file / chunk;
* batching: prompts with an image are batched together (left padding, greedy decoding equals batch
  size 1), text-only prompts are batched separately and run without ``pixel_values``;
* writing: one JSON line per answer, flushed and fsync'ed after every batch, with upstream's fields
  ``question_id, prompt, text, answer_id, model_id, metadata`` plus ``model_fingerprint`` and the token accounting
  ``method, budget, r1, r2, layer, convention, image_tokens, vision_tokens_per_layer`` (per prompt: its image's
  N_i and plan);
* a tqdm progress bar with ETA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from learnpruner_ext import PruningConfig
from learnpruner_ext.atp import ATP_CONFIG, ATP_WEIGHTS
from learnpruner_ext.cli import add_pruning_args, pruning_config_from_args, run_main
from learnpruner_ext.config import budget_notice
from learnpruner_ext.lpm import LPM_CONFIG, LPM_WEIGHTS

from ..inference import GenerationSettings, build_prompt, generate_answers, is_video, left_padded
from ..mm_utils import get_model_name_from_path, load_image, tokenizer_image_token
from ..model.fingerprint import folder_fingerprint, module_fingerprint
from ._io import RUN_KEYS  # the top-level fields of every answer line that name its run (scorers check them too)


class InputError(ValueError):
    """Bad generator input (question file, answers file, images). The message names the file and line."""


# ---------------------------------------------------------------------------------------------- chunks
def split_list(lst: list, n: int) -> list[list]:
    """Upstream LLaVA's split: chunks of ``ceil(len / n)`` items (the last ones may be short or absent)."""
    chunk_size = max(1, math.ceil(len(lst) / n))
    return [lst[i : i + chunk_size] for i in range(0, len(lst), chunk_size)]


def get_chunk(lst: list, n: int, k: int) -> list:
    """Chunk ``k`` of ``n``; an empty list when there are fewer questions than chunks."""
    if n < 1 or not 0 <= k < n:
        raise InputError(f"--chunk-idx must be in [0, --num-chunks) with --num-chunks >= 1, got chunk {k} of {n}")
    chunks = split_list(lst, n)
    return chunks[k] if k < len(chunks) else []


# ---------------------------------------------------------------------------------------------- flags
def build_parser(description: str) -> argparse.ArgumentParser:
    """The flags every generator shares: model, answers file, generation, batching, pruning. A generator adds
    its question flags (:func:`add_question_args` and its own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-path", default=None, help="checkpoint folder (default: the built-in toy model)")
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--answers-file", required=True, help="answers .jsonl (appended to; existing answers are kept)")
    parser.add_argument("--conv-mode", default="llava_v1")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (what the eval scripts use)")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate() call (left padding)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_image_pixel_args(parser)
    add_pruning_args(parser)
    return parser


def add_image_pixel_args(parser: argparse.ArgumentParser) -> None:
    """Qwen2.5-VL's resolution range (``llava.model.builder.image_pixels_for``)."""
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="Qwen2.5-VL only: smallest image area in pixels (default: the checkpoint's)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="Qwen2.5-VL only: largest image area in pixels (default: the checkpoint's, at most "
                             "1280*28*28 = 1003520, the paper's 1280-token input)")  # fmt: skip


def add_question_args(parser: argparse.ArgumentParser, question_help: str, image_folder: bool = True) -> None:
    """Which questions: ``--question-file``, ``--image-folder`` and upstream's chunking."""
    parser.add_argument("--question-file", required=True, help=question_help)
    if image_folder:
        parser.add_argument("--image-folder", default="", help="folder the question file's image paths are relative to")
    parser.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks ...")
    parser.add_argument("--chunk-idx", type=int, default=0, help="... and answer this one (0-based)")


# ---------------------------------------------------------------------------------------------- items
@dataclass
class Item:
    """One prompt to answer.

    ``question`` is the user turn without ``<image>`` (the image token is placed first, as upstream
    does); ``record`` holds the fields of the answer line that identify it (``question_id``,
    ``prompt``, MMBench's ``round_id``/``options``/``option_char``); ``image`` is a file path, a
    zero-argument callable returning a PIL image, or None for a text-only prompt.
    """

    question: str
    record: dict
    image: str | Callable | None = None
    where: str = ""  # "file:line", for error messages

    @property
    def has_image(self) -> bool:
        return self.image is not None


@dataclass
class Task:
    """What a generator hands to :func:`answer`: its prompts (already chunked), how an answer line is identified
    (upstream's keys: ``question_id``, with ``prompt`` or ``round_id`` where ids repeat) and the prompt flags
    that are part of the run identity (``--single-pred-prompt``, ``--lang``)."""

    items: list[Item]
    answer_key: Callable[[dict], tuple]
    prompt_settings: dict = field(default_factory=dict)
    text_key: str = "text"  # the answer line's field for the generated text (Video-LLaVA's layout: "pred")


def read_jsonl_questions(path: str, required: Iterable[str]) -> list[tuple[int, dict]]:
    """``[(line number, question dict)]``; a malformed line raises :class:`InputError` naming it."""
    if not os.path.isfile(path):
        raise InputError(f"question file not found: {path}")
    required = tuple(required)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: malformed question line ({e.msg}); fix or delete the line") from None
            if not isinstance(q, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object per line, got {type(q).__name__}")
            missing = [k for k in required if k not in q]
            if missing:
                raise InputError(f"{path}:{lineno}: question line lacks key(s) {missing} (needs {list(required)})")
            out.append((lineno, q))
    if not out:
        raise InputError(f"question file {path} has no questions")
    return out


# ---------------------------------------------------------------------------------------------- run identity
def run_identity(pruning: PruningConfig, generation: GenerationSettings, conv_mode: str, model_path: str | None,
                 prompt_settings: dict | None = None) -> dict:  # fmt: skip
    """What must be equal for two runs' answers to share a file: model, method, budget and settings.

    ``settings``: the prompt template, ``asdict(generation)``, the prompt flags and, for a method that prunes,
    ``pruning`` = :func:`pruning_identity` (the hyper-parameters of ``none``, which does nothing, do not matter).
    """
    settings = {"conv_mode": conv_mode, **asdict(generation)}
    if pruning.method != "none":
        settings["pruning"] = pruning_identity(pruning)
    settings.update(prompt_settings or {})
    settings = json.loads(json.dumps(settings))  # as an answer line stores it (tuples -> lists), to compare equal
    model_path = model_path or _default_model_path()
    return {"method": pruning.method, "budget": pruning.budget, "model_id": get_model_name_from_path(model_path),
            "model_fingerprint": _model_fingerprint(model_path), "settings": settings}  # fmt: skip


def pruning_identity(pruning: PruningConfig) -> dict:
    """``dataclasses.asdict(pruning)``, with the LPM folder made absolute and fingerprinted (its weights, not its
    path, define the run) and the method options sorted; ``atp_path`` likewise (with ``atp_fingerprint``) when
    set, and left out when not (earlier answer files, written before the field existed, still resume)."""
    out = asdict(pruning)
    out["options"] = dict(sorted(out["options"].items()))
    out["lpm_path"] = os.path.abspath(pruning.lpm_path) if pruning.lpm_path else None
    out["lpm_fingerprint"] = _module_fingerprint(pruning.lpm_path, (LPM_WEIGHTS, LPM_CONFIG))
    if pruning.atp_path:  # ATP's modules, like the LPM: their weights define the run
        out["atp_path"] = os.path.abspath(pruning.atp_path)
        out["atp_fingerprint"] = _module_fingerprint(pruning.atp_path, (ATP_WEIGHTS, ATP_CONFIG))
    else:  # a field added later is left out at its default, so earlier answer files still resume
        del out["atp_path"]
    return out


def _model_fingerprint(model_path: str) -> str | None:
    return folder_fingerprint(model_path) if os.path.isdir(model_path) else None  # missing: the loader says so


def _module_fingerprint(path: str | None, names: tuple[str, ...]) -> str | None:
    """The trained module's weights and config (not the trainer files beside them in a training output folder)."""
    if not path:
        return None
    folder = os.path.dirname(path) if path.endswith(".safetensors") else path
    return module_fingerprint(folder, names) if os.path.isdir(folder) else None


def _default_model_path() -> str:
    from ..model.builder import DEFAULT_MODEL_PATH

    return str(DEFAULT_MODEL_PATH)


def _describe(identity: dict) -> str:
    return " ".join(f"{k}={identity.get(k)!r}" for k in RUN_KEYS)


def read_existing_answers(path: str, identity: dict, answer_key: Callable[[dict], tuple], text_key: str = "text") -> Counter:
    """Keys of the complete answers in ``path`` (a Counter); drops a truncated last line from the file.

    Refuses (InputError) a file whose answers come from another model / method / budget / settings,
    or that has a corrupt line before the last one.
    """
    done: Counter = Counter()
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    segments = data.split(b"\n")  # the last segment is the text after the final newline (normally empty)
    keep_until, add_newline, offset = len(data), False, 0
    for lineno, raw in enumerate(segments, 1):
        last = lineno == len(segments)
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or text_key not in rec:
                raise ValueError("not an answer record")
            key = answer_key(rec)
        except (ValueError, UnicodeDecodeError, KeyError) as e:
            if last:  # killed mid-write: drop the partial line, its question is answered again
                print(f"warning: {path}:{lineno}: dropping a truncated last line (interrupted run); it is redone",
                      file=sys.stderr)  # fmt: skip
                keep_until = start
                break
            raise InputError(
                f"{path}:{lineno}: corrupt answer line ({e}); delete that line (or the file) and run again"
            ) from None
        _check_identity(path, lineno, rec, identity)
        done[key] += 1
        add_newline = last  # complete record, only its newline is missing
    if keep_until < len(data) or add_newline:
        with open(path, "r+b") as f:
            f.truncate(keep_until)
            if add_newline:
                f.seek(keep_until)
                f.write(b"\n")
    return done


def _check_identity(path: str, lineno: int, rec: dict, identity: dict) -> None:
    theirs = {k: rec.get(k) for k in RUN_KEYS}
    if "method" not in rec or theirs != {k: identity[k] for k in theirs}:
        raise InputError(
            f"{path}:{lineno}: this answers file holds answers of another run "
            f"({_describe(theirs) if 'method' in rec else 'no method recorded'}) but this run is "
            f"{_describe(identity)}; answers of different runs (another method, budget, or model: the fingerprint "
            "covers the weights and config) are never mixed: use another --answers-file "
            "(the eval scripts put method and budget in the path) or delete this one"
        )
    their_settings = (rec.get("metadata") or {}).get("settings")
    if their_settings is not None and their_settings != identity["settings"]:
        theirs, mine = _flat(their_settings), _flat(identity["settings"])
        diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        details = ", ".join(f"{k}: file {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in diff)
        raise InputError(
            f"{path}:{lineno}: this answers file was written with other settings ({details}); answers of "
            "different settings are never mixed: use another --answers-file or delete this one"
        )


def _flat(settings: dict) -> dict:
    """``{"pruning": {"layer": 3}}`` -> ``{"pruning.layer": 3}`` (one level), so a refusal names the exact key."""
    out = {}
    for k, v in settings.items():
        if k == "pruning" and isinstance(v, dict):
            out.update({f"pruning.{name}": value for name, value in v.items()})
        else:
            out[k] = v
    return out


def pending_items(items: list[Item], done: Counter, answer_key: Callable[[dict], tuple], answers_file: str) -> list[Item]:
    """Items without an answer yet; answers that match no item are an error (other questions or chunking)."""
    left = Counter(done)
    pending = []
    for item in items:
        k = answer_key(item.record)
        if left[k] > 0:
            left[k] -= 1
        else:
            pending.append(item)
    extra = +left
    if extra:
        example = next(iter(extra))
        raise InputError(
            f"{answers_file} has {sum(extra.values())} answer(s) for questions that are not in this chunk of the "
            f"question file (e.g. {example!r}); was it written for another --question-file or --num-chunks/"
            "--chunk-idx? Use another --answers-file"
        )
    return pending


MAX_LISTED = 5  # missing files named in an error; the count covers all of them


def check_images(items: list[Item]) -> None:
    missing = [(item.image, item.where) for item in items if isinstance(item.image, str) and not os.path.isfile(item.image)]
    if missing:
        listed = "; ".join(f"{path} ({where})" for path, where in missing[:MAX_LISTED])
        more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise InputError(f"{len(missing)} image file(s) not found: {listed}{more}; check --image-folder")


# ---------------------------------------------------------------------------------------------- generation
def batches(items: list[Item], size: int) -> Iterable[list[Item]]:
    """Batches of ``size`` in question order, image prompts and text-only prompts never mixed."""
    buffers: dict[bool, list[Item]] = {True: [], False: []}
    for item in items:
        buf = buffers[item.has_image]
        buf.append(item)
        if len(buf) == size:
            yield list(buf)
            buf.clear()
    for buf in buffers.values():
        if buf:
            yield buf


@torch.inference_mode()
def generate_text_only(model, tokenizer, questions: list[str], conv_mode: str, settings: GenerationSettings) -> list[str]:
    """Answer prompts without an image: the LLM alone (in-LLM pruning stages see no vision tokens and do nothing)."""
    ids = [
        tokenizer_image_token(build_prompt(q, conv_mode, with_image=False), tokenizer, model.config.image_token_id, expected_images=0)
        for q in questions
    ]
    input_ids, attention_mask = (t.to(model.device) for t in left_padded(ids, tokenizer.pad_token_id))
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings.kwargs(tokenizer, conv_mode))
    new_tokens = output[:, input_ids.shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _open_image(item: Item):
    try:
        image = item.image() if callable(item.image) else item.image
        return image if is_video(image) else load_image(image)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"{item.where}: {err}") from None


def _accounting(model, has_image: bool, batch_size: int) -> list[dict]:
    """Each prompt's own accounting: its image's N_i, that image's plan (R1, R2) and the vision tokens each layer
    saw for it (a batch may mix image sizes: LLaVA-NeXT, Qwen2.5-VL)."""
    if has_image:
        trace = model.last_pruning_trace()
        return [{"r1": plan["r1"], "r2": plan["r2"], "layer": trace.layer, "convention": trace.convention,
                 "image_tokens": n_i, "vision_tokens_per_layer": seen}
                for plan, n_i, seen in zip(trace.image_plans, trace.image_tokens, trace.vision_tokens_per_sample)]  # fmt: skip
    # no image: no vision tokens in any layer; R1/R2 are what an image of the reference N would have got
    plan = model.pruner.plan if model.pruner is not None else None
    n = model.num_vision_tokens
    row = {"r1": plan.r1 if plan else n, "r2": plan.r2 if plan else None, "layer": plan.layer if plan else None,
           "convention": plan.convention if plan else "average", "image_tokens": 0,
           "vision_tokens_per_layer": [0] * model.config.text_config.num_hidden_layers}  # fmt: skip
    return [row] * batch_size


@dataclass
class RunSummary:
    answers_file: str
    total: int  # prompts in this chunk
    already: int  # answered before this run
    generated: int
    identity: dict = field(default_factory=dict)


def resume_state(task: Task, answers_file: str, pruning: PruningConfig, generation: GenerationSettings, *,
                 conv_mode: str, model_path: str | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[dict, str, list[Item]]:  # fmt: skip
    """(run identity, answers path, the items still to answer): where :func:`answer` resumes, read without a
    model (the sweep skips finished jobs with it). Refuses a file of another run, as :func:`answer` does."""
    from ..model.builder import image_pixels_for

    try:
        pixels = image_pixels_for(model_path or _default_model_path(), min_pixels, max_pixels)
    except ValueError as err:
        raise InputError(str(err)) from None
    identity = run_identity(pruning, generation, conv_mode, model_path, {**task.prompt_settings, **(pixels or {})})
    path = os.path.expanduser(answers_file)
    if os.path.isdir(path) or path.endswith(os.sep):
        raise InputError(f"--answers-file {answers_file} is a folder; give a file path, e.g. {os.path.join(path, 'answers.jsonl')}")
    done = read_existing_answers(path, identity, task.answer_key, task.text_key)
    return identity, path, pending_items(task.items, done, task.answer_key, path)


def answer(
    task: Task,
    answers_file: str,
    pruning: PruningConfig,
    generation: GenerationSettings,
    *,
    conv_mode: str,
    model_path: str | None = None,
    model_base: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    loaded: tuple | None = None,
    batch_size: int = 1,
    progress: bool = True,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> RunSummary:
    """Answer ``task`` into ``answers_file`` with ``pruning`` and ``generation``, resuming; see the module docstring.

    The model is loaded from ``model_path`` (``None``: the built-in toy model) with ``pruning`` attached, unless
    ``loaded`` gives an already loaded ``(tokenizer, model, image_processor)`` that carries ``pruning`` already
    (``apply_pruning(model, pruning)``: the sweep attaches each method once and answers every benchmark with it).
    ``model_path`` names the model in the answer lines either way. ``min_pixels``/``max_pixels``: Qwen2.5-VL's
    resolution range (``image_pixels_for``: defaults to the paper's 1280-token input; part of the run identity; a
    ``loaded`` processor must have been loaded with the same range).
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    identity, path, pending = resume_state(task, answers_file, pruning, generation, conv_mode=conv_mode,
                                           model_path=model_path, min_pixels=min_pixels, max_pixels=max_pixels)  # fmt: skip
    check_images(pending)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    open(path, "a").close()  # an empty chunk still leaves its (empty) file for merging
    total = len(task.items)
    summary = RunSummary(path, total, total - len(pending), 0, identity)
    if not pending:
        print(f"{path}: all {total} answers already present", file=sys.stderr)
        return summary

    torch.manual_seed(pruning.seed)  # an untrained LPM / sampling are reproducible
    if loaded is None:
        from ..model.builder import image_pixels_for, load_pretrained_model

        pixels = image_pixels_for(model_path or _default_model_path(), min_pixels, max_pixels)
        tokenizer, model, processor, _ = load_pretrained_model(model_path, model_base, device=device, dtype=dtype,
                                                               pruning=pruning, image_pixels=pixels)  # fmt: skip
    else:
        tokenizer, model, processor = loaded
        _check_attached(model, pruning)
    notice = budget_notice(model.pruner.plan, pruning.budget, pruning.method) if model.pruner is not None else None
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    bar = tqdm(total=total, initial=summary.already, desc=os.path.basename(path), unit="q", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    with open(path, "a", encoding="utf-8") as out:
        for batch in batches(pending, batch_size):
            questions = [item.question for item in batch]
            if batch[0].has_image:
                images = [_open_image(item) for item in batch]
                texts = generate_answers(model, tokenizer, processor, images, questions, conv_mode, generation)
            else:
                texts = generate_text_only(model, tokenizer, questions, conv_mode, generation)
            accounting = _accounting(model, batch[0].has_image, len(batch))
            for item, text, counts in zip(batch, texts, accounting, strict=True):
                line = {
                    **item.record,
                    task.text_key: text,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": identity["model_id"],
                    "model_fingerprint": identity["model_fingerprint"],
                    "metadata": {"settings": identity["settings"], **({} if item.has_image else {"text_only": True})},
                    "method": identity["method"],
                    "budget": identity["budget"],
                    **counts,
                }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            summary.generated += len(batch)
            bar.update(len(batch))
    bar.close()
    return summary


def _check_attached(model, pruning: PruningConfig) -> None:
    """A loaded model must already carry ``pruning`` (the LPM / ATP paths aside: a checkpoint's own fill them in)."""
    attached = model.pruner.config if model.pruner is not None else PruningConfig()
    if attached.method == pruning.method == "none":  # nothing is pruned: its hyper-parameters do not matter
        return
    if replace(attached, lpm_path=None, atp_path=None) != replace(pruning, lpm_path=None, atp_path=None):
        raise ValueError(f"the loaded model carries pruning {attached} but this run asks for {pruning}; "
                         "call learnpruner_ext.apply_pruning(model, config) before answer()")  # fmt: skip


def run(args: argparse.Namespace, task: Task) -> RunSummary:
    """A generator's CLI: the flags of :func:`build_parser` -> :func:`answer`."""
    return answer(
        task, args.answers_file, pruning_config_from_args(args),
        GenerationSettings(args.temperature, args.top_p, args.num_beams, args.max_new_tokens),
        conv_mode=args.conv_mode, model_path=args.model_path, model_base=args.model_base, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, progress=not args.no_progress, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )  # fmt: skip


def cli(main: Callable[[list[str] | None], Any]) -> None:
    """Run a generator's ``main``; input errors end the process with a one-line message (exit code 1)."""
    run_main(main)
