#!/bin/bash
# ScienceQA test: SQA-I (accuracy on questions with an image). Usage: bash scripts/v1_5/eval/sqa.sh [CKPT] [METHOD] [BUDGET] [LPM]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SPLIT="llava_test_CQM-A"
DIR="$EVAL_ROOT/scienceqa"
RUN_DIR="$DIR/answers/$SPLIT/$RUN"

run_chunks llava.eval.model_vqa_science "$RUN_DIR" \
    --question-file "$DIR/$SPLIT.json" \
    --image-folder "$DIR/images/test" \
    --single-pred-prompt

score "$RUN_DIR" llava.eval.eval_science_qa \
    --base-dir "$DIR" \
    --result-file "$RUN_DIR/merge.jsonl" \
    --output-file "$RUN_DIR/output.json" \
    --output-result "$RUN_DIR/result.json"
