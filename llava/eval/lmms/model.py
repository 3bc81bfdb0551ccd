"""The ``learnpruner_llava`` lmms-eval model: any checkpoint this toolkit loads, with any pruning method.

``--model_args`` takes the model's own options (``pretrained``, ``model_base``, ``conv_mode``, ``dtype``,
``attn_implementation``) and every :class:`~learnpruner_ext.PruningConfig` option under the name of its CLI flag
(``pruning_method``, ``visual_token_budget``, ``pruning_layer``, ``pruning_ratio``, ``diversity_ratio``,
``budget_scope``, ``position_mode``, ``lpm_path``, ``atp_path``, ``pruning_seed``, ``method_option``); the pruning options are
parsed by the same argparse group as the toolkit's CLIs (``learnpruner_ext.cli.add_pruning_args``), so a new field
of ``PruningConfig`` is reachable here with no change. ``method_option=KEY=VALUE`` takes several options joined
by ``;`` (``method_option=important_ratio=0.5;foo=1``), since lmms-eval splits ``--model_args`` on commas.

Loading is the toolkit's ``load_pretrained_model`` and prompts are built by ``llava.inference`` (the conversation
template, ``<image>`` placement and placeholder expansion of the checkpoint's family), so the answers are the
native generators' answers (``llava.eval.model_vqa_loader``) to the same prompts. The default ``conv_mode`` is the
family's own template (``llava.conversation.FAMILY_CONV_MODES``), else ``vicuna_v1`` as the eval scripts use.

Requests: ``generate_until`` in batches of ``--batch_size`` (one image or none per prompt; stop strings of the
task's ``until`` cut the answer); ``loglikelihood`` and multi-round generation are refused. Each answer carries its
pruning accounting (method, budget, R1, R2, layer, the image's N_i, the vision tokens of every layer and their
average, and the rank of the process that answered) in lmms-eval's per-sample logs, under
``token_counts[0]["pruning"]``.

Data parallel like lmms-eval's own models: under ``accelerate launch --num_processes N`` each process loads the
model on its accelerator device and lmms-eval gives it every N-th document (rank and world size come from the
``Accelerator``; lmms-eval 0.7.3 also sets them from ``RANK``/``WORLD_SIZE``); lmms-eval gathers the scores. On CPU:
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m lmms_eval ...`` (gloo); ``--cpu`` alone
starts a single process.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from learnpruner_ext.cli import add_pruning_args, pruning_config_from_args
from learnpruner_ext.config import PruningConfig

from ...conversation import FAMILY_CONV_MODES, check_conv_mode
from ...inference import GenerationSettings, generate_answers
from ...mm_utils import load_image
from ...model.builder import load_pretrained_model
from ..answer_loop import Item, _accounting, batches, generate_text_only

DEFAULT_CONV_MODE = "vicuna_v1"  # what scripts/v1_5/eval uses for LLaVA-1.5 / NeXT checkpoints
METHOD_OPTION_SEPARATOR = ";"  # lmms-eval splits --model_args on ",", so several KEY=VALUE are joined by ";"
# generation_kwargs keys of lmms-eval tasks that GenerationSettings covers or that need no action here
HANDLED_GEN_KWARGS = {"max_new_tokens", "temperature", "top_p", "num_beams", "do_sample", "until"}


def _pruning_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="--model_args", add_help=False, exit_on_error=False)
    add_pruning_args(parser)
    return parser


def pruning_option_names() -> list[str]:
    """The ``--model_args`` names of the pruning options: the argparse names of the toolkit's pruning flags."""
    return sorted(vars(_pruning_parser().parse_args([])))


def pruning_config_from_model_args(options: dict[str, Any]) -> PruningConfig:
    """``{"pruning_method": "learnpruner", "visual_token_budget": 64}`` -> ``PruningConfig``, through the CLIs' parser.

    Values arrive as lmms-eval parsed them (``"64"`` -> 64); each becomes ``--flag value`` again, so types, choices
    and the method-name check are the CLIs'. An unknown name raises ``ValueError`` listing the valid ones.
    """
    valid = pruning_option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown --model_args option(s) {unknown} for {__package__}: the model options are "
                         f"{sorted(MODEL_OPTIONS)} and the pruning options {valid}")  # fmt: skip
    argv = []
    for name, value in options.items():
        items = str(value).split(METHOD_OPTION_SEPARATOR) if name == "method_option" else [value]
        for item in items:
            argv += ["--" + name.replace("_", "-"), str(item)]
    try:
        args = _pruning_parser().parse_args(argv)
    except argparse.ArgumentError as err:
        raise ValueError(f"bad --model_args value: {err}") from None
    return pruning_config_from_args(args)


@dataclass
class PruningTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus this prompt's pruning accounting (``to_dict`` is what it logs)."""

    pruning: dict | None = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "pruning": self.pruning}


def prompt_accounting(model, has_image: bool, batch_size: int, method: str, budget: int | None) -> list[dict]:
    """Each prompt's accounting, as the native answer lines record it (``answer_loop``), plus the average vision
    tokens per LLM layer that the budget ``T`` refers to (LearnPruner's convention, ``learnpruner_ext.config``)."""
    rows = _accounting(model, has_image, batch_size)
    return [{"method": method, "budget": budget, **row,
             "average_vision_tokens": sum(row["vision_tokens_per_layer"]) / len(row["vision_tokens_per_layer"])}
            for row in rows]  # fmt: skip


def generation_settings(gen_kwargs: dict) -> tuple[GenerationSettings, list[str]]:
    """A task's ``generation_kwargs`` -> (settings, stop strings). ``do_sample: false`` means greedy."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    defaults = GenerationSettings()
    temperature = float(kwargs.get("temperature", defaults.temperature) or 0.0)
    if kwargs.get("do_sample") is False:
        temperature = 0.0
    settings = GenerationSettings(
        temperature=temperature,
        top_p=kwargs.get("top_p", defaults.top_p) if temperature > 0 else None,
        num_beams=int(kwargs.get("num_beams", defaults.num_beams)),
        max_new_tokens=int(kwargs.get("max_new_tokens", defaults.max_new_tokens)),
    )
    return settings, [s for s in until if s]


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first stop string (lmms-eval's ``until``)."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


MODEL_OPTIONS = {"pretrained", "model_base", "conv_mode", "device", "dtype", "attn_implementation", "batch_size",
                 "max_batch_size"}  # fmt: skip


class LearnPrunerLlava(lmms):
    """lmms-eval model over the toolkit's loader and generators (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        model_base: str | None = None,
        conv_mode: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **pruning_options: Any,
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"--batch_size must be a positive integer for {__package__}, got {batch_size!r}")
        self.pruning = pruning_config_from_model_args(pruning_options)
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # data parallel: every process on its own device
            device = str(self.accelerator.device)
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.tokenizer, self.model, self.image_processor, _ = load_pretrained_model(
            pretrained, model_base, device=device or "auto", dtype=dtype, attn_implementation=attn_implementation,
            pruning=self.pruning,
        )  # fmt: skip
        self.conv_mode = conv_mode or FAMILY_CONV_MODES.get(self.model.family, (DEFAULT_CONV_MODE,))[0]
        check_conv_mode(self.model.family, self.conv_mode)
        self.batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _visuals(self, request: Instance) -> list:
        """The request's visuals (at most one image); several images or a video are refused."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1 or (visuals and isinstance(visuals[0], str)):
            raise ValueError(f"task {task!r} doc {doc_id} gives {len(visuals)} visual(s) ({type(visuals[0]).__name__}); "
                             f"{__package__} answers one image per prompt (or none): choose an image task")  # fmt: skip
        return visuals

    def _item(self, index: int, request: Instance) -> Item:
        """The request as the native generators' Item; its image is decoded when its batch runs."""
        has_image = bool(self._visuals(request))
        image = (lambda: load_image(self._visuals(request)[0])) if has_image else None
        return Item(request.args[0], {"index": index}, image, f"{request.task_name} doc {request.doc_id}")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer every request; batches hold requests with equal ``generation_kwargs``, images and text-only apart."""
        torch.manual_seed(self.pruning.seed)  # as the native generators: a stochastic method is reproducible
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="learnpruner_llava")
        for indices in groups.values():
            settings, until = generation_settings(requests[indices[0]].args[1])
            items = [self._item(i, requests[i]) for i in indices]
            for batch in batches(items, self.batch_size):
                questions = [item.question for item in batch]
                if batch[0].has_image:
                    images = [item.image() for item in batch]
                    texts = generate_answers(self.model, self.tokenizer, self.image_processor, images, questions,
                                             self.conv_mode, settings)  # fmt: skip
                else:
                    texts = generate_text_only(self.model, self.tokenizer, questions, self.conv_mode, settings)
                accounting = prompt_accounting(self.model, batch[0].has_image, len(batch), self.pruning.method,
                                               self.pruning.budget)  # fmt: skip
                for item, text, counts in zip(batch, texts, accounting, strict=True):
                    counts = {**counts, "rank": self.rank, "world_size": self.world_size}  # which process answered
                    results[item.record["index"]] = GenerationResult(cut_at_stop(text, until), PruningTokenCounts(pruning=counts))
                bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            f"{__package__} does not score loglikelihood requests (multiple-choice tasks with output_type "
            "loglikelihood); use a generate_until task (e.g. pope, gqa, mme, textvqa) or a model that scores choices"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{__package__} answers single-turn generate_until requests only")
