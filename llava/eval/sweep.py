"""Sweep methods x budgets x benchmarks and build the paper's Table 1 (plus an accuracy-vs-budget plot).

    python -m llava.eval.sweep --model-path checkpoints/llava-v1.5-7b --methods none,learnpruner \
        --budgets 128,64,32 --benchmarks gqa,sqa,textvqa,pope,mme,vqav2,mmbench,mmbench_cn \
        --lpm-path checkpoints/lpm [--eval-root playground/data/eval] --out outputs/sweep [--batch-size 8] \
        [--num-chunks 8 --ray auto]

The sweep is a list of :class:`Job` s, one per (method, budget, benchmark, chunk). A :class:`SweepWorker` loads
the model once; for every (method, budget) it attaches the method with ``apply_pruning`` and answers each
benchmark through the generators' Python API (``llava.eval.answer_loop.answer`` with the generator's ``task``:
the same code and answer lines as ``scripts/v1_5/eval/*.sh`` running ``llava.eval.model_vqa_*``); the
answers are then scored by the same scorer (``llava.eval.eval_*``). Without ``--ray`` one local worker runs
the jobs in order; with ``--ray`` (``llava.eval.sweep_ray``) model-holding workers on a cluster share them.
The pruning flags are ``learnpruner_ext.cli``'s generated group, less ``--pruning-method``/
``--visual-token-budget``. ``none`` is the unpruned reference and runs once (no budget). A (method, budget) the
method cannot meet (``BudgetError``), or a method with no meaning on the family (``UnsupportedMethodError``,
e.g. a fixed-grid method on Qwen2.5-VL), is recorded as infeasible with its reason, not a crash.

Resume is per job: re-running the same command skips the jobs whose answers are complete (read without the
model) and resumes the others from the answers they wrote. A worker keeps the vision tower's output for the
images it has seen (``--vision-cache-gb``, :mod:`learnpruner_ext.vision_cache`): the next method on the same
batch reuses it, with identical answers.

Trained modules per budget: ``{budget}`` in ``--atp-path`` or ``--lpm-path`` is replaced by each job's budget
(``--methods atp --budgets 96,72,48 --atp-path 'outputs/atp/t{budget}'`` runs each budget with the modules trained
for that target); a substituted path that does not exist is an error before the model loads. The resolved path is
part of each job's run identity (answers files, resume) and is recorded in jobs.json and results.csv.

Writes to ``--out``:
  answers/<bench>/<model>-<method>-<budget>/{answers.jsonl, metrics.json, scorer side files}
      (with --num-chunks N: chunks/N_<k>.jsonl there, merged into answers.jsonl)
  results.csv, results.json   one row per (method, budget, benchmark): status, headline metric, tokens (the achieved
                              average and, per instance, its percentiles and std), the trained modules used
  table.md                    rows = methods grouped by budget, columns = benchmarks + RelAcc; a section with the
                              per-instance token percentiles of the runs whose counts vary (adaptive methods)
  accuracy_vs_budget.png      headline metric per benchmark and RelAcc against the budget
  tokens_histogram.png        per benchmark, the per-instance token counts of the runs whose counts vary (only then)
  jobs.json                   what this invocation ran: one record per job (worker, seconds, answers resumed and
                              generated, vision-cache hits; with --profile the seconds per pruning section)

RelAcc = mean over the benchmarks of (method's headline / vanilla's headline), in % (needs ``none``).
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import asdict, dataclass, replace
import io
import json
import math
import os
import socket
import sys
import time

from learnpruner_ext import BudgetError, PruningConfig, UnsupportedMethodError, apply_pruning, available_methods
from learnpruner_ext.cli import add_pruning_args, pruning_config_from_args
from learnpruner_ext.methods.base import get_method_class
from learnpruner_ext.modeling import with_shipped_lpm

from . import answer_loop, merge_answers
from . import benchmarks as B
from ._io import clean, write_atomic, write_json
from ..inference import GenerationSettings
from ..mm_utils import get_model_name_from_path

# per-instance vision tokens (each image prompt's mean over the LLM layers of its measured count): these percentiles
# (linear interpolation between the sorted values, numpy's default) and the population std (ddof 0)
TOKEN_PERCENTILES = (5, 25, 50, 75, 95)
TOKEN_FIELDS = tuple(f"tokens_p{q}" for q in TOKEN_PERCENTILES) + ("tokens_std",)
# trained-module folders: (PruningConfig field, flag, the method class attribute saying the method loads one)
MODULE_PATHS = (("atp_path", "--atp-path", "uses_atp"), ("lpm_path", "--lpm-path", "uses_lpm"))
BUDGET_PLACEHOLDER = "{budget}"  # in --atp-path / --lpm-path: replaced by each job's budget
# columns appended after answers_file (older readers index the first ones by name or position)
CSV_FIELDS = ("method", "budget", "benchmark", "status", "metric", "value", "n", "missing", "r1", "r2", "layer",
              "avg_vision_tokens", "extra", "note", "answers_file", *TOKEN_FIELDS, "atp_path", "lpm_path")  # fmt: skip
EXTRA_METRICS = {"mme": ("perception", "cognition", "other"), "pope": ("accuracy_mean",), "sqa": ("accuracy", "failed"),
                 "toy": ("by_type",), "mmbench": ("accuracy_single", "no_match"),
                 "mmbench_cn": ("accuracy_single", "no_match")}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None)
    p.add_argument("--methods", default="none,learnpruner", help=f"comma list of: {', '.join(available_methods())}")
    p.add_argument("--budgets", default=None, help="comma list of average vision tokens per LLM layer (default: the "
                   "paper's for the checkpoint's family, FAMILY_TABLES)")  # fmt: skip
    p.add_argument("--benchmarks", default=None, help=f"comma list of: {', '.join(B.ORDER)} (default: the family's "
                   "paper table)")  # fmt: skip
    p.add_argument("--eval-root", default="./playground/data/eval", help="upstream LLaVA's playground/data/eval layout")
    p.add_argument("--out", required=True, help="output folder (answers, metrics, results, table, plot)")
    p.add_argument("--conv-mode", default=None, help="prompt template (default: the family's, e.g. vicuna_v1, qwen2_5_vl)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--vqav2-annotation", default=None, help="VQA annotation json to score VQAv2 locally (else EvalAI)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--num-chunks", type=int, default=1, help="split every benchmark into this many jobs (upstream's "
                   "chunks, merged into one answers file); with --ray they run in parallel")  # fmt: skip
    p.add_argument("--vision-cache-gb", type=float, default=2.0, help="reuse the vision tower's output for the same "
                   "images across methods and budgets, up to this many GiB per worker (exact; 0: off)")  # fmt: skip
    p.add_argument("--profile", action="store_true", help="time the pruning machinery's sections per job "
                   "(vision_tower, stage1_select, ...) into jobs.json")  # fmt: skip
    ray = p.add_argument_group("cluster (llava.eval.sweep_ray; needs the ray extra)")
    ray.add_argument("--ray", default=None, metavar="ADDRESS", help="run the jobs on a Ray cluster: auto (the running "
                     "cluster, `ray start --head`), local (start one on this machine) or host:port / ray://host:10001")
    ray.add_argument("--ray-workers", type=int, default=None, help="model-holding workers (default: as many as the "
                     "cluster's GPUs, or CPUs, allow)")  # fmt: skip
    ray.add_argument("--ray-gpus-per-worker", type=float, default=None, help="GPUs each worker holds (default: 1 if "
                     "the cluster has GPUs, else 0)")  # fmt: skip
    ray.add_argument("--ray-cpus-per-worker", type=int, default=1, help="CPUs (torch threads) each worker holds")
    ray.add_argument("--ray-max-retries", type=int, default=3, help="restarts of a killed worker; its job resumes "
                     "from the answers it wrote")  # fmt: skip
    answer_loop.add_image_pixel_args(p)
    note = f"{BUDGET_PLACEHOLDER} in the path is replaced by each job's budget"
    add_pruning_args(p, exclude=("method", "budget"), help_notes={name: note for name, _, _ in MODULE_PATHS})
    p.set_defaults(position_mode=None)  # the family's (apply_family_defaults)
    return p


@dataclass(frozen=True)
class FamilyTable:
    """The LearnPruner paper's table for a model family: its budgets, benchmark columns and prompt template."""

    table: str
    budgets: str
    benchmarks: tuple[str, ...]
    conv_mode: str
    position_mode: str = "contiguous"  # --position-mode (Qwen2.5-VL's M-RoPE has only "original")


_SIX = ("gqa", "sqa", "textvqa", "mme", "vqav2", "mmbench")  # the columns of Tables 2 and 4
FAMILY_TABLES = {  # checkpoint model_type -> its table (sweep defaults; explicit flags win)
    "llava": FamilyTable("Table 1", "128,64,32", B.ORDER, "vicuna_v1"),
    "llava_next": FamilyTable("Table 2", "640,320,160", _SIX, "vicuna_v1"),
    "qwen2_5_vl": FamilyTable("Table 4", "426,284,142", _SIX, "qwen2_5_vl", "original"),
}


def family_table(model_path: str) -> FamilyTable:
    """The checkpoint's :class:`FamilyTable` (LLaVA-1.5's Table 1 for a family without an image table here)."""
    from ..model.builder import checkpoint_model_type

    return FAMILY_TABLES.get(checkpoint_model_type(model_path), FAMILY_TABLES["llava"])


def apply_family_defaults(args: argparse.Namespace) -> FamilyTable:
    """Fill ``--budgets``, ``--benchmarks``, ``--conv-mode`` and ``--position-mode`` left unset from the
    checkpoint's family table."""
    table = family_table(args.model_path)
    if args.budgets is None:
        args.budgets = table.budgets
    if args.benchmarks is None:
        args.benchmarks = ",".join(table.benchmarks)
    if args.conv_mode is None:
        args.conv_mode = table.conv_mode
    if args.position_mode is None:
        args.position_mode = table.position_mode
    return table


def parse_budgets(spec: str) -> list[int]:
    out = []
    for s in (x.strip() for x in spec.split(",")):
        if not s:
            continue
        try:
            value = int(s)
        except ValueError:
            raise ValueError(f"--budgets: {s!r} is not an integer (e.g. --budgets 128,64,32)") from None
        if value <= 0:
            raise ValueError(f"--budgets: a budget must be a positive integer, got {value}")
        out.append(value)
    return list(dict.fromkeys(out))


def parse_methods(spec: str) -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    unknown = [n for n in names if n not in available_methods()]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or spec!r}; valid methods: {', '.join(available_methods())}")
    return names


def run_name(model_id: str, method: str, budget: int | None) -> str:
    return f"{model_id}-{method}-{budget if budget is not None else 'full'}"


def job_config(args: argparse.Namespace, method: str, budget: int | None) -> PruningConfig:
    """The job's ``PruningConfig`` from the sweep's flags, with ``{budget}`` in ``--atp-path`` / ``--lpm-path``
    replaced by ``budget`` (left as given for ``none``, which has no budget and loads no module)."""
    config = pruning_config_from_args(args, method=method, budget=budget)
    if budget is None:
        return config
    subs = {name: getattr(config, name).replace(BUDGET_PLACEHOLDER, str(budget)) for name, _, _ in MODULE_PATHS
            if getattr(config, name) and BUDGET_PLACEHOLDER in getattr(config, name)}  # fmt: skip
    return replace(config, **subs) if subs else config


def check_module_paths(args: argparse.Namespace, combos: list[tuple]) -> None:
    """Every trained-module folder a (method, budget) will load exists (before the model loads): one error naming
    the flag, the budget and the path."""
    for method, budget in combos:
        config, method_class = job_config(args, method, budget), get_method_class(method)
        for name, flag, uses in MODULE_PATHS:
            path = getattr(config, name)
            if not getattr(method_class, uses, False) or not path or os.path.exists(path):
                continue
            given = getattr(args, name, None) or ""
            if BUDGET_PLACEHOLDER in given:
                raise FileNotFoundError(f"{flag} {given!r} at budget {budget} ({method}): {path} does not exist; "
                                        f"put the modules trained for a target of {budget} there, or drop that "
                                        "budget from --budgets")  # fmt: skip
            raise FileNotFoundError(f"{flag} {path} ({method} at budget {budget}): no such file or folder")


def module_paths(config: PruningConfig) -> dict:
    """``{"atp_path": ..., "lpm_path": ...}``: the absolute trained-module folders ``config``'s method loads (None:
    the method loads none of that kind, or runs untrained modules). ``config`` as attached (``with_shipped_lpm``)."""
    method_class = get_method_class(config.method)
    return {name: os.path.abspath(getattr(config, name)) if getattr(method_class, uses, False) and getattr(config, name)
            else None for name, _, uses in MODULE_PATHS}  # fmt: skip


def instance_tokens(answers_file: str) -> list[float]:
    """Per image prompt (answers file order), its measured vision tokens per LLM layer averaged over the layers;
    text-only prompts and lines without ``vision_tokens_per_layer`` are left out."""
    values = []
    with open(answers_file, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            per_layer = rec.get("vision_tokens_per_layer")
            if per_layer and not (rec.get("metadata") or {}).get("text_only"):
                values.append(sum(per_layer) / len(per_layer))
    return values


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between the sorted values (numpy's default,
    ``method="linear"``): position ``(n - 1) * q / 100`` in the sorted list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def token_stats(values: list[float]) -> dict:
    """:data:`TOKEN_FIELDS` of per-instance token counts: the percentiles and the population std (exactly 0 when
    every instance has the same count); None each without values."""
    if not values:
        return dict.fromkeys(TOKEN_FIELDS)
    out = {f"tokens_p{q}": percentile(values, q) for q in TOKEN_PERCENTILES}
    mean = sum(values) / len(values)
    spread = min(values) != max(values)
    out["tokens_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if spread else 0.0
    return out


def varies(row: dict) -> bool:
    """Whether a results row's per-instance token counts vary (std > 0: an adaptive method)."""
    return row.get("status") == "ok" and (row.get("tokens_std") or 0) > 0


def _task(bench: B.Benchmark, eval_root: str) -> answer_loop.Task:
    """The benchmark's questions, read by its generator (``bench.generator_argv``: the question flags the eval
    script passes, e.g. ``--single-pred-prompt``)."""
    module = B.generator_module(bench)
    parser = argparse.ArgumentParser(prog=f"llava.eval.{bench.generator}", add_help=False)
    module.add_question_args(parser)
    return module.task(parser.parse_args(bench.generator_argv(eval_root)))


@dataclass(frozen=True)
class Job:
    """One unit of sweep work: answer chunk ``chunk`` of ``num_chunks`` of one benchmark with one (method, budget)."""

    method: str
    budget: int | None
    bench: str
    chunk: int = 0
    num_chunks: int = 1

    def chunk_of(self, task: answer_loop.Task) -> answer_loop.Task:
        """The benchmark's task restricted to this job's chunk of its questions."""
        return replace(task, items=answer_loop.get_chunk(task.items, self.num_chunks, self.chunk))

    def answers_file(self, out: str, model_id: str) -> str:
        """The run's ``answers.jsonl``, or with several chunks ``chunks/<num_chunks>_<chunk>.jsonl`` beside it
        (upstream's chunk naming), merged into ``answers.jsonl`` when every chunk is done."""
        run_dir = os.path.join(out, "answers", self.bench, run_name(model_id, self.method, self.budget))
        if self.num_chunks == 1:
            return os.path.join(run_dir, "answers.jsonl")
        return os.path.join(run_dir, "chunks", f"{self.num_chunks}_{self.chunk}.jsonl")


def _plan_summary(plan) -> dict:
    return {"r1": plan.r1, "r2": plan.r2, "layer": plan.layer, "average": plan.average}


class SweepWorker:
    """Loads the base model once and answers sweep jobs with it: the sweep's one local worker, or a Ray actor
    (``llava.eval.sweep_ray``) that gets many jobs. Everything it needs comes from the sweep's parsed flags."""

    def __init__(self, args: argparse.Namespace, threads: int | None = None):
        import torch

        from ..model.builder import image_pixels_for, load_pretrained_model
        from learnpruner_ext.timing import StageTimer
        from learnpruner_ext.vision_cache import VisionCache

        if threads:
            torch.set_num_threads(threads)
        self.args = args
        pixels = image_pixels_for(args.model_path, args.min_pixels, args.max_pixels)  # Qwen2.5-VL's resolution range
        self.tokenizer, self.model, self.processor, _ = load_pretrained_model(
            args.model_path, args.model_base, device=args.device, dtype=args.dtype, image_pixels=pixels)  # fmt: skip
        self.model_id = get_model_name_from_path(args.model_path)
        self.cache = VisionCache(int(args.vision_cache_gb * 2**30)) if args.vision_cache_gb > 0 else None
        self.model.model.set_vision_cache(self.cache)
        self.timer = StageTimer(self.model.device) if args.profile else None
        self.model.model.set_stage_timer(self.timer)
        self.attached: tuple | None = None
        self.plans: dict[tuple, dict] = {}  # (method, budget) -> plan summary, or {"infeasible": reason}
        self.tasks: dict[str, answer_loop.Task] = {}
        self.jobs_done = 0

    def describe(self) -> dict:
        """What the results need from the loaded model: N, the reference vision tokens."""
        return {"num_vision_tokens": self.model.num_vision_tokens}

    def attach(self, method: str, budget: int | None) -> dict:
        """Attach (method, budget) unless it is attached -> its plan summary, or ``{"infeasible": reason}``."""
        import torch

        if (method, budget) != self.attached:
            config = job_config(self.args, method, budget)
            self.attached = None
            try:
                torch.manual_seed(config.seed)  # an untrained LPM is reproducible
                self.plans[(method, budget)] = _plan_summary(apply_pruning(self.model, config).plan)
                self.attached = (method, budget)
            except (BudgetError, UnsupportedMethodError) as err:  # recorded; the sweep goes on with the next run
                note = str(err) if isinstance(err, BudgetError) else f"not defined on {self.model.model.adapter.family}: {err}"
                self.plans[(method, budget)] = {"infeasible": note}
        return self.plans[(method, budget)]

    def run(self, job: Job) -> dict:
        """Answer ``job`` (resuming its answers file) -> a record: plan, answers counts, seconds, worker."""
        start, stages_before = time.perf_counter(), dict(self.timer.seconds) if self.timer else {}
        cache_before = self.cache.stats() if self.cache is not None else None
        plan = self.attach(job.method, job.budget)
        record = {**asdict(job), "plan": plan, "worker": f"{socket.gethostname()}:{os.getpid()}"}
        if "infeasible" in plan:
            return record
        record["modules"] = module_paths(self.attached_config())  # the trained modules this job's answers used
        if job.bench not in self.tasks:
            self.tasks[job.bench] = _task(B.BENCHMARKS[job.bench], self.args.eval_root)
        task = job.chunk_of(self.tasks[job.bench])
        summary = answer_loop.answer(
            task, job.answers_file(self.args.out, self.model_id), self.attached_config(), _generation(self.args),
            conv_mode=self.args.conv_mode, model_path=self.args.model_path,
            loaded=(self.tokenizer, self.model, self.processor), batch_size=self.args.batch_size,
            progress=not self.args.no_progress, min_pixels=self.args.min_pixels, max_pixels=self.args.max_pixels,
        )  # fmt: skip
        self.jobs_done += 1
        record.update(total=summary.total, already=summary.already, generated=summary.generated,
                      seconds=time.perf_counter() - start, jobs_on_worker=self.jobs_done)  # fmt: skip
        if self.timer:
            record["stage_seconds"] = {k: v - stages_before.get(k, 0.0) for k, v in self.timer.seconds.items()}
        if self.cache is not None:
            record["vision_cache"] = {k: v - cache_before[k] for k, v in self.cache.stats().items()}
        return record

    def attached_config(self):
        return self.model.pruner.config if self.model.pruner is not None else job_config(self.args, "none", None)


def _generation(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(temperature=0.0, max_new_tokens=args.max_new_tokens)  # greedy, as the scripts


def plan_jobs(args: argparse.Namespace) -> tuple[list[tuple], list[Job], list]:
    """Check everything that needs no model -> ((method, budget) combos, their jobs, benchmarks)."""
    apply_family_defaults(args)
    benches = B.parse_benchmarks(args.benchmarks)
    methods = parse_methods(args.methods)
    budgets = parse_budgets(args.budgets)
    if any(m != "none" for m in methods) and not budgets:
        raise ValueError("--budgets is empty but pruning methods were requested")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_chunks < 1:
        raise ValueError(f"--num-chunks must be >= 1, got {args.num_chunks}")
    if args.vision_cache_gb < 0:
        raise ValueError(f"--vision-cache-gb must be >= 0 (0: no cache), got {args.vision_cache_gb}")
    missing = {b.name: b.missing_files(args.eval_root) for b in benches}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in missing.items())
        raise FileNotFoundError(f"benchmark data missing under --eval-root {args.eval_root}: {listed} (see docs/evaluation.md)")
    combos = ([("none", None)] if "none" in methods else []) + [(m, b) for b in budgets for m in methods if m != "none"]
    for m, b in combos:  # flag errors (e.g. --method-option) before loading
        job_config(args, m, b)
    check_module_paths(args, combos)  # e.g. --atp-path 'outputs/atp/t{budget}' with no folder for one budget
    for bench in benches:  # question-file errors, too
        _task(bench, args.eval_root)
    jobs = [Job(m, b, bench.name, k, args.num_chunks) for m, b in combos for bench in benches
            for k in range(args.num_chunks)]  # fmt: skip
    return combos, jobs, benches


def pending_jobs(args: argparse.Namespace, jobs: list[Job]) -> list[Job]:
    """The jobs whose answers file is not complete (read without the model; a file of another run is refused)."""
    model_id, tasks, out = get_model_name_from_path(args.model_path), {}, []
    for job in jobs:
        if job.bench not in tasks:
            tasks[job.bench] = _task(B.BENCHMARKS[job.bench], args.eval_root)
        task = job.chunk_of(tasks[job.bench])
        config = with_shipped_lpm(job_config(args, job.method, job.budget), args.model_path)
        _, _, todo = answer_loop.resume_state(task, job.answers_file(args.out, model_id), config, _generation(args),
                                              conv_mode=args.conv_mode, model_path=args.model_path,
                                              min_pixels=args.min_pixels, max_pixels=args.max_pixels)  # fmt: skip
        if todo:
            out.append(job)
    return out


def run_serial(args: argparse.Namespace, combos: list[tuple], jobs: list[Job]) -> tuple[dict, list[dict], dict]:
    """Every job on one local worker, (method, budget) by (method, budget) -> (plans, job records, model info)."""
    worker = SweepWorker(args)
    todo, plans, records = set(pending_jobs(args, jobs)), {}, []
    for combo in combos:
        plans[combo] = worker.attach(*combo)
        run = run_name(worker.model_id, *combo)
        if "infeasible" in plans[combo]:
            print(f"[sweep] {run}: infeasible: {plans[combo]['infeasible']}", file=sys.stderr)
            continue
        for job in (j for j in jobs if (j.method, j.budget) == combo and j in todo):
            print(f"[sweep] {run} on {job.bench}" + (f" (chunk {job.chunk + 1}/{job.num_chunks})"
                                                    if job.num_chunks > 1 else ""), file=sys.stderr)  # fmt: skip
            records.append(worker.run(job))
    return plans, records, worker.describe()


def run_sweep(args: argparse.Namespace) -> dict:
    combos, jobs, benches = plan_jobs(args)  # everything that can be checked without the model, first
    if args.ray:
        from .sweep_ray import run_on_ray

        plans, records, info = run_on_ray(args, combos, jobs)
    else:
        plans, records, info = run_serial(args, combos, jobs)
    model_id = get_model_name_from_path(args.model_path)
    rows = []
    for method, budget in combos:
        plan = plans[(method, budget)]
        modules = module_paths(with_shipped_lpm(job_config(args, method, budget), args.model_path))
        if "infeasible" in plan:
            rows += [_row(method, budget, b, "infeasible", note=plan["infeasible"], modules=modules) for b in benches]
            continue
        for bench in benches:
            mine = [j for j in jobs if (j.method, j.budget, j.bench) == (method, budget, bench.name)]
            answers = Job(method, budget, bench.name).answers_file(args.out, model_id)
            if args.num_chunks > 1:  # the chunks in order, refusing duplicates and mixed runs
                records_ = merge_answers.merge([j.answers_file(args.out, model_id) for j in mine])
                write_atomic(answers, "".join(json.dumps(clean(r), ensure_ascii=False) + "\n" for r in records_))
            run_dir = os.path.dirname(answers)
            metrics = B.score(bench, args.eval_root, answers, run_dir, run_name(model_id, method, budget),
                              args.vqav2_annotation)  # fmt: skip
            write_json(os.path.join(run_dir, "metrics.json"), metrics)
            values = instance_tokens(answers)
            rows.append(_row(method, budget, bench, "ok", metrics=metrics, plan=plan, answers=answers,
                             avg=sum(values) / len(values) if values else None, stats=token_stats(values),
                             modules=modules))  # fmt: skip
    table = family_table(args.model_path)
    results = {
        "model_path": args.model_path, "model_id": model_id, "num_vision_tokens": info["num_vision_tokens"],
        "methods": parse_methods(args.methods), "budgets": parse_budgets(args.budgets),
        "benchmarks": [b.name for b in benches], "metrics": {b.name: b.metric_label for b in benches}, "rows": rows,
        "paper_table": table.table, "conv_mode": args.conv_mode,
    }  # fmt: skip
    results["relacc"] = relative_accuracy(rows, benches)
    write_json(os.path.join(args.out, "jobs.json"), {"executor": "ray" if args.ray else "serial", "jobs": records})
    write_outputs(args.out, results, benches)
    return results


def _row(method, budget, bench, status, metrics=None, plan=None, answers=None, avg=None, note="", stats=None,
         modules=None):
    metrics = metrics or {}
    value = bench.headline(metrics) if status == "ok" else None
    if status == "ok" and value is None:
        status, note = "no_metric", f"{bench.metric} not computed (e.g. VQAv2 test-dev: upload the submission file)"
    n = metrics.get("n")
    if n is None and "categories" in metrics:  # POPE counts per category
        n = sum(metrics[c]["n"] for c in metrics["categories"])
    return {
        "method": method, "budget": budget, "benchmark": bench.name, "status": status, "metric": bench.metric,
        "value": value, "n": n, "missing": metrics.get("missing"),
        "r1": plan["r1"] if plan else None, "r2": plan["r2"] if plan else None,
        "layer": plan["layer"] if plan else None,
        "avg_vision_tokens": avg if avg is not None else (plan["average"] if plan else None),
        "extra": {k: metrics[k] for k in EXTRA_METRICS.get(bench.name, ()) if k in metrics},
        "note": note, "answers_file": answers,
        **(stats or dict.fromkeys(TOKEN_FIELDS)), **(modules or dict.fromkeys(name for name, _, _ in MODULE_PATHS)),
    }  # fmt: skip


def relative_accuracy(rows: list[dict], benches) -> dict[str, float | str | None]:
    """``"method@budget"`` -> mean over benchmarks of value / vanilla x100; "infeasible"; or None (no vanilla)."""
    vanilla = {r["benchmark"]: r["value"] for r in rows if r["method"] == "none" and r["value"]}
    names = [b.name for b in benches if vanilla.get(b.name)]
    out = {}
    for key in dict.fromkeys(f"{r['method']}@{r['budget']}" for r in rows):
        mine = [r for r in rows if f"{r['method']}@{r['budget']}" == key]
        if any(r["status"] == "infeasible" for r in mine):
            out[key] = "infeasible"
            continue
        values = {r["benchmark"]: r["value"] for r in mine if r["value"] is not None}
        ratios = [values[n] / vanilla[n] for n in names if n in values]
        out[key] = 100 * sum(ratios) / len(ratios) if ratios and len(ratios) == len(names) else None
    return out


def _fmt(bench: str, value) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if bench == "mme" else f"{value:.1f}"


ACHIEVED_TOLERANCE = 0.5  # table.md shows "T (achieved A)" where the measured average is further than this from T


def _avg_cell(budget: int | None, avg: float | None) -> str:
    """The table's Avg. tokens cell: the measured average, or ``"72 (achieved 70.4)"`` when it differs from the
    requested budget by more than :data:`ACHIEVED_TOLERANCE`."""
    if avg is None:
        return "–"
    if budget is not None and abs(avg - budget) > ACHIEVED_TOLERANCE:
        return f"{budget} (achieved {avg:.1f})"
    return f"{avg:.1f}"


def _run_average(rows: list[dict]) -> float | None:
    """A run's achieved average in the table: the mean over its benchmarks of their measured averages (they differ
    only for adaptive methods, whose counts depend on the images and prompts)."""
    values = [r["avg_vision_tokens"] for r in rows if r and r.get("avg_vision_tokens") is not None]
    return sum(values) / len(values) if values else None


def token_distribution_section(results: dict, benches) -> list[str]:
    """table.md's lines for the runs whose per-instance counts vary (std > 0), one table per benchmark: the
    requested budget, the achieved average, the std and the percentiles; [] when no run varies."""
    rows = [r for r in results["rows"] if varies(r)]
    if not rows:
        return []
    pcts = [f"p{q}" for q in TOKEN_PERCENTILES]
    lines = ["", "## Vision tokens per instance (runs whose counts vary)", "",
             "Each image prompt's vision tokens per LLM layer (its `vision_tokens_per_layer` averaged over the layers); "
             "percentiles by linear interpolation between the sorted values (numpy's default), std over the prompts "
             "(population). Histogram: `tokens_histogram.png`."]  # fmt: skip
    for bench in benches:
        mine = [r for r in rows if r["benchmark"] == bench.name]
        if not mine:
            continue
        lines += ["", f"### {bench.title}", "", "| Method | Budget | Achieved | Std | " + " | ".join(pcts) + " |",
                  "|:--|" + "--:|" * (3 + len(pcts))]  # fmt: skip
        for r in mine:
            cells = [r["method"], "–" if r["budget"] is None else str(r["budget"]), f"{r['avg_vision_tokens']:.1f}",
                     f"{r['tokens_std']:.2f}", *(f"{r[f'tokens_{p}']:.1f}" for p in pcts)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_table(results: dict, benches) -> str:
    n = results["num_vision_tokens"]
    rows, rel = results["rows"], results["relacc"]
    cells = {(r["method"], r["budget"], r["benchmark"]): r for r in rows}
    header = ["Method", "Avg. tokens"] + [b.title for b in benches] + ["RelAcc."]
    lines = [
        f"# Visual-token pruning sweep: {results['model_id']}"
        + (f" (the layout of the paper's {results['paper_table']})" if results.get("paper_table") else ""),
        "",
        "Headline metrics: " + "; ".join(f"{b.title} = {b.metric_label}" for b in benches)
        + ". Avg. tokens = measured mean vision tokens per LLM layer, over the benchmarks; where it differs from "
        f'the budget T by more than {ACHIEVED_TOLERANCE}, the cell reads "T (achieved A)". RelAcc. = mean over '
        "benchmarks of method / vanilla.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":--", "--:"] + ["--:"] * (len(benches) + 1)) + "|",
    ]  # fmt: skip
    groups = ([(None, f"Upper Bound, {n} Tokens (100%)")] if "none" in results["methods"] else []) + [
        (b, f"Retain Averaged {b} Tokens (↓ {100 * (1 - b / n):.1f}%)" if b <= n else f"Budget {b} Tokens (> {n})")
        for b in results["budgets"]
        if any(m != "none" for m in results["methods"])
    ]  # fmt: skip
    for budget, title in groups:
        lines.append(f"| *{title}* |" + " |" * (len(header) - 1))
        for method in results["methods"]:
            if (method == "none") != (budget is None):
                continue
            mine = [cells.get((method, budget, b.name)) for b in benches]
            row_cells = []
            for b, r in zip(benches, mine):
                if r is None or r["status"] == "infeasible":
                    row_cells.append("infeasible" if r else "–")
                else:
                    row_cells.append(_fmt(b.name, r["value"]))
            avg = _run_average(mine)
            relacc = rel.get(f"{method}@{budget}")
            relacc = relacc if isinstance(relacc, str) else ("–" if relacc is None else f"{relacc:.1f}%")
            label = "Vanilla (none)" if method == "none" else method
            lines.append("| " + " | ".join([label, _avg_cell(budget, avg), *row_cells, relacc]) + " |")
    notes = sorted({f"{r['benchmark']}: {r['note']}" for r in rows if r["status"] == "no_metric"})
    infeasible = sorted({f"{r['method']} @ {r['budget']}: {r['note']}" for r in rows if r["status"] == "infeasible"})
    if "none" not in results["methods"]:
        notes.append("RelAcc needs the vanilla model: add `none` to --methods")
    if notes or infeasible:
        lines += ["", "Notes:"] + [f"- {x}" for x in notes] + [f"- infeasible: {x}" for x in infeasible]
    lines += token_distribution_section(results, benches)
    return "\n".join(lines) + "\n"


def plot(results: dict, benches, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, budgets = results["rows"], sorted(results["budgets"])
    methods = [m for m in results["methods"] if m != "none"]
    panels = [(b.title, b.name) for b in benches] + [("RelAcc. (%)", None)]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (title, name) in zip(axes.flat, panels):
        for method in methods:
            if name is None:
                ys = [results["relacc"].get(f"{method}@{b}") for b in budgets]
            else:
                ys = [next((r["value"] for r in rows if (r["method"], r["budget"], r["benchmark"]) == (method, b, name)), None)
                      for b in budgets]  # fmt: skip
            pts = [(b, y) for b, y in zip(budgets, ys) if isinstance(y, (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ref = 100.0 if name is None else next(
            (r["value"] for r in rows if r["method"] == "none" and r["benchmark"] == name), None)
        if "none" in results["methods"] and ref is not None:
            ax.axhline(ref, color="gray", linestyle="--", label="vanilla")
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets)
            ax.set_xticklabels([str(b) for b in budgets])
        ax.set_title(title)
        ax.set_xlabel("vision tokens per layer (budget)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Accuracy vs. visual-token budget: {results['model_id']}")
    _save_png(fig, path)


def _save_png(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def token_histogram(results: dict, benches, path: str) -> bool:
    """``tokens_histogram.png``: one panel per benchmark with a run whose per-instance counts vary (std > 0), the
    histogram of its per-prompt average vision tokens per layer (:func:`instance_tokens`, read from the run's
    answers file) overlaid per (method, budget), a dashed line at each requested budget. Returns False (and
    writes nothing, removing a stale file) when no run varies."""
    runs = [r for r in results["rows"] if varies(r) and r.get("answers_file") and os.path.isfile(r["answers_file"])]
    panels = [(b, [r for r in runs if r["benchmark"] == b.name]) for b in benches]
    panels = [(b, mine) for b, mine in panels if mine]
    if not panels:
        if os.path.exists(path):
            os.remove(path)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (bench, mine) in zip(axes.flat, panels):
        values = [instance_tokens(r["answers_file"]) for r in mine]
        budgets = [r["budget"] for r in mine if r["budget"] is not None]
        lo, hi = min(min(v) for v in values), max(max(v) for v in values)
        lo, hi = min([lo, *budgets]), max([hi, *budgets])
        edges = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 30
        for i, (r, v) in enumerate(zip(mine, values)):
            color = f"C{i % 10}"
            label = f"{r['method']} @ {r['budget'] if r['budget'] is not None else 'full'} (mean {sum(v) / len(v):.1f})"
            ax.hist(v, bins=edges, alpha=0.45, color=color, label=label)
            if r["budget"] is not None:
                ax.axvline(r["budget"], color=color, linestyle="--", linewidth=1.2)
        ax.set_title(bench.title)
        ax.set_xlabel("vision tokens per layer (per prompt; dashed: budget)")
        ax.set_ylabel("prompts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Per-instance vision tokens of the adaptive runs: {results['model_id']}")
    _save_png(fig, path)
    return True


def write_outputs(out: str, results: dict, benches) -> None:
    os.makedirs(out, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in results["rows"]:
        w.writerow({**r, "extra": json.dumps(r["extra"]) if r["extra"] else "", "budget": "" if r["budget"] is None else r["budget"]})
    write_atomic(os.path.join(out, "results.csv"), buf.getvalue())
    results["files"] = {k: os.path.join(out, v) for k, v in
                        (("csv", "results.csv"), ("table", "table.md"), ("plot", "accuracy_vs_budget.png"))}  # fmt: skip
    histogram = os.path.join(out, "tokens_histogram.png")
    if token_histogram(results, benches, histogram):  # only when some run's counts vary
        results["files"]["histogram"] = histogram
    write_json(os.path.join(out, "results.json"), results)
    table = markdown_table(results, benches)
    write_atomic(os.path.join(out, "table.md"), table)
    plot(results, benches, results["files"]["plot"])
    print(table)
    print(f"[sweep] plot: {results['files']['plot']}", file=sys.stderr)
    if "histogram" in results["files"]:
        print(f"[sweep] token histogram: {histogram}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    return run_sweep(build_parser().parse_args(argv))


if __name__ == "__main__":
    from .sweep_ray import SweepClusterError

    try:
        main()
    except (ValueError, FileNotFoundError, SweepClusterError) as err:
        sys.exit(f"error: {err}")
