"""Full-model training of a (small) LLaVA: vision tower + projector + LLM, beside the LPM mode.

    python -m llava.train.train_full --model_name_or_path checkpoints/toy-init \
        --data_path playground/data/toy/train.json --image_folder playground/data/toy/images \
        --output_dir checkpoints/toy-llava [--epochs 6] [--batch_size 32] [--lr 1e-3] [--bf16]

The data path is the LPM mode's (:mod:`llava.train.data`): LLaVA-665K conversations, the ``v1``
(vicuna_v1) template, the loss on the assistant answers and their ``</s>`` only. Every parameter trains
(``--freeze_vision`` keeps the tower fixed). Because the toy data set is small, samples are tokenised and
their images processed once (by the same ``LazySupervisedDataset``, whose image pre-pass reports all bad
images together: ``--check_images``, ``--skip_missing_images``) and kept in memory in bf16; each epoch
reshuffles them. ``--bf16`` trains under bf16 autocast with eager attention, the fast choice on CPU
(``../shared/SPEC.md`` §5); the model is saved in fp32 with ``sdpa`` for inference, in HF format
(``save_pretrained``) with its tokenizer and image processor, so ``load_pretrained_model`` reads it.

AdamW, linear warm-up then cosine decay to 10% of ``--lr``; ``--max_steps`` caps a run (smoke tests). With
``--time_budget_min`` the schedule runs on whichever is further along, steps or wall-clock time, and the
run stops when the time is up, so a slower machine trains fewer steps but still ends on a decayed lr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch.utils.data import DataLoader

from llava.constants import IGNORE_INDEX
from llava.model.builder import load_pretrained_model
from llava.train.data import LAYOUT_KEYS, DataCollatorForSupervisedDataset, LazySupervisedDataset


def _bool(text: str) -> bool:
    """``True``/``False`` (any case, or 1/0, yes/no), as ``train_lpm``'s HfArgumentParser reads booleans."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", required=True, help="initial checkpoint (e.g. the vision-pretrained toy init)")
    p.add_argument("--data_path", required=True, help="LLaVA-665K-style JSON")
    p.add_argument("--image_folder", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--version", default="v1", help="conversation template (v1 = vicuna_v1)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vision_lr", type=float, default=None, help="lr of the vision tower (default: --lr)")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_ratio", type=float, default=0.03)
    p.add_argument("--data_fraction", type=float, default=1.0)
    p.add_argument("--check_images", type=_bool, default=True, metavar="True|False",
                   help="decode every image before training and report all bad ones together (default True); "
                   "False only checks that the files exist")
    p.add_argument("--skip_missing_images", type=_bool, nargs="?", const=True, default=False, metavar="True|False",
                   help="drop samples whose image is missing or cannot be decoded (counted in the log) instead "
                   "of stopping")
    p.add_argument("--freeze_vision", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast + eager attention (training only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=None,
                   help="at most this many torch threads (default: all cores; fewer while other processes are busy)")
    p.add_argument("--logging_steps", type=int, default=50)
    p.add_argument("--preprocess_workers", type=int, default=2)
    p.add_argument("--time_budget_min", type=float, default=None,
                   help="stop (and save) after this many minutes of training, whatever --epochs says")
    return p


VISUAL_KEYS = ("pixel_values", "pixel_values_videos")


def _pack(items: list[dict]) -> tuple[list[dict], dict]:
    """Worker side: token lists plus ONE bf16 tensor per visual key and chunk, the samples' tensors concatenated
    along their first axis (one shared file descriptor, not one per sample, which would exhaust the descriptor
    limit; the first axis may differ between samples: Qwen2.5-VL's patch count, NeXT's crops)."""
    texts = [{"input_ids": x["input_ids"].tolist(), "labels": x["labels"].tolist(), "id": x["id"],
              "visual": next((k for k in VISUAL_KEYS if k in x), None),
              "layout": {k: x[k].tolist() for k in LAYOUT_KEYS if k in x}} for x in items]  # image_grid_thw, ...
    stacks = {}
    for key in VISUAL_KEYS:  # per sample: image [3, H, W] (Qwen2.5-VL: [P_i, C*T*p*p]); Video-LLaVA [F, 3, H, W]
        rows = [x[key].to(torch.bfloat16) for x in items if key in x]
        stacks[key] = (torch.cat(rows), [len(r) for r in rows]) if rows else None
    return texts, stacks


def cache_dataset(dataset: LazySupervisedDataset, workers: int) -> list[dict]:
    """Every item of the dataset once (tokenised, image processed), images kept in bf16."""
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=_pack)
    out = []
    for texts, stacks in loader:
        parts = {k: iter(v[0].split(v[1])) for k, v in stacks.items() if v is not None}
        for t in texts:
            item = {"input_ids": torch.tensor(t["input_ids"]), "labels": torch.tensor(t["labels"]), "id": t["id"],
                    **{k: torch.tensor(v) for k, v in t["layout"].items()}}
            if t["visual"] is not None:
                item[t["visual"]] = next(parts[t["visual"]])
            out.append(item)
    return out


def vision_encoder_parameters(inner) -> list[torch.nn.Parameter]:
    """The vision encoder's parameters, not the projector's: the CLIP tower(s) of LLaVA / NeXT / Video-LLaVA, and
    Qwen2.5-VL's ViT without its merger (the merger is Qwen's projector and trains with the LLM)."""
    towers = [getattr(inner, name) for name in ("vision_tower", "image_tower", "video_tower") if hasattr(inner, name)]
    params = [p for tower in towers for p in tower.parameters()]
    visual = getattr(inner, "visual", None)
    if visual is not None:
        merger = {id(p) for p in visual.merger.parameters()}
        params += [p for p in visual.parameters() if id(p) not in merger]
    return params


def answer_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) over supervised next-token positions."""
    pred = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    mask = gold != IGNORE_INDEX
    return int((pred[mask] == gold[mask]).sum()), int(mask.sum())


def train(args: argparse.Namespace) -> dict:
    from llava.train.threads import AdaptiveThreads

    threads = AdaptiveThreads(args.num_threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    attn = "eager" if args.bf16 else "sdpa"
    tokenizer, model, processor, _ = load_pretrained_model(args.model_name_or_path, device="cpu", dtype="float32",
                                                           attn_implementation=attn)
    dataset = LazySupervisedDataset(args.data_path, tokenizer, processor, num_image_tokens=model.num_image_tokens,
                                    image_token_id=model.config.image_token_id, image_folder=args.image_folder,
                                    conv_mode=args.version, data_fraction=args.data_fraction, data_seed=args.seed,
                                    model_config=model.config, check_images=args.check_images,
                                    skip_missing_images=args.skip_missing_images,
                                    image_token_counts=getattr(model, "image_token_counts", None),
                                    video_token_counts=getattr(model, "video_token_counts", None))
    if dataset.num_skipped:
        print(f"[train_full] skipped {dataset.num_skipped} samples: image missing ({dataset.num_missing}) "
              f"or undecodable ({dataset.num_unreadable})", flush=True)
    items = cache_dataset(dataset, args.preprocess_workers)
    print(f"[train_full] {len(items)} samples tokenised and processed in {time.time() - t0:.0f}s", flush=True)
    if not items:
        raise SystemExit(f"[train_full] {args.data_path} has no training samples; nothing to train on")
    if len(items) < args.batch_size:
        # the loop drops the last partial batch, so a smaller set would never yield a step
        print(f"[train_full] only {len(items)} samples (< --batch_size {args.batch_size}); "
              f"using batch size {len(items)}", flush=True)
        args.batch_size = len(items)
    collate = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)
    vision = vision_encoder_parameters(model.model)
    if args.freeze_vision:
        for p in vision:
            p.requires_grad_(False)
    vision = [p for p in vision if p.requires_grad]
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in vision_ids]
    groups = [{"params": rest, "lr": args.lr}]
    if vision:
        groups.append({"params": vision, "lr": args.vision_lr or args.lr})
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, len(items) // args.batch_size)
    steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = max(1, round(args.warmup_ratio * steps))
    budget_s = 60 * args.time_budget_min if args.time_budget_min is not None else None
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]

    def set_lr(step: int, elapsed: float) -> float:
        """Warm-up, then cosine to 10%; progress is the larger of step/steps and elapsed/time budget."""
        progress = min(1.0, max(step / steps, elapsed / budget_s if budget_s else 0.0))
        factor = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor * args.lr
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    step, seen, t1 = 0, 0, time.time()
    loss_sum, correct, total, n_logged = 0.0, 0, 0, 0
    history = []
    stop = False
    while step < steps and not stop:
        order = torch.randperm(len(items), generator=gen).tolist()
        for b in range(0, len(order) - args.batch_size + 1, args.batch_size):
            lr = set_lr(step, time.time() - t1)
            batch = collate([items[i] for i in order[b:b + args.batch_size]])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                out = model(**batch)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 5 == 0:
                threads.update()
            seen += len(batch["input_ids"])
            c, n = answer_token_accuracy(out.logits.detach(), batch["labels"])
            loss_sum, correct, total, n_logged = loss_sum + out.loss.item(), correct + c, total + n, n_logged + 1
            elapsed = time.time() - t1
            if step % args.logging_steps == 0 or step == steps:
                rec = {"step": step, "epoch": round(seen / len(items), 3), "loss": round(loss_sum / n_logged, 4),
                       "answer_token_acc": round(correct / max(1, total), 4), "lr": lr,
                       "samples_per_s": round(seen / elapsed, 1), "minutes": round(elapsed / 60, 2),
                       "threads": torch.get_num_threads()}
                history.append(rec)
                print("[train_full] " + json.dumps(rec), flush=True)
                loss_sum, correct, total, n_logged = 0.0, 0, 0, 0
            if step >= steps:
                break
            if args.time_budget_min is not None and elapsed > 60 * args.time_budget_min:
                print(f"[train_full] time budget of {args.time_budget_min} min reached at step {step}", flush=True)
                stop = True
                break
    train_seconds = time.time() - t1
    model.eval()
    if args.bf16:
        model.set_attn_implementation("sdpa")
    out_dir = Path(args.output_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    summary = {"init": str(args.model_name_or_path), "data_path": str(args.data_path), "samples": len(items),
               "steps": step, "planned_steps": steps, "batch_size": args.batch_size, "lr": args.lr,
               "vision_lr": None if args.freeze_vision else (args.vision_lr or args.lr), "freeze_vision": args.freeze_vision,
               "bf16_autocast_eager": args.bf16, "time_budget_min": args.time_budget_min,
               "train_seconds": round(train_seconds, 1), "samples_per_s": round(seen / max(train_seconds, 1e-9), 1),
               "history": history}
    (out_dir / "train_full.json").write_text(json.dumps(summary, indent=1))
    print(f"[train_full] wrote {out_dir} ({step} steps, {train_seconds / 60:.1f} min, "
          f"{summary['samples_per_s']} samples/s)", flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
