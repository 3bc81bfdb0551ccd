#!/bin/bash
# VQAv2 test-dev: writes the EvalAI submission file (scored by the server). Set VQAV2_ANNOTATION to a
# VQA annotation json covering the answered questions (e.g. with SPLIT=<your val split>) to also score locally.
# Usage: bash scripts/v1_5/eval/vqav2.sh [CKPT] [METHOD] [BUDGET] [LPM]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SPLIT="${SPLIT:-llava_vqav2_mscoco_test-dev2015}"
DIR="$EVAL_ROOT/vqav2"
RUN_DIR="$DIR/answers/$SPLIT/$RUN"

run_chunks llava.eval.model_vqa_loader "$RUN_DIR" \
    --question-file "$DIR/$SPLIT.jsonl" \
    --image-folder "$DIR/test2015"

# EvalAI wants every test2015 question (unanswered ones get ""), so use the full question file if present.
QUESTIONS="$DIR/llava_vqav2_mscoco_test2015.jsonl"
if [ ! -f "$QUESTIONS" ]; then QUESTIONS="$DIR/$SPLIT.jsonl"; fi
SCORE_ARGS=(--question-file "$QUESTIONS" --result-file "$RUN_DIR/merge.jsonl"
    --submission-out "$DIR/answers_upload/$SPLIT/$RUN.json")
if [ -n "${VQAV2_ANNOTATION:-}" ]; then SCORE_ARGS+=(--annotation-file "$VQAV2_ANNOTATION"); fi
score "$RUN_DIR" llava.eval.eval_vqa "${SCORE_ARGS[@]}"
