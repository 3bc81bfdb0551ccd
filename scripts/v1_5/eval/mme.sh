#!/bin/bash
# MME: perception + cognition scores. Usage: bash scripts/v1_5/eval/mme.sh [CKPT] [METHOD] [BUDGET] [LPM]
# Ground truth: MME_Benchmark_release_version/<category>/questions_answers_YN/*.txt (subtasks with an images/
# folder) or <category>/*.txt beside the images, as upstream's convert_answer_to_mme.py reads it.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SPLIT="llava_mme"
DIR="$EVAL_ROOT/MME"
RUN_DIR="$DIR/answers/$SPLIT/$RUN"

run_chunks llava.eval.model_vqa_loader "$RUN_DIR" \
    --question-file "$DIR/$SPLIT.jsonl" \
    --image-folder "$DIR/MME_Benchmark_release_version"

score "$RUN_DIR" llava.eval.eval_mme \
    --question-file "$DIR/$SPLIT.jsonl" \
    --result-file "$RUN_DIR/merge.jsonl" \
    --annotation-dir "$DIR/MME_Benchmark_release_version"
