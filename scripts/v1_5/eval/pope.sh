#!/bin/bash
# POPE (COCO random/popular/adversarial): mean F1. Usage: bash scripts/v1_5/eval/pope.sh [CKPT] [METHOD] [BUDGET] [LPM]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SPLIT="llava_pope_test"
DIR="$EVAL_ROOT/pope"
RUN_DIR="$DIR/answers/$SPLIT/$RUN"

run_chunks llava.eval.model_vqa_loader "$RUN_DIR" \
    --question-file "$DIR/$SPLIT.jsonl" \
    --image-folder "$DIR/val2014"

score "$RUN_DIR" llava.eval.eval_pope \
    --annotation-dir "$DIR/coco" \
    --question-file "$DIR/$SPLIT.jsonl" \
    --result-file "$RUN_DIR/merge.jsonl"
