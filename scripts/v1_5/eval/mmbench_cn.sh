#!/bin/bash
# MMBench-CN dev: circular accuracy + the submission file. ALL_ROUNDS=1 asks every option rotation (circular eval).
# Usage: bash scripts/v1_5/eval/mmbench_cn.sh [CKPT] [METHOD] [BUDGET] [LPM]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SPLIT="${SPLIT:-mmbench_dev_cn_20231003}"
DIR="$EVAL_ROOT/mmbench_cn"
RUN_DIR="$DIR/answers/$SPLIT/$RUN"
ROUNDS=()
if [ -n "${ALL_ROUNDS:-}" ]; then ROUNDS=(--all-rounds); fi

run_chunks llava.eval.model_vqa_mmbench "$RUN_DIR" \
    --question-file "$DIR/$SPLIT.tsv" \
    --lang cn --single-pred-prompt ${ROUNDS[@]+"${ROUNDS[@]}"}

score "$RUN_DIR" llava.eval.eval_mmbench \
    --annotation-file "$DIR/$SPLIT.tsv" \
    --result-file "$RUN_DIR/merge.jsonl" \
    --upload-dir "$DIR/answers_upload/$SPLIT" \
    --experiment "$RUN"
