#!/bin/bash
# MSRVTT-QA (Video-LLaVA, LearnPruner Table 3): judge accuracy and score. Usage: bash scripts/v1_5/eval/msrvtt.sh [CKPT] [METHOD] [BUDGET] [LPM]
CONV_MODE="${CONV_MODE:-llava_v1}"  # Video-LLaVA's run_inference_video_qa.py template
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
BENCH=MSRVTT VIDEO_SUBDIR=videos/all
source "$(dirname "${BASH_SOURCE[0]}")/_video_qa.sh"
