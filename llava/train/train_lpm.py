"""Train LearnPruner's Learnable Pruning Module on a frozen LLaVA, LLaVA-NeXT or Qwen2.5-VL (paper §3, Appendix A.1).

    deepspeed llava/train/train_lpm.py --deepspeed scripts/zero2.json \\
        --model_name_or_path ./checkpoints/llava-v1.5-7b --version v1 \\
        --data_path ./playground/data/llava_v1_5_mix665k.json --image_folder ./playground/data \\
        --data_fraction 0.1 --output_dir ./checkpoints/llava-v1.5-7b-lpm --bf16 True ...

(also ``torchrun llava/train/train_lpm.py ...`` or ``python -m llava.train.train_lpm ...``; see
``scripts/v1_5/finetune_lpm.sh`` and ``docs/training.md``; a Qwen2.5-VL base takes ``--version qwen2_5_vl``, which
the script picks from its config). Only the LPM trains; checkpoints and the
final output hold only the LPM, loadable with ``python -m llava.eval.run_llava --lpm-path OUTPUT_DIR``.
``--question_types`` / ``--exclude_question_types`` / ``--data_sources`` train on a subset
(:class:`llava.train.data.RecordFilter`; recorded as ``data_filter`` in ``lpm_config.json``).
A run restarted with the same ``--output_dir`` resumes from its last checkpoint; it is refused when the
arguments in :data:`RESUME_ARGS` or the samples differ from the checkpoint's ``run_args.json``, unless
``--allow_changed_args True``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # launched as a script (deepspeed / torchrun llava/train/train_lpm.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import transformers
from transformers.trainer_utils import get_last_checkpoint

from learnpruner_ext.adapters import feature_dim
from learnpruner_ext.lpm import KEEP, LPM_CONFIG, LearnablePruningModule
from learnpruner_ext.training import LPMTrainingModel
from llava.conversation import check_conv_mode, get_conv_template
from llava.model.builder import load_pretrained_model
from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset, RecordFilter, check_fraction
from llava.train.lpm_trainer import RUN_ARGS, LPMTrainer

logger = logging.getLogger("llava.train.train_lpm")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="./checkpoints/llava-v1.5-7b", metadata={"help": "frozen base LLaVA"})
    model_base: str | None = field(default=None, metadata={"help": "base LLM for projector-only checkpoints"})
    version: str = field(default="v1", metadata={"help": "conversation template (v1 = vicuna_v1; qwen2_5_vl for a "
                         "Qwen2.5-VL base, its ChatML template)"})  # fmt: skip


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA-665K-style JSON (list) or JSONL"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the samples' 'image' paths are relative to"})
    data_fraction: float = field(default=1.0, metadata={"help": "share of the samples to train on, in (0, 1]; the "
                                 "subset is drawn with --data_seed (default: --seed)"})  # fmt: skip
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for upstream compatibility; always lazy"})
    skip_missing_images: bool = field(default=False, metadata={"help": "drop samples whose image file is missing "
                                      "or cannot be decoded (counted in the log) instead of stopping"})  # fmt: skip
    check_images: bool = field(default=True, metadata={"help": "decode every image once before training and report "
                               "all bad ones together; False only checks that the files exist"})  # fmt: skip
    question_types: str | None = field(default=None, metadata={"help": "comma-separated toy-world question types "
                                       "(e.g. count,position): train only on these QA turns; applied before "
                                       "--data_fraction; recorded in lpm_config.json"})  # fmt: skip
    exclude_question_types: str | None = field(default=None, metadata={"help": "comma-separated question types "
                                               "whose QA turns are left out (e.g. to hold them out for evaluation)"})  # fmt: skip
    data_sources: str | None = field(default=None, metadata={"help": "comma-separated source datasets (first folder "
                                     "of 'image', e.g. coco,gqa; 'text-only' for samples without image) to train on"})  # fmt: skip


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak lr (a fresh 0.5M MLP; docs/training.md)"})
    model_max_length: int = field(default=2048, metadata={"help": "longer samples are truncated"})
    prune_loss_weight: float = field(default=1.0, metadata={"help": "λ_p of Eq. 8"})
    prune_target_ratio: float = field(default=0.0, metadata={"help": "τ of Eq. 7 (target share of kept vision tokens)"})
    lpm_hidden: int = field(default=512, metadata={"help": "hidden width of the LPM MLP"})
    lpm_init_keep_bias: float | None = field(default=None, metadata={"help": "start the LPM's output bias at "
                                             "(prune 0, keep B) so training starts from keeping (B > 0) or dropping "
                                             "(B < 0) most tokens; default: plain random init"})  # fmt: skip
    remove_unused_columns: bool = field(default=False)
    allow_changed_args: bool = field(default=False, metadata={"help": "resume even when the data, lr, batch sizes, "
                                     "world size, base or LPM/loss settings differ from the checkpoint's "
                                     "run_args.json (the new values apply)"})  # fmt: skip


# what a resumed run must share with the checkpoint: the optimizer, scheduler, step and data order come from
# it. max_steps / num_train_epochs are left out on purpose: raising them is how a run is extended.
RESUME_ARGS = (
    "model_name_or_path", "model_base", "version", "data_path", "image_folder", "data_fraction", "data_seed", "seed",
    "model_max_length", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "effective_batch_size",
    "lpm_hidden", "prune_loss_weight", "prune_target_ratio",
    "question_types", "exclude_question_types", "data_sources",
)  # fmt: skip


def parse_args(argv: list[str] | None = None):
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def resolve_resume(args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint PATH|true|false``; by default the last ``checkpoint-N`` of ``--output_dir``."""
    requested = args.resume_from_checkpoint
    if requested is not None and str(requested).lower() in ("false", "no", "none"):
        return None
    if requested is None or str(requested).lower() in ("true", "yes", "auto", "last"):
        last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        if last is None and requested is not None:
            logger.warning("no checkpoint in %s to resume from; starting a new run", args.output_dir)
        return last
    if not Path(requested).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {requested} does not exist")
    return requested


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def run_args(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments,
             keys: tuple[str, ...] = RESUME_ARGS) -> dict:  # fmt: skip
    """The ``keys`` (:data:`RESUME_ARGS`) of this run (paths resolved, the effective data seed and batch size)."""
    values = {**vars(model_args), **vars(data_args), **args.to_dict(), "world_size": args.world_size}
    values.update(
        model_name_or_path=_resolved(model_args.model_name_or_path), model_base=_resolved(model_args.model_base),
        data_path=_resolved(data_args.data_path), image_folder=_resolved(data_args.image_folder),
        data_seed=args.data_seed if args.data_seed is not None else args.seed,
        effective_batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
    )  # fmt: skip
    return {key: values[key] for key in keys}


def check_changed_args(checkpoint: str, current: dict, allow: bool) -> None:
    """Refuse to resume ``checkpoint`` when a value in ``current`` differs from the one it was saved with.

    The values come from the checkpoint's ``run_args.json``; an older checkpoint without one has only its
    ``lpm_config.json`` ``base_model`` to compare.
    """
    saved_file, config_file = Path(checkpoint) / RUN_ARGS, Path(checkpoint) / LPM_CONFIG
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
    else:
        base = json.loads(config_file.read_text()).get("base_model") if config_file.is_file() else None
        saved = {"model_name_or_path": base} if base is not None else {}
        logger.warning("%s has no %s: only its base model can be compared with this run", checkpoint, RUN_ARGS)
    changed = [f"{key} {saved[key]!r} -> {new!r}" for key, new in current.items() if key in saved and saved[key] != new]
    if not changed:
        return
    if allow:
        logger.warning("resuming %s with changed arguments (--allow_changed_args): %s", checkpoint, ", ".join(changed))
        return
    raise ValueError(
        f"checkpoint {checkpoint} was trained with other values (checkpoint -> this run): {', '.join(changed)}. "
        "Resuming would mix the two runs (the optimizer, schedule and data order come from the checkpoint). "
        "Rerun with the checkpoint's values, pass --allow_changed_args True to resume with the new ones, or start "
        "over with another --output_dir or --resume_from_checkpoint false"
    )


def _check_version(version: str, family: str | None = None) -> None:
    """The template exists (and is the family's own, for families that need theirs); errors name ``--version``."""
    try:
        get_conv_template(version)
        if family is not None:
            check_conv_mode(family, version)
    except ValueError as err:
        raise ValueError(str(err).replace("--conv-mode", "--version")) from None


def _dtype(args: TrainingArguments) -> str:
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


def _init_deepspeed_comm(args: TrainingArguments) -> None:
    """Log the process group and hand it to DeepSpeed before the base loads.

    Under ZeRO-3 the base loads inside ``deepspeed.zero.Init``, which checks the batch sizes against DeepSpeed's own
    world size. On GPUs accelerate initialises DeepSpeed's communication itself; with ``--use_cpu`` (the CPU runs,
    gloo) it only starts ``torch.distributed``, so zero.Init saw a world of 1 and multi-process ZeRO-3 stopped with
    "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size". DeepSpeed adopts the
    existing group (``init_distributed`` does nothing when it is already set up).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if args.process_index == 0:
        logger.warning("world size %d, torch.distributed backend %s", args.world_size, torch.distributed.get_backend())
    if args.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def start_run(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments,
              keys: tuple[str, ...] = RESUME_ARGS) -> tuple[RecordFilter, str | None, dict]:  # fmt: skip
    """The checks that need no weights, the process group and the resume decision ->
    (record filter, resume checkpoint or None, this run's ``keys`` values)."""
    check_fraction(data_args.data_fraction)
    if data_args.data_path is None:
        raise ValueError("--data_path is required")
    _check_version(model_args.version)  # an unknown template fails here, before the weights load
    record_filter = RecordFilter(data_args.question_types, data_args.exclude_question_types, data_args.data_sources)
    if record_filter.active():  # a filter that matches nothing stops here, before the weights load
        with open(data_args.data_path) as f:
            record_filter.apply(json.load(f), f"--data_path {data_args.data_path}")
    _ = str(args.device)  # also sets up torch.distributed, which world_size needs
    _init_deepspeed_comm(args)
    resume = resolve_resume(args)
    current = run_args(model_args, data_args, args, keys)
    if resume is not None:
        check_changed_args(resume, current, args.allow_changed_args)
        logger.warning("resuming from %s", resume)
    return record_filter, resume, current


def load_base(model_args: ModelArguments, args: TrainingArguments):
    """-> (tokenizer, model, image processor) of the frozen base, in the run's dtype, on its device."""
    transformers.set_seed(args.seed)
    tokenizer, vlm, image_processor, _ = load_pretrained_model(
        model_args.model_name_or_path, model_args.model_base, device=str(args.device), dtype=_dtype(args)
    )
    _check_version(model_args.version, vlm.family)  # e.g. a Qwen2.5-VL base needs --version qwen2_5_vl
    tokenizer.model_max_length = args.model_max_length
    return tokenizer, vlm, image_processor


def make_dataset(model_args, data_args, args, vlm, tokenizer, image_processor, record_filter, resume, what="the LPM"):
    """The lazily tokenised training samples (-> dataset, their identity ``{num_samples, samples_sha256}``); a
    resumed run must read the same samples as its checkpoint."""
    data_seed = args.data_seed if args.data_seed is not None else args.seed
    dataset = LazySupervisedDataset(
        data_args.data_path,
        tokenizer,
        image_processor,
        num_image_tokens=vlm.num_vision_tokens,
        image_token_id=vlm.config.image_token_id,
        image_folder=data_args.image_folder,
        conv_mode=model_args.version,
        model_max_length=args.model_max_length,
        data_fraction=data_args.data_fraction,
        data_seed=data_seed,
        skip_missing_images=data_args.skip_missing_images,
        model_config=vlm.config,
        check_images=data_args.check_images,
        image_token_counts=vlm.image_token_counts,  # N_i from the image's layout (LLaVA-NeXT, Qwen2.5-VL)
        record_filter=record_filter,
    )
    skipped = f", {dataset.num_skipped} skipped: image missing or undecodable" if dataset.num_skipped else ""
    matching = f", {dataset.num_matching} match {record_filter.describe()}" if record_filter.active() else ""
    logger.warning(
        "training %s on %d of %d samples (fraction %s, seed %d%s%s)", what, len(dataset), dataset.total_entries,
        data_args.data_fraction, data_seed, matching, skipped,
    )  # fmt: skip
    samples = {"num_samples": len(dataset), "samples_sha256": dataset.fingerprint()}
    if resume is not None:  # the data as read now, after skips: a changed file or skip set changes the order
        check_changed_args(resume, samples, args.allow_changed_args)
    return dataset, samples


def data_metadata(data_args: DataArguments, args: TrainingArguments, record_filter: RecordFilter) -> dict:
    return {
        "data_path": str(Path(data_args.data_path).resolve()),
        "data_fraction": data_args.data_fraction,
        "data_seed": args.data_seed if args.data_seed is not None else args.seed,
        "data_filter": record_filter.metadata(),  # None: all samples; else the types / sources trained on
    }


def build(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments):
    """Load the base, build data and the training module -> (trainer, resume checkpoint or None)."""
    LPMTrainingModel.check_objective(args.prune_loss_weight, args.prune_target_ratio)  # before loading 7B weights
    record_filter, resume, current = start_run(model_args, data_args, args)
    base_model = str(Path(model_args.model_name_or_path).resolve())
    tokenizer, vlm, image_processor = load_base(model_args, args)
    dataset, samples = make_dataset(model_args, data_args, args, vlm, tokenizer, image_processor, record_filter, resume)
    # the LPM's init from --seed alone: loading the base under ZeRO-3 (deepspeed.zero.Init) moves the global RNG, so
    # without this the ZeRO-3 LPM started from other weights than the ZeRO-2 / plain one (those loads draw nothing)
    torch.manual_seed(args.seed)
    lpm = LearnablePruningModule(feature_dim(vlm.config), args.lpm_hidden)
    if args.lpm_init_keep_bias is not None:
        with torch.no_grad():
            lpm.fc2.bias.zero_()[KEEP] = args.lpm_init_keep_bias
    lpm.to(args.device)
    model = LPMTrainingModel(vlm, lpm, args.prune_loss_weight, args.prune_target_ratio)
    metadata = {
        "base_model": base_model,
        "conv_version": model_args.version,
        "prune_loss_weight": args.prune_loss_weight,
        "prune_target_ratio": args.prune_target_ratio,
        **data_metadata(data_args, args, record_filter),
    }
    trainer = LPMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id),
        lpm_metadata=metadata,
        run_args={**current, **samples},
    )
    return trainer, resume


def train(argv: list[str] | None = None) -> LPMTrainer:
    """Parse, build, train, write the final LPM; configuration and data errors exit with ``error: ...``."""
    try:
        trainer, resume = build(*parse_args(argv))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    args = trainer.args
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    if args.should_save:
        logger.warning("wrote the trained LPM to %s", args.output_dir)
    return trainer


def finish_distributed() -> None:
    """Leave the process group together: a barrier (rank 0 has written the LPM), then its orderly teardown, instead
    of each rank dropping its connections at exit while a peer may still hold them. Without it, one 2-node gloo run
    in the tests had a rank abort (SIGABRT) after the last step, and the launcher reported the run as failed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    train()
    finish_distributed()
