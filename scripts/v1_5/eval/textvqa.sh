#!/bin/bash
# TextVQA val (with OCR tokens): VQA accuracy. Usage: bash scripts/v1_5/eval/textvqa.sh [CKPT] [METHOD] [BUDGET] [LPM]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SPLIT="llava_textvqa_val_v051_ocr"
DIR="$EVAL_ROOT/textvqa"
RUN_DIR="$DIR/answers/$SPLIT/$RUN"

run_chunks llava.eval.model_vqa_loader "$RUN_DIR" \
    --question-file "$DIR/$SPLIT.jsonl" \
    --image-folder "$DIR/train_images"

score "$RUN_DIR" llava.eval.eval_textvqa \
    --annotation-file "$DIR/TextVQA_0.5.1_val.json" \
    --result-file "$RUN_DIR/merge.jsonl"
