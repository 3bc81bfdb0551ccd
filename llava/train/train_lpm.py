"""Train LearnPruner's Learnable Pruning Module on a frozen LLaVA (paper §3, Appendix A.1).

    deepspeed llava/train/train_lpm.py --deepspeed scripts/zero2.json \\
        --model_name_or_path ./checkpoints/llava-v1.5-7b --version v1 \\
        --data_path ./playground/data/llava_v1_5_mix665k.json --image_folder ./playground/data \\
        --data_fraction 0.1 --output_dir ./checkpoints/llava-v1.5-7b-lpm --bf16 True ...

(also ``torchrun llava/train/train_lpm.py ...`` or ``python -m llava.train.train_lpm ...``; see
``scripts/v1_5/finetune_lpm.sh`` and ``docs/training.md``). Only the LPM trains; checkpoints and the
final output hold only the LPM, loadable with ``python -m llava.eval.run_llava --lpm-path OUTPUT_DIR``.
A run restarted with the same ``--output_dir`` resumes from its last checkpoint.
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

from learnpruner_ext.lpm import KEEP, LPM_CONFIG, LearnablePruningModule
from learnpruner_ext.training import LPMTrainingModel
from llava.model.builder import load_pretrained_model
from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset, check_fraction
from llava.train.lpm_trainer import LPMTrainer

logger = logging.getLogger("llava.train.train_lpm")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="./checkpoints/llava-v1.5-7b", metadata={"help": "frozen base LLaVA"})
    model_base: str | None = field(default=None, metadata={"help": "base LLM for projector-only checkpoints"})
    version: str = field(default="v1", metadata={"help": "conversation template (v1 = vicuna_v1)"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA-665K-style JSON (list) or JSONL"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the samples' 'image' paths are relative to"})
    data_fraction: float = field(default=1.0, metadata={"help": "share of the samples to train on, in (0, 1]; the "
                                 "subset is drawn with --data_seed (default: --seed)"})  # fmt: skip
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for upstream compatibility; always lazy"})
    skip_missing_images: bool = field(default=False, metadata={"help": "drop samples whose image file is missing "
                                      "(counted in the log) instead of stopping"})  # fmt: skip


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


def parse_args(argv: list[str] | None = None):
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def resolve_resume(args: TrainingArguments, base_model: str) -> str | None:
    """``--resume_from_checkpoint PATH|true|false``; by default the last ``checkpoint-N`` of ``--output_dir``."""
    requested = args.resume_from_checkpoint
    if requested is not None and str(requested).lower() in ("false", "no", "none"):
        return None
    if requested is None or str(requested).lower() in ("true", "yes", "auto", "last"):
        last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        if last is None:
            if requested is not None:
                logger.warning("no checkpoint in %s to resume from; starting a new run", args.output_dir)
            return None
        checkpoint = last
    else:
        checkpoint = requested
        if not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint} does not exist")
    config_file = Path(checkpoint) / LPM_CONFIG
    if config_file.is_file():
        saved = json.loads(config_file.read_text()).get("base_model")
        if saved is not None and saved != base_model:
            raise ValueError(
                f"checkpoint {checkpoint} was trained on {saved}, not {base_model}; use another --output_dir "
                "or pass --resume_from_checkpoint false"
            )
    logger.warning("resuming from %s", checkpoint)
    return checkpoint


def _dtype(args: TrainingArguments) -> str:
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


def build(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments):
    """Load the base, build data and the training module -> (trainer, resume checkpoint or None)."""
    check_fraction(data_args.data_fraction)
    if data_args.data_path is None:
        raise ValueError("--data_path is required")
    LPMTrainingModel.check_objective(args.prune_loss_weight, args.prune_target_ratio)  # before loading 7B weights
    base_model = str(Path(model_args.model_name_or_path).resolve())
    resume = resolve_resume(args, base_model)
    transformers.set_seed(args.seed)
    tokenizer, vlm, image_processor, _ = load_pretrained_model(
        model_args.model_name_or_path, model_args.model_base, device=str(args.device), dtype=_dtype(args)
    )
    tokenizer.model_max_length = args.model_max_length
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
    )
    logger.warning(
        "training the LPM on %d of %d samples (fraction %s, seed %d%s)", len(dataset), dataset.total_entries,
        data_args.data_fraction, data_seed, f", {dataset.num_skipped} skipped: image missing" if dataset.num_skipped else "",
    )  # fmt: skip
    lpm = LearnablePruningModule(vlm.config.vision_config.hidden_size, args.lpm_hidden)
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
        "data_path": str(Path(data_args.data_path).resolve()),
        "data_fraction": data_args.data_fraction,
        "data_seed": data_seed,
    }
    trainer = LPMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id),
        lpm_metadata=metadata,
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


if __name__ == "__main__":
    train()
