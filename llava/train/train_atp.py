"""Train ATP-LLaVA's Adaptive Token Pruning modules on a LLaVA-1.5 (paper Sec. 3.3 and 4.1; SPEC §3).

    deepspeed llava/train/train_atp.py --deepspeed scripts/zero2_client_optimizer.json \\
        --model_name_or_path ./checkpoints/llava-v1.5-7b --version v1 --target_tokens 144 \\
        --data_path ./playground/data/llava_v1_5_mix665k.json --image_folder ./playground/data \\
        --output_dir ./checkpoints/llava-v1.5-7b-atp-144 --bf16 True ...

(also ``torchrun`` or ``python -m llava.train.train_atp``; see ``scripts/v1_5/finetune_atp.sh`` and
``docs/training.md``). ``L = L_ntp + λ_ATP · L_ATP + λ_target · |N̄ − N_target|`` (Eqs. 12-14;
:mod:`learnpruner_ext.training.atp_model`).

* ``--freeze_llm True`` (default; the paper's Table 3 "Frozen" row): only the ATP modules train, at
  ``--learning_rate`` (1e-4). The output folder is what ``--atp-path`` takes.
* ``--freeze_llm False --llm_tuning full|lora``: the language model trains too, at ``--llm_learning_rate`` (2e-5):
  every weight, or LoRA adapters (``peft``; ``--lora_r``, ``--lora_alpha``, ``--lora_dropout``, ``--lora_targets``).
  Checkpoints hold the ATP modules and the trained LLM part only; at the end the tuned model (LoRA merged) is also
  written as a full checkpoint to ``OUTPUT_DIR/model`` with its modules in ``model/atp/``, so
  ``--model-path OUTPUT_DIR/model --pruning-method atp`` runs it.

A run restarted with the same ``--output_dir`` resumes from its last checkpoint (``train_lpm``'s rules: refused
when :data:`RESUME_ARGS` differ, unless ``--allow_changed_args True``).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # launched as a script (deepspeed / torchrun llava/train/train_atp.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import transformers

from learnpruner_ext.atp import (
    ATP_CONFIG,
    ATP_WEIGHTS,
    HIDDEN_FEATURES,
    SCORE_NORMS,
    SELF_SCORES,
    SHIPPED_ATP_DIR,
    TEMPERATURE,
    ATPModules,
)
from learnpruner_ext.methods.atp import default_layers
from learnpruner_ext.training.atp_model import ATPTrainingModel
from learnpruner_ext.training.masked_attention import restore_attention
from llava.train.atp_trainer import ATPTrainer
from llava.train.data import DataCollatorForSupervisedDataset
from llava.train.train_lpm import (
    DataArguments,
    ModelArguments,
    data_metadata,
    finish_distributed,
    load_base,
    make_dataset,
    start_run,
)

logger = logging.getLogger("llava.train.train_atp")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    learning_rate: float = field(default=1e-4, metadata={"help": "peak lr of the ATP modules (the paper: 1e-4)"})
    llm_learning_rate: float = field(default=2e-5, metadata={"help": "peak lr of the language model when it trains "
                                     "(the paper: 2e-5)"})  # fmt: skip
    model_max_length: int = field(default=2048, metadata={"help": "longer samples are truncated"})
    target_tokens: float | None = field(default=None, metadata={"help": "N_target of Eq. 13: the average vision "
                                        "tokens per LLM layer to reach (required; e.g. 144 or 88 on LLaVA-1.5-7B)"})  # fmt: skip
    lambda_atp: float = field(default=0.05, metadata={"help": "λ_ATP of Eq. 14 (the paper: 0.01 to 0.1)"})
    lambda_target: float = field(default=0.2, metadata={"help": "λ_target of Eq. 14 (the paper: 0.2)"})
    atp_layers: str | None = field(default=None, metadata={"help": "comma-separated decoder layers the modules sit "
                                   "before (default: the paper's 4,14,24 of 32 at the same relative depth)"})  # fmt: skip
    atp_hidden: int = field(default=HIDDEN_FEATURES, metadata={"help": "width of z (Eq. 6)"})
    atp_temperature: float = field(default=TEMPERATURE, metadata={"help": "T of the soft masks (Eqs. 9-10)"})
    atp_self_score: str = field(default="attention", metadata={"help": "S_self from the attention probabilities or "
                                f"the logits (Eq. 3 as written): one of {', '.join(SELF_SCORES)} (docs/training.md)"})  # fmt: skip
    atp_score_norm: str = field(default="max", metadata={"help": "what theta_r is compared with: S_redundant divided "
                                f"by its per-sample maximum (max) or as it is (none): one of {', '.join(SCORE_NORMS)}"})  # fmt: skip
    freeze_llm: bool = field(default=True, metadata={"help": "train only the ATP modules (the paper's 'Frozen' row)"})
    llm_tuning: str = field(default="full", metadata={"help": "with --freeze_llm False: full (every LLM weight) or "
                            "lora (peft adapters)"})  # fmt: skip
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(default=LORA_TARGETS, metadata={"help": "comma-separated LLM linear layers for LoRA"})
    remove_unused_columns: bool = field(default=False)
    allow_changed_args: bool = field(default=False, metadata={"help": "resume even when the data, lrs, batch sizes, "
                                     "world size, base or ATP/loss settings differ from the checkpoint's run_args.json"})  # fmt: skip

    @property
    def train_llm(self) -> str:
        return "none" if self.freeze_llm else self.llm_tuning


RESUME_ARGS = (
    "model_name_or_path", "model_base", "version", "data_path", "image_folder", "data_fraction", "data_seed", "seed",
    "model_max_length", "learning_rate", "llm_learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "effective_batch_size",
    "target_tokens", "lambda_atp", "lambda_target", "atp_layers", "atp_hidden", "atp_temperature", "atp_self_score",
    "atp_score_norm", "freeze_llm", "llm_tuning", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
    "question_types", "exclude_question_types", "data_sources",
)  # fmt: skip


def parse_args(argv: list[str] | None = None):
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def parse_layers(spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--atp_layers must be comma-separated decoder layers, e.g. 4,14,24; got {spec!r}") from None


def check_args(args: TrainingArguments) -> None:
    """The flags that need no weights, checked before the base loads."""
    if args.target_tokens is None:
        raise ValueError("--target_tokens is required: the average vision tokens per LLM layer to train for "
                         "(N_target of Eq. 13), e.g. --target_tokens 144")  # fmt: skip
    if args.llm_tuning not in ("full", "lora"):
        raise ValueError(f"--llm_tuning must be full or lora, got {args.llm_tuning!r}")
    if args.atp_self_score not in SELF_SCORES:
        raise ValueError(f"--atp_self_score must be one of {', '.join(SELF_SCORES)}, got {args.atp_self_score!r}")
    if args.atp_score_norm not in SCORE_NORMS:
        raise ValueError(f"--atp_score_norm must be one of {', '.join(SCORE_NORMS)}, got {args.atp_score_norm!r}")
    if args.atp_score_norm == "max" and args.atp_self_score != "attention":
        raise ValueError("--atp_score_norm max needs --atp_self_score attention (logits can be negative)")
    ATPTrainingModel.check_objective(args.lambda_atp, args.lambda_target, args.target_tokens, 10**9, args.train_llm)
    if args.train_llm == "lora":
        if importlib.util.find_spec("peft") is None:
            raise ValueError("--llm_tuning lora needs peft (pip install -e '.[train]')")


def inject_lora(vlm, args: TrainingArguments) -> None:
    """LoRA adapters in the language model's linear layers (peft, in place: the model's classes stay ours)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none")  # fmt: skip
    inject_adapter_in_model(config, vlm.model.language_model)


def merge_lora(module: torch.nn.Module) -> None:
    """Fold every LoRA layer into its base linear layer and put the base layer back in its place."""
    from peft.tuners.lora import LoraLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):
            sub.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, sub.get_base_layer())


def build(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments):
    """Load the base, build data and the training module -> (trainer, resume checkpoint or None, loaded parts)."""
    check_args(args)
    record_filter, resume, current = start_run(model_args, data_args, args, RESUME_ARGS)
    tokenizer, vlm, image_processor = load_base(model_args, args)
    num_layers = vlm.config.text_config.num_hidden_layers
    layers = parse_layers(args.atp_layers) if args.atp_layers else default_layers(num_layers)
    dataset, samples = make_dataset(model_args, data_args, args, vlm, tokenizer, image_processor, record_filter,
                                    resume, what="the ATP modules")  # fmt: skip
    torch.manual_seed(args.seed)  # the modules' init from --seed alone (see train_lpm)
    atp = ATPModules(layers, vlm.num_vision_tokens, args.atp_hidden, args.atp_temperature, num_layers=num_layers,
                     target_tokens=args.target_tokens, self_score=args.atp_self_score,
                     score_norm=args.atp_score_norm).to(args.device)  # fmt: skip
    if args.train_llm == "lora":
        inject_lora(vlm, args)
    model = ATPTrainingModel(vlm, atp, args.lambda_atp, args.lambda_target, args.target_tokens, args.train_llm)
    metadata = {
        "base_model": str(Path(model_args.model_name_or_path).resolve()),
        "conv_version": model_args.version,
        "lambda_atp": args.lambda_atp,
        "lambda_target": args.lambda_target,
        "llm": {"none": "frozen", "full": "full fine-tune", "lora": "LoRA"}[args.train_llm],
        **({"lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                     "targets": args.lora_targets}} if args.train_llm == "lora" else {}),  # fmt: skip
        **data_metadata(data_args, args, record_filter),
    }
    trainer = ATPTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id),
        lpm_metadata=metadata,
        run_args={**current, **samples},
    )
    return trainer, resume, (tokenizer, image_processor)


def write_tuned_model(trainer: ATPTrainer, tokenizer, image_processor, out: Path) -> None:
    """A trained LLM: the tuned model (LoRA merged) as a full checkpoint at ``out``, its ATP modules in ``atp/``."""
    model = trainer.training_model
    vlm = model.vlm
    restore_attention(vlm, model.previous_attn_implementation)
    if model.train_llm == "lora":
        merge_lora(vlm.model.language_model)
    vlm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / SHIPPED_ATP_DIR).mkdir(parents=True, exist_ok=True)
    for name in (ATP_WEIGHTS, ATP_CONFIG):
        shutil.copy(Path(trainer.args.output_dir) / name, out / SHIPPED_ATP_DIR / name)


def train(argv: list[str] | None = None) -> ATPTrainer:
    """Parse, build, train, write the final modules; configuration and data errors exit with ``error: ...``."""
    try:
        trainer, resume, (tokenizer, image_processor) = build(*parse_args(argv))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    args = trainer.args
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    if args.should_save:
        logger.warning("wrote the trained ATP modules to %s", args.output_dir)
        if args.train_llm != "none":
            write_tuned_model(trainer, tokenizer, image_processor, Path(args.output_dir) / "model")
            logger.warning("wrote the tuned model with its ATP modules to %s/model", args.output_dir)
    return trainer


if __name__ == "__main__":
    train()
    finish_distributed()
