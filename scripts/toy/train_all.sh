#!/usr/bin/env bash
# Regenerate the whole toy world from scratch: data -> vision pretraining -> VQA training of the base
# (main stage, then a focus phase on left/right position) ->
# LPM training (finetune_lpm) -> every method x budgets 32/16/8 through the real eval code -> table,
# plots and the kept-patches figure. Results: docs/results_toy.md describes a run of exactly this.
#
#   bash scripts/toy/train_all.sh            # ~118 min on 2 CPU cores, ~15 GB RAM (docs/results_toy.md)
#   bash scripts/toy/train_all.sh --family qwen2_5_vl   # the Qwen2.5-VL-shaped toy (docs/results_toy.md)
#
# --family llava (default) or qwen2_5_vl. The Qwen toy (toyworld.pretrain_vision: 64 merged tokens per image)
# differs in its defaults: OUT_MODEL checkpoints/toy-qwen2.5-vl, WORK outputs/toy_qwen, budgets 21,14,7 (the
# shares of Table 4's 426/284/142 of 1280), fp32 vision pretraining (faster than bf16 for its windowed ViT here),
# VQA_FRACTION 0.5 (its cached patches take twice the memory of LLaVA's images), PRETRAIN_EPOCHS 4, VQA_MINUTES 50, no focus phase
# (stage 4 copies the VQA output: M-RoPE's 2D positions leave no left/right gap to fix), no kept-patches figure.
#
# Environment variables (defaults in brackets):
#   OUT_MODEL   where the trained base goes [checkpoints/toy-llava]; its LPM goes to OUT_MODEL/lpm
#   DATA_ROOT   eval root; the data goes to DATA_ROOT/toy [playground/data]
#   WORK        intermediate outputs (vision-pretrained init, sweeps) [outputs/toy]
#   NUM_TRAIN [60000]  NUM_TEST [1000]  SEED [0]
#   PRETRAIN_EPOCHS [4]  VQA_EPOCHS [12]  VQA_MINUTES [80] (time cap of the VQA stage)  VQA_FRACTION [1.0]
#   FOCUS_BASE [20000] (full-mix conversations in focus phase (b), beside the left/right position turns)
#   LPM_FRACTION [0.1] (share of train.json for the LPM, as the paper: 10% of 665K)  LPM_BATCH [16]
#   METHODS [all registered]  BUDGETS [32,16,8]  SMOKE_STEPS (if set: tiny step counts, for tests)
#   START_AT [1]  skip the stages before this one (e.g. START_AT=5 re-trains only the LPM and re-evaluates)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
FAMILY=llava
while [ $# -gt 0 ]; do
  case "$1" in
    --family) FAMILY="${2:-}"; shift 2 ;;
    --family=*) FAMILY="${1#--family=}"; shift ;;
    *) echo "error: unknown argument '$1' (usage: bash scripts/toy/train_all.sh [--family llava|qwen2_5_vl])" >&2; exit 2 ;;
  esac
done
case "$FAMILY" in
  llava) PRE_ARGS=(); CONV=v1 ;;
  qwen2_5_vl)
    PRE_ARGS=(--no-bf16); CONV=qwen2_5_vl
    OUT_MODEL="${OUT_MODEL:-checkpoints/toy-qwen2.5-vl}"; WORK="${WORK:-outputs/toy_qwen}"; BUDGETS="${BUDGETS:-21,14,7}"
    PRETRAIN_EPOCHS="${PRETRAIN_EPOCHS:-4}"; VQA_MINUTES="${VQA_MINUTES:-50}"; VQA_FRACTION="${VQA_FRACTION:-0.5}" ;;
  *) echo "error: --family must be llava or qwen2_5_vl, got '$FAMILY'" >&2; exit 2 ;;
esac
# shellcheck source=scripts/toy/common.sh
source "$ROOT/scripts/toy/common.sh"
OUT_MODEL="${OUT_MODEL:-checkpoints/toy-llava}"
DATA_ROOT="${DATA_ROOT:-playground/data}"
TOY_DATA="$DATA_ROOT/toy"
WORK="${WORK:-outputs/toy}"
NUM_TRAIN="${NUM_TRAIN:-60000}"; NUM_TEST="${NUM_TEST:-1000}"; SEED="${SEED:-0}"
PRETRAIN_EPOCHS="${PRETRAIN_EPOCHS:-4}"; VQA_EPOCHS="${VQA_EPOCHS:-12}"; VQA_MINUTES="${VQA_MINUTES:-80}"
VQA_FRACTION="${VQA_FRACTION:-1.0}"
FOCUS_BASE="${FOCUS_BASE:-20000}"
LPM_FRACTION="${LPM_FRACTION:-0.1}"; LPM_BATCH="${LPM_BATCH:-16}"
METHODS="${METHODS:-none,learnpruner,vispruner,fastv,visionzip,divprune,dart,random,cls,downsample,pyramiddrop}"
BUDGETS="${BUDGETS:-32,16,8}"
mkdir -p "$WORK"
t0=$(date +%s)
stamp() { echo "[train_all] $1 ($(( $(date +%s) - t0 )) s elapsed)"; }
START_AT="${START_AT:-1}"
want() { [ "$1" -ge "$START_AT" ]; }

# VQA training of the base (projector + LLM; the pretrained vision tower stays frozen), fresh output folder:
#   train_vqa INIT_MODEL DATA_JSON OUT_DIR EPOCHS LR MINUTES
train_vqa() {
  rm -rf "$3"
  "$PY" -m llava.train.train_full --model_name_or_path "$1" --data_path "$2" --image_folder "$TOY_DATA/images" \
    --output_dir "$3" --epochs "$4" --batch_size 8 --lr "$5" --time_budget_min "$6" --version "$CONV" \
    --data_fraction "${7:-1.0}" --freeze_vision --bf16 --num_threads "$THREADS" --seed "$SEED" ${VQA_STEPS[@]+"${VQA_STEPS[@]}"}
}

PRE_STEPS=(); VQA_STEPS=(); LPM_STEPS=""
if [ -n "${SMOKE_STEPS:-}" ]; then
  PRE_STEPS=(--max-steps "$SMOKE_STEPS" --batch-size 8)
  VQA_STEPS=(--max_steps "$SMOKE_STEPS" --batch_size 8)
  LPM_STEPS="--max_steps $SMOKE_STEPS"; LPM_BATCH=8; FOCUS_BASE=$(( NUM_TRAIN / 2 ))
fi

if want 1; then
stamp "1/7 generate $NUM_TRAIN train + $NUM_TEST test images -> $TOY_DATA"
"$PY" -m toyworld.generate --out "$TOY_DATA" --seed "$SEED" --num-train "$NUM_TRAIN" --num-test "$NUM_TEST"
fi
if want 2; then
stamp "2/7 vision pretraining of the $FAMILY toy (per-token colour/shape/centre/background/label/glyph/position) -> $WORK/init"
"$PY" -m toyworld.pretrain_vision --family "$FAMILY" --data "$TOY_DATA" --out "$WORK/init" --epochs "$PRETRAIN_EPOCHS" ${PRE_ARGS[@]+"${PRE_ARGS[@]}"} \
  --batch-size 64 --lr 2e-3 --text-layers 4 --seed "$SEED" --num-threads "$THREADS" ${PRE_STEPS[@]+"${PRE_STEPS[@]}"}
fi
if want 3; then
stamp "3/7 VQA training (projector + LLM; the pretrained vision tower stays frozen) -> $WORK/vqa"
train_vqa "$WORK/init" "$TOY_DATA/train.json" "$WORK/vqa" "$VQA_EPOCHS" 5e-4 "$VQA_MINUTES" "$VQA_FRACTION"
fi
if want 4 && [ "$FAMILY" != llava ]; then
stamp "4/7 no focus phase for $FAMILY: $WORK/vqa -> $OUT_MODEL"
rm -rf "$OUT_MODEL"; mkdir -p "$(dirname "$OUT_MODEL")"; cp -r "$WORK/vqa" "$OUT_MODEL"
elif want 4; then
# Left/right position is the one skill the main stage leaves at chance (docs/results_toy.md), and mixing
# extra position turns into the full mix did not teach it in 11 minutes. So: (a) two epochs on the
# left/right turns alone, which learns it but makes the base answer "left"/"right" to everything, then
# (b) one epoch on a sample of the full mix plus those turns again, which brings the other types back.
stamp "4/7 focus phase (a): left/right position turns only -> $WORK/focus_a"
"$PY" -m toyworld.focus_mix --data "$TOY_DATA/train.json" --types position --question-regex left \
  --base-samples 0 --seed "$SEED" --out "$WORK/train_focus_a.json"
train_vqa "$WORK/vqa" "$WORK/train_focus_a.json" "$WORK/focus_a" 2 3e-4 10
stamp "4/7 focus phase (b): $FOCUS_BASE full-mix conversations + the left/right turns -> $OUT_MODEL"
"$PY" -m toyworld.focus_mix --data "$TOY_DATA/train.json" --types position --question-regex left \
  --base-samples "$FOCUS_BASE" --seed "$SEED" --out "$WORK/train_focus_b.json"
train_vqa "$WORK/focus_a" "$WORK/train_focus_b.json" "$OUT_MODEL" 1 2e-4 15
fi
if want 5; then
stamp "5/7 LPM training on the frozen base (finetune_lpm: lambda_p=1, tau=0, fraction $LPM_FRACTION) -> $OUT_MODEL/lpm"
rm -rf "$WORK/lpm"
DS_ACCELERATOR=cpu OMP_NUM_THREADS="$THREADS" NUM_GPUS=1 GLOBAL_BATCH="$LPM_BATCH" PER_DEVICE_BATCH="$LPM_BATCH" \
  DATA="$TOY_DATA/train.json" IMAGES="$TOY_DATA/images" DATA_FRACTION="$LPM_FRACTION" MASTER_PORT="${MASTER_PORT:-29517}" \
  EXTRA_ARGS="--use_cpu True --dataloader_num_workers 0 --save_steps 100000 --logging_steps 20 --gradient_checkpointing False $LPM_STEPS" \
  bash scripts/v1_5/finetune_lpm.sh "$OUT_MODEL" "$WORK/lpm"
mkdir -p "$OUT_MODEL/lpm"
cp "$WORK/lpm/lpm.safetensors" "$WORK/lpm/lpm_config.json" "$OUT_MODEL/lpm/"
# make the shipped config machine-independent (the absolute paths are informative only)
"$PY" - "$OUT_MODEL/lpm/lpm_config.json" "$OUT_MODEL" "$TOY_DATA/train.json" <<'PYEOF'
import json, sys
path, base, data = sys.argv[1:]
cfg = json.load(open(path))
cfg.update(base_model=base, data_path=data)
json.dump(cfg, open(path, "w"), indent=2)
PYEOF
fi
if want 6; then
stamp "6/7 sweep: $METHODS x $BUDGETS on the toy test split"
rm -rf "$WORK/sweep" "$WORK/sweep_after_layer"
"$PY" -m llava.eval.sweep --model-path "$OUT_MODEL" --methods "$METHODS" --budgets "$BUDGETS" --benchmarks toy \
  --eval-root "$DATA_ROOT" --out "$WORK/sweep" --batch-size 50 --max-new-tokens 4 --device cpu --no-progress
# FastV / DART also under their own papers' convention (tokens after layer K), labelled separately
"$PY" -m llava.eval.sweep --model-path "$OUT_MODEL" --methods fastv,dart --budgets "$BUDGETS" --benchmarks toy \
  --eval-root "$DATA_ROOT" --out "$WORK/sweep_after_layer" --batch-size 50 --max-new-tokens 4 --device cpu \
  --method-option budget_mode=after_layer --no-progress > /dev/null
fi
if want 7; then
stamp "7/7 report: table, plots (LLaVA: and the kept-patches figure)"
FIGURE=()
if [ "$FAMILY" = llava ]; then FIGURE=(--figure-model "$OUT_MODEL" --data "$TOY_DATA"); fi
"$PY" -m toyworld.report --sweep "$WORK/sweep" --after-layer "$WORK/sweep_after_layer" --answer-key "$TOY_DATA/test_answers.jsonl" \
  ${FIGURE[@]+"${FIGURE[@]}"}
fi
stamp "done: $WORK/sweep/table_toy.md, $WORK/sweep/accuracy_vs_budget.png, $WORK/sweep/accuracy_by_type.png$([ "$FAMILY" = llava ] && echo ", $WORK/sweep/kept_patches.png")"

