#!/usr/bin/env bash
# LPM cross-task generalisation on the toy world (issue 21): LPMs trained on the frozen toy base with the
# question types of one group only (toyworld.cross_task.GROUPS: attributes / layout) and on all types, each for
# the same number of steps on the same image pool, then LearnPruner with each LPM at one budget on the 1000 test
# questions; the matrix is trained-on x evaluated-on RelAcc (toyworld.cross_task).
#
#   bash scripts/toy/cross_task.sh        # ~30 min on 2 CPU cores; matrix in $WORK/matrix.md
#
# Environment variables (defaults in brackets):
#   MODEL [checkpoints/toy-llava]   WORK [outputs/cross_task]   BUDGET [16]
#   NUM_TRAIN [12000] training images drawn (the first NUM_TRAIN of the base's 60,000: same seed, same images)
#   LPM_STEPS [375] LPM_BATCH [16] (the shipped LPM's recipe: 375 steps x 16 = 6,000 conversations)
#   PRECISION [bf16 on a CPU with native bf16, else "--bf16 False" = fp32]
#   SMOKE_STEPS (if set: tiny step counts and 40 test questions, for tests)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/toy/common.sh
source "$ROOT/scripts/toy/common.sh"
MODEL="${MODEL:-checkpoints/toy-llava}"
WORK="${WORK:-outputs/cross_task}"
BUDGET="${BUDGET:-16}"
NUM_TRAIN="${NUM_TRAIN:-12000}"
LPM_STEPS="${LPM_STEPS:-375}"; LPM_BATCH="${LPM_BATCH:-16}"
NUM_TEST=1000
if [ -n "${SMOKE_STEPS:-}" ]; then LPM_STEPS="$SMOKE_STEPS"; LPM_BATCH=4; fi
DATA="$WORK/data/toy"
t0=$(date +%s)
stamp() { echo "[cross_task] $1 ($(( $(date +%s) - t0 )) s elapsed)"; }

if [ ! -f "$DATA/train.json" ]; then
  stamp "generate $NUM_TRAIN training images (with question_type per turn) + the $NUM_TEST test questions -> $DATA"
  "$PY" -m toyworld.generate --out "$DATA" --seed 0 --num-train "$NUM_TRAIN" --num-test "$NUM_TEST" > /dev/null
fi
if [ -n "${SMOKE_STEPS:-}" ]; then  # keep the first 40 test questions
  "$PY" - "$DATA" <<'PYEOF'
import sys
for name in ("test_questions.jsonl", "test_answers.jsonl"):
    path = f"{sys.argv[1]}/{name}"
    lines = open(path).read().splitlines(keepends=True)[:40]
    open(path, "w").writelines(lines)
PYEOF
fi
GROUP_TYPES() { "$PY" -c "from toyworld.cross_task import GROUPS; print(','.join(GROUPS['$1']))"; }
GROUPS_ALL="all $("$PY" -c "from toyworld.cross_task import GROUPS; print(' '.join(GROUPS))")"

port=29531
for g in $GROUPS_ALL; do
  out="$WORK/lpm_$g"
  if [ -f "$out/lpm.safetensors" ]; then stamp "LPM $g: done before, kept"; continue; fi
  types=""; [ "$g" = all ] || types="$(GROUP_TYPES "$g")"
  stamp "LPM trained on ${types:-every type} ($LPM_STEPS steps x $LPM_BATCH) -> $out"
  DS_ACCELERATOR=cpu OMP_NUM_THREADS="$THREADS" NUM_GPUS=1 GLOBAL_BATCH="$LPM_BATCH" PER_DEVICE_BATCH="$LPM_BATCH" \
    IMAGES="$DATA/images" DATA="$DATA/train.json" DATA_FRACTION=1.0 MASTER_PORT="$port" QUESTION_TYPES="$types" \
    EXTRA_ARGS="--use_cpu True --dataloader_num_workers 0 --save_steps 100000 --logging_steps 25 --gradient_checkpointing False --max_steps $LPM_STEPS $PRECISION" \
    bash scripts/v1_5/finetune_lpm.sh "$MODEL" "$out" > "$WORK/lpm_$g.log" 2>&1 || { tail -20 "$WORK/lpm_$g.log"; exit 1; }
  port=$((port + 1))
done

SWEEP=(--model-path "$MODEL" --benchmarks toy --eval-root "$WORK/data" --batch-size 50 --max-new-tokens 4 --device cpu --no-progress)
if [ ! -f "$WORK/sweep_none/results.json" ]; then
  stamp "unpruned answers"
  "$PY" -m llava.eval.sweep "${SWEEP[@]}" --methods none --out "$WORK/sweep_none" > "$WORK/sweep_none.log" 2>&1
fi
args=()
for g in $GROUPS_ALL; do
  if [ ! -f "$WORK/sweep_$g/results.json" ]; then
    stamp "LearnPruner with LPM $g at T=$BUDGET"
    "$PY" -m llava.eval.sweep "${SWEEP[@]}" --methods learnpruner --budgets "$BUDGET" --lpm-path "$WORK/lpm_$g" \
      --out "$WORK/sweep_$g" > "$WORK/sweep_$g.log" 2>&1
  fi
  args+=(--lpm "$g=$(ls "$WORK"/sweep_"$g"/answers/toy/*/*.jsonl | head -1)")
done
"$PY" -m toyworld.cross_task --answer-key "$DATA/test_answers.jsonl" --budget "$BUDGET" \
  --vanilla "$(ls "$WORK"/sweep_none/answers/toy/*/*.jsonl | head -1)" "${args[@]}" --out "$WORK/matrix.md"
stamp "done: $WORK/matrix.md"
