"""Single-process Gradio demo: ask a question about an image and see which patches a pruning method keeps.

    python -m llava.serve.gradio_web_server [--model-path P] [--lpm-path L] [--atp-path A] [--host 127.0.0.1] [--port 7860]

Unlike upstream LLaVA's controller/worker/web-server trio, the model lives in this process. Requests go
through Gradio's queue (several users at once); model calls are serialised by a lock because the model
keeps per-call trace state (``model.last_pruning_trace()``). See docs/demo.md.

LLaVA-1.5 and LLaVA-NeXT (anyres) checkpoints both work. On NeXT each image has its own N_i vision tokens
(``model.image_token_counts``), its own plan (``trace.image_plans``) and a budget mapped by the budget scope;
the stats, chart and details report that image, and the overlay draws the kept patches of its base crop only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import gradio as gr
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from learnpruner_ext import BudgetError, PruningConfig, apply_pruning, available_methods  # noqa: E402
from learnpruner_ext.adapters import patch_grid_tokens  # noqa: E402
from learnpruner_ext.config import BUDGET_SCOPES, budget_notice, check_budget, image_budget  # noqa: E402
from learnpruner_ext.flops import count_flops  # noqa: E402
from learnpruner_ext.atp import shipped_atp_path  # noqa: E402
from learnpruner_ext.lpm import shipped_lpm_path  # noqa: E402
from learnpruner_ext.methods import get_method_class, plan_method  # noqa: E402
from learnpruner_ext.visualize import PatchMarks, base_crop_patches, draw_overlay, model_grid  # noqa: E402
from learnpruner_ext.visualize import processor_background  # noqa: E402

from ..inference import GenerationSettings, build_prompt, generate_answers  # noqa: E402
from ..mm_utils import MAX_IMAGE_PIXELS, image_inputs, load_image, tokenizer_image_token  # noqa: E402
from ..model.builder import load_pretrained_model  # noqa: E402
from .examples import make_examples  # noqa: E402

MAX_SIDE = 4096  # longer images are downscaled (with a notice) before processing


class InputProblem(Exception):
    """A bad request: shown to the user, the server keeps serving."""


class _BadUpload:
    """What the image input passes on when Gradio itself could not open the upload."""

    def __init__(self, message: str):
        self.message = message


def _safe_image_preprocess(component: gr.Image):
    """Make the image input hand a clear message to the handler instead of failing inside Gradio."""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            return _BadUpload(f"{name} is not a readable image ({type(err).__name__}); upload a PNG or JPEG file")

    component.preprocess = preprocess


def open_request_image(path) -> tuple[Image.Image, str | None]:
    """Open an uploaded image with the limits of ``load_image``; returns (RGB image, notice or None)."""
    if path is None:
        raise InputProblem("No image: upload an image (PNG or JPEG) first.")
    if isinstance(path, _BadUpload):
        raise InputProblem(path.message)
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        raise InputProblem(f"{Path(str(path)).name} is not a readable image ({err}); upload a PNG or JPEG file") from err
    if width * height > MAX_IMAGE_PIXELS:
        raise InputProblem(
            f"Image of {width}x{height} pixels is too large (limit {MAX_IMAGE_PIXELS:,} pixels); downscale it first."
        )
    try:
        image = load_image(path)
    except ValueError as err:
        raise InputProblem(str(err)) from err
    notice = None
    if max(width, height) > MAX_SIDE:
        scale = MAX_SIDE / max(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
        notice = f"Image of {width}x{height} was downscaled to {image.width}x{image.height} (longest side > {MAX_SIDE})."
    return image, notice


def method_default_layer(name: str, num_vision_tokens: int, num_layers: int) -> int | None:
    """The stage-2 / in-LLM layer a method uses when none is given (None: it does not prune in the LLM).

    The layer depends on L only, so the model's reference N gives every image's (LLaVA-NeXT's N_i included)."""
    if "decoder" not in get_method_class(name).acts_at:
        return None
    config = PruningConfig(method=name, budget=num_vision_tokens)  # the plan's layer does not depend on the budget
    return plan_method(config, num_vision_tokens=num_vision_tokens, num_layers=num_layers).plan.layer


def tokens_chart(tokens: list[int], unpruned: list[int], method: str) -> Figure:
    """Bars of the vision tokens each LLM layer saw (the trace) against the unpruned count of the image."""
    fig = Figure(figsize=(5, 2.6), dpi=100)
    ax = fig.add_subplot(111)
    layers = np.arange(len(tokens))
    ax.bar(layers, unpruned, color="#d0d0d0", label="unpruned")
    ax.bar(layers, tokens, color="#e8590c", label=method)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("vision tokens")
    ax.set_title(f"avg {np.mean(tokens):.1f} vs {np.mean(unpruned):.0f} vision tokens / layer", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


class DemoBackend:
    """The model and everything one request needs; ``answer`` is thread-safe (a lock around the model)."""

    def __init__(self, model_path=None, lpm_path=None, device="auto", max_new_tokens=64, atp_path=None):
        self.tokenizer, self.model, self.processor, _ = load_pretrained_model(model_path, device=device)
        self.model_path = model_path
        # apply_pruning falls back to the checkpoint's own lpm/ folder; say which LPM really runs
        self.lpm_path = lpm_path or shipped_lpm_path(getattr(self.model.config, "_name_or_path", None))
        self.atp_path = atp_path or shipped_atp_path(getattr(self.model.config, "_name_or_path", None))  # likewise
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.num_vision_tokens = self.model.num_vision_tokens  # N: the reference count budgets refer to
        self.num_layers = self.model.config.text_config.num_hidden_layers
        self.family = self.model.family
        self.anyres = self.family == "llava_next"
        self.patches_per_crop = patch_grid_tokens(self.model.config)
        # the overlay's grid: the image's (LLaVA-1.5), or one tower input's, i.e. the base crop's (LLaVA-NeXT)
        self.grid = model_grid(self.model) if not self.anyres else int(round(self.patches_per_crop**0.5))
        self.background = processor_background(self.processor)
        self.methods = available_methods()
        self._methods_cache: dict = {}
        self.default_layers = {m: method_default_layer(m, self.num_vision_tokens, self.num_layers) for m in self.methods}

    def _method(self, config: PruningConfig):
        """Attach the method for ``config``; instances are cached so a (randomly initialised) LPM and any
        seeded state are the same for every request with the same settings."""
        key = json.dumps(asdict(config), sort_keys=True, default=str)  # every field: options, seed, ratio, ...
        if key not in self._methods_cache:
            torch.manual_seed(config.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # what the user must know comes back as method.notices
                self._methods_cache[key] = apply_pruning(self.model, config)
        method = self._methods_cache[key]
        self.model.model.set_pruner(method)
        return method, list(method.notices)

    def text_tokens(self, question: str) -> int:
        return len(tokenizer_image_token(build_prompt(question), self.tokenizer, self.model.config.image_token_id, num_image_tokens=0))

    def _generate(self, image, question):
        start = time.perf_counter()
        answer = generate_answers(self.model, self.tokenizer, self.processor, [image], [question],
                                  settings=GenerationSettings(max_new_tokens=self.max_new_tokens))[0]  # fmt: skip
        return answer, time.perf_counter() - start, self.model.last_pruning_trace()

    def image_layout(self, image: Image.Image) -> tuple[int, int, dict[int, int] | None]:
        """(N_i vision tokens, vision-tower crops, base-crop ``{slot: patch}`` map or None) of one image, as
        ``llava.inference.prepare_batch`` tokenises it (LLaVA-1.5: (N, 1, None))."""
        if not self.anyres:
            return self.num_vision_tokens, 1, None
        inner = self.model.model
        sizes = image_inputs([image], self.processor, self.model.config)["image_sizes"]
        packing = inner.adapter.packing_maps(inner, sizes)[0]
        crops = inner.adapter.crops_per_image(self.model.config, sizes)[0]
        return len(packing), crops, base_crop_patches(packing, self.patches_per_crop)

    def _check_image_plan(self, config: PruningConfig, num_tokens: int) -> None:
        """The image's own plan (its N_i, the budget scope) must be feasible: one clear InputProblem naming N_i."""
        if config.budget is None or num_tokens == self.num_vision_tokens:
            return  # LLaVA-1.5 (N_i = N): apply_pruning checks the plan
        cls = get_method_class(config.method)
        try:
            cls.image_plan(cls.resolve(config), num_tokens, self.num_vision_tokens, self.num_layers)
        except BudgetError as err:
            raise InputProblem(
                f"Infeasible budget for {config.method} on this image (N_i = {num_tokens} vision tokens; budgets refer "
                f"to N = {self.num_vision_tokens}, budget scope {config.budget_scope!r}): {err}"
            ) from err
        except ValueError as err:
            raise InputProblem(f"Invalid settings for {config.method}: {err}") from err

    def answer(self, image_path, question, method, budget, layer, also_unpruned, budget_scope="absolute"):
        """-> (answer, unpruned answer, overlay, chart, stats text, status, info dict); raises InputProblem.

        ``budget_scope`` (LLaVA-NeXT; :class:`PruningConfig`): how T becomes this image's budget."""
        notices = []
        image, notice = open_request_image(image_path)
        if notice:
            notices.append(notice)
        question = (question or "").strip()
        if not question:
            raise InputProblem("Empty question: type a question about the image.")
        try:
            build_prompt(question)
        except ValueError as err:  # e.g. "<image><image>": one image per question
            raise InputProblem(f"Invalid question: {err}") from err
        if method not in self.methods:
            raise InputProblem(f"Unknown pruning method {method!r}; available: {', '.join(self.methods)}")
        try:
            budget = int(budget)
        except (TypeError, ValueError) as err:
            raise InputProblem(f"Budget must be a whole number of vision tokens, got {budget!r}") from err
        if budget_scope not in BUDGET_SCOPES:
            raise InputProblem(f"Unknown budget scope {budget_scope!r}; choose one of {', '.join(BUDGET_SCOPES)}")
        uses_layer = "decoder" in get_method_class(method).acts_at
        k = None
        if uses_layer and layer not in (None, ""):
            k = int(layer)
        try:
            config = PruningConfig(method=method, budget=None if method == "none" else budget, layer=k,
                                   lpm_path=self.lpm_path if get_method_class(method).uses_lpm else None,
                                   atp_path=self.atp_path if get_method_class(method).uses_atp else None,
                                   budget_scope=budget_scope)  # fmt: skip
            check_budget(config.budget, self.num_vision_tokens)  # T refers to the model's N (LLaVA-NeXT: not N_i)
        except BudgetError as err:
            raise InputProblem(f"Bad budget for {method}: {err}") from err
        num_tokens, crops, patch_of_slot = self.image_layout(image)
        self._check_image_plan(config, num_tokens)
        with self.lock:
            try:
                _, notes = self._method(config)
            except BudgetError as err:
                where = f" (at the reference N = {self.num_vision_tokens}; image N_i = {num_tokens})" if self.anyres else ""
                raise InputProblem(f"Infeasible budget for {method}{where}: {err}") from err
            except ValueError as err:
                raise InputProblem(f"Invalid settings for {method}: {err}") from err
            notices.extend(notes)
            pruner = self.model.pruner  # before the unpruned run detaches it
            answer, latency, trace = self._generate(image, question)
            unpruned_answer, unpruned_latency = "", None
            if also_unpruned:
                self.model.model.set_pruner(None)
                unpruned_answer, unpruned_latency, _ = self._generate(image, question)

        n_i, image_plan = trace.image_tokens[0], trace.image_plans[0]  # this image's N_i and plan
        if pruner is not None:  # the plan the image really got (its N_i, the budget scope, at most its candidates)
            plan = replace(pruner.plan_for(n_i), r1=image_plan["r1"], r2=image_plan["r2"])  # stages kept
            notice = budget_notice(plan, plan_budget(config, n_i, self.num_vision_tokens), method)
            notices.extend([notice] if notice else [])
        marks = PatchMarks.from_trace(trace, self.grid, patch_of_slot=patch_of_slot)
        note = None
        if self.anyres:
            note = f"base crop only: {len(marks.stage1)} of the {image_plan['r1']} kept tokens drawn"
        overlay = draw_overlay(image, marks, self.background, fit="squash" if self.anyres else "pad", note=note)
        tokens = list(trace.vision_tokens_per_layer)
        full = [n_i] * self.num_layers
        text_tokens = self.text_tokens(question)
        tflops = count_flops(self.model.config, tokens, text_tokens, vision_crops=crops).tflops
        tflops_full = count_flops(self.model.config, full, text_tokens, vision_crops=crops).tflops
        counts = marks.counts()
        info = {
            "method": method, "budget": config.budget, "r1": image_plan["r1"], "r2": image_plan["r2"],
            "layer": trace.layer, "family": self.family, "num_vision_tokens": self.num_vision_tokens,
            "image_tokens": n_i, "budget_scope": trace.budget_scope,
            "image_budget": plan_budget(config, n_i, self.num_vision_tokens), "grid": self.grid,
            "marked": counts, "vision_tokens_per_layer": tokens,
            "average_vision_tokens": trace.average_vision_tokens,
            "latency_s": latency, "unpruned_latency_s": unpruned_latency,
            "est_tflops": tflops, "est_tflops_unpruned": tflops_full,
            "image_size": list(image.size), "notices": notices,
        }  # fmt: skip
        image_line = ""
        if self.anyres:
            image_line = (f"this image: N_i = {n_i} vision tokens ({crops} crops; budgets refer to N = "
                          f"{self.num_vision_tokens}), budget scope {trace.budget_scope}: "
                          f"T_i = {info['image_budget'] if config.budget is not None else '-'}\n")  # fmt: skip
        r2 = image_plan["r2"]
        stats = (
            image_line + f"R1 = {image_plan['r1']}, R2 = {r2 if r2 is not None else '-'}"
            f"{f' (from layer {trace.layer})' if trace.layer is not None else ''}; "
            f"avg {trace.average_vision_tokens:.1f} of {n_i} vision tokens per layer\n"
            f"latency {latency * 1000:.0f} ms"
            + (f" vs {unpruned_latency * 1000:.0f} ms unpruned" if unpruned_latency is not None else "")
            + f"\nest. prefill {tflops:.4g} TFLOPs vs {tflops_full:.4g} unpruned ({tflops / tflops_full:.0%}; analytic estimate)"
        )
        status = "OK" + ("" if not notices else " - " + " ".join(notices))
        chart = tokens_chart(tokens, full, method)
        return answer, unpruned_answer, overlay, chart, stats, status, info


def plan_budget(config: PruningConfig, num_tokens: int, reference_tokens: int) -> int | None:
    """The budget T_i an image of ``num_tokens`` gets under ``config.budget_scope`` (T itself when N_i = N)."""
    return image_budget(config.budget, num_tokens, reference_tokens, config.budget_scope)


def build_demo(model_path=None, lpm_path=None, device="auto", max_new_tokens=64, concurrency_limit=4,
               backend: DemoBackend | None = None, atp_path=None) -> gr.Blocks:  # fmt: skip
    """The Gradio app (queue configured); call ``.launch()`` on it."""
    backend = backend or DemoBackend(model_path, lpm_path, device=device, max_new_tokens=max_new_tokens,
                                     atp_path=atp_path)  # fmt: skip
    n = backend.num_vision_tokens
    default_method = "learnpruner" if "learnpruner" in backend.methods else backend.methods[0]
    default_budget = max(1, round(n * 64 / 576))
    example_dir = Path(tempfile.mkdtemp(prefix="llava_demo_examples_"))
    examples = make_examples(example_dir)

    def run(image_path, question, method, budget, layer, also_unpruned, budget_scope="absolute"):
        try:
            return backend.answer(image_path, question, method, budget, layer, also_unpruned, budget_scope)
        except InputProblem as err:
            gr.Warning(str(err))
            return "", "", None, None, "", f"Error: {err}", {"error": str(err)}

    def on_method(method):
        k = backend.default_layers.get(method)
        return gr.update(value=k, interactive=k is not None)

    title = "LearnPruner for LLaVA: visual-token pruning demo"
    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"## {title}\nModel: `{model_path or 'built-in default'}` - "
            + (f"{n} vision tokens ({backend.grid}x{backend.grid} patches)" if not backend.anyres else
               f"LLaVA-NeXT (anyres): budgets refer to N = {n} vision tokens, each image has its own N_i "
               f"(base crop {backend.grid}x{backend.grid} patches + hi-res crops)")
            + f", {backend.num_layers} LLM layers."
            + ("" if backend.lpm_path or "learnpruner" not in backend.methods else
               "  \n*No `--lpm-path`: LearnPruner's stage 1 uses an untrained (random) LPM.*")  # fmt: skip
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", elem_id="image_input")
                _safe_image_preprocess(image)
                question = gr.Textbox(label="Question", placeholder="Ask about the image", elem_id="question")
                method = gr.Dropdown(backend.methods, value=default_method, label="Pruning method", elem_id="method")
                budget = gr.Slider(1, n, value=default_budget, step=1, label="Budget (avg vision tokens per LLM layer)",
                                   elem_id="budget")  # fmt: skip
                layer = gr.Number(value=backend.default_layers.get(default_method), precision=0,
                                  label=f"Stage-2 layer k (in-LLM methods: {', '.join(m for m, k in backend.default_layers.items() if k is not None)})",
                                  elem_id="layer")  # fmt: skip
                unpruned = gr.Checkbox(value=False, label="Also run unpruned", elem_id="also_unpruned")
                scope = None
                if backend.anyres:  # how T becomes the image's budget: min(T, N_i) or round(T * N_i / N)
                    scope = gr.Radio(list(BUDGET_SCOPES), value="absolute", label="Budget scope (per image)",
                                     elem_id="budget_scope")  # fmt: skip
                submit = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column(scale=1):
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                answer = gr.Textbox(label="Answer (pruned)", interactive=False, elem_id="answer")
                unpruned_answer = gr.Textbox(label="Answer (unpruned)", interactive=False, elem_id="unpruned_answer")
                overlay_label = ("Kept patches (on the padded square image)" if not backend.anyres else
                                 "Kept base-crop patches (the image resized to one crop; hi-res crops not drawn)")
                overlay = gr.Image(type="pil", label=overlay_label, format="png", elem_id="overlay")
                stats = gr.Textbox(label="Tokens, latency, estimated TFLOPs", lines=3, interactive=False, elem_id="stats")
                chart = gr.Plot(label="Vision tokens per LLM layer", elem_id="chart")
                info = gr.JSON(label="Details", elem_id="info")
        gr.Examples([list(e) for e in examples], inputs=[image, question])
        method.change(on_method, inputs=method, outputs=layer)
        inputs = [image, question, method, budget, layer, unpruned] + ([scope] if scope is not None else [])
        outputs = [answer, unpruned_answer, overlay, chart, stats, status, info]
        submit.click(run, inputs=inputs, outputs=outputs, api_name="ask")
        question.submit(run, inputs=inputs, outputs=outputs)
    demo.queue(default_concurrency_limit=concurrency_limit)
    demo.backend = backend
    demo.examples = examples  # [(image path, question)], e.g. for scripts/demo_screenshot.py
    return demo


def main(argv=None):
    parser = argparse.ArgumentParser(description="LearnPruner LLaVA demo (single process)")
    parser.add_argument("--model-path", default=None, help="checkpoint (default: the built-in toy checkpoint)")
    parser.add_argument("--lpm-path", default=None, help="trained LPM for learnpruner")
    parser.add_argument("--atp-path", default=None, help="trained ATP modules for atp (default: the checkpoint's atp/)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency-limit", type=int, default=4)
    parser.add_argument("--share", action="store_true")
    args = parser.parse_args(argv)
    demo = build_demo(args.model_path, args.lpm_path, device=args.device, max_new_tokens=args.max_new_tokens,
                      concurrency_limit=args.concurrency_limit, atp_path=args.atp_path)  # fmt: skip
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
