#!/bin/bash
# GQA testdev-balanced: accuracy. Usage: bash scripts/v1_5/eval/gqa.sh [CKPT] [METHOD] [BUDGET] [LPM] (see _common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SPLIT="${SPLIT:-llava_gqa_testdev_balanced}"
GQADIR="$EVAL_ROOT/gqa"
RUN_DIR="$GQADIR/answers/$SPLIT/$RUN"

run_chunks llava.eval.model_vqa_loader "$RUN_DIR" \
    --question-file "$GQADIR/$SPLIT.jsonl" \
    --image-folder "$GQADIR/data/images"

score "$RUN_DIR" llava.eval.eval_gqa \
    --question-file "$GQADIR/data/testdev_balanced_questions.json" \
    --result-file "$RUN_DIR/merge.jsonl" \
    --predictions-out "$RUN_DIR/testdev_balanced_predictions.json"
