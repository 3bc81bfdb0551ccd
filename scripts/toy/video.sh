#!/usr/bin/env bash
# The toy video table (issue 18): 8-frame clips whose questions need time (toyworld.video) -> a toy Video-LLaVA
# initialised from the trained toy LLaVA (toyworld.video_base: both towers = its tower) -> video QA training of the
# projector + LLM (llava.train.train_full, towers frozen) -> every method at 22% and 11% of the 8 x 144 = 1152 patch
# tokens (the paper's 456/2048 and 228/2048: T = 256, 128) through llava.eval.model_video_qa -> the table
# (toyworld.video_table: accuracy per question type, paired-bootstrap intervals against the unpruned base).
#
#   bash scripts/toy/video.sh            # see docs/results_toy.md for the run's time on 2 CPU cores
#
# Environment (defaults in brackets): WORK [outputs/toy_video], IMAGE_MODEL [checkpoints/toy-llava] (its lpm/ is the
# LPM: the frozen towers give the LPM exactly the features it was trained on), NUM_TRAIN [2000] clips of 3 QA turns,
# NUM_TEST [300], EPOCHS [6], MINUTES [35] (time cap of training), LR [5e-4], METHODS, BUDGETS [256,128],
# VIDEO_STAGE1 [joint], SMOKE_STEPS (tiny step count, for tests), START_AT [1] (skip earlier stages).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/toy/common.sh
source "$ROOT/scripts/toy/common.sh"
WORK="${WORK:-outputs/toy_video}"; IMAGE_MODEL="${IMAGE_MODEL:-checkpoints/toy-llava}"
NUM_TRAIN="${NUM_TRAIN:-2000}"; NUM_TEST="${NUM_TEST:-300}"; SEED="${SEED:-0}"
EPOCHS="${EPOCHS:-6}"; MINUTES="${MINUTES:-35}"; LR="${LR:-5e-4}"
METHODS="${METHODS:-none,learnpruner,fastv,vispruner,visionzip,random}"; BUDGETS="${BUDGETS:-256,128}"
VIDEO_STAGE1="${VIDEO_STAGE1:-joint}"; START_AT="${START_AT:-1}"
DATA="$WORK/data"; MODEL="$WORK/model"
mkdir -p "$WORK"
t0=$(date +%s)
stamp() { echo "[toy_video] $1 ($(( $(date +%s) - t0 )) s elapsed)"; }
want() { [ "$1" -ge "$START_AT" ]; }
STEPS=(); [ -n "${SMOKE_STEPS:-}" ] && STEPS=(--max_steps "$SMOKE_STEPS")

if want 1; then
  stamp "1/4 generate $NUM_TRAIN training and $NUM_TEST test clips -> $DATA"
  "$PY" -m toyworld.video --out "$DATA" --num-train "$NUM_TRAIN" --num-test "$NUM_TEST" --seed "$SEED"
fi
if want 2; then
  stamp "2/4 toy Video-LLaVA from $IMAGE_MODEL, then video QA training (towers frozen, fp32)"
  rm -rf "$WORK/init" "$MODEL"
  "$PY" -m toyworld.video_base --image-model "$IMAGE_MODEL" --out "$WORK/init"
  "$PY" -m llava.train.train_full --model_name_or_path "$WORK/init" --data_path "$DATA/train.json" --image_folder "$DATA" \
    --output_dir "$MODEL" --epochs "$EPOCHS" --batch_size 8 --lr "$LR" --time_budget_min "$MINUTES" --freeze_vision \
    --seed "$SEED" --logging_steps 25 ${STEPS[@]+"${STEPS[@]}"}
  cp -r "$IMAGE_MODEL/lpm" "$MODEL/lpm"
fi
if want 3; then
  stamp "3/4 answers: $METHODS at T = $BUDGETS (video stage 1: $VIDEO_STAGE1)"
  IFS=',' read -r -a methods <<< "$METHODS"; IFS=',' read -r -a budgets <<< "$BUDGETS"
  for m in "${methods[@]}"; do
    for b in $([ "$m" = none ] && echo full || echo "${budgets[@]}"); do
      out="$WORK/answers/$m-$b.jsonl"
      args=(--pruning-method "$m"); [ "$b" != full ] && args+=(--visual-token-budget "$b" --video-stage1 "$VIDEO_STAGE1")
      # FastV's average over all 4 toy layers needs T >= K*N/L = 580: count only the layers after K, as the image table
      [ "$m" = fastv ] && args+=(--method-option budget_mode=after_layer)
      "$PY" -m llava.eval.model_video_qa --model-path "$MODEL" --video-dir "$DATA/videos" \
        --gt-file-question "$DATA/test_q.json" --gt-file-answers "$DATA/test_a.json" --answers-file "$out" \
        --max_new_tokens 8 --batch-size 16 --device cpu --no-progress "${args[@]}"
    done
  done
fi
if want 4; then
  stamp "4/4 table"
  "$PY" -m toyworld.video_table --answers "$DATA/test_a.json" --vanilla "$WORK/answers/none-full.jsonl" \
    --runs "$WORK"/answers/*.jsonl --out "$WORK/table.md"
fi
stamp "done"
