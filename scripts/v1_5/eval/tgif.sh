#!/bin/bash
# TGIF-QA (Video-LLaVA, LearnPruner Table 3): judge accuracy and score. Usage: bash scripts/v1_5/eval/tgif.sh [CKPT] [METHOD] [BUDGET] [LPM]
CONV_MODE="${CONV_MODE:-llava_v1}"  # Video-LLaVA's run_inference_video_qa.py template
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
BENCH=TGIF VIDEO_SUBDIR=mp4
source "$(dirname "${BASH_SOURCE[0]}")/_video_qa.sh"
