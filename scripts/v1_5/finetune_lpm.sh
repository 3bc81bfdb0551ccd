#!/usr/bin/env bash
# Train LearnPruner's Learnable Pruning Module on a frozen LLaVA-1.5-7B (paper Appendix A.1), or on a
# LLaVA-NeXT / Qwen2.5-VL base given as BASE (docs/training.md):
# 10% of LLaVA-665K, 1 epoch, bf16, DeepSpeed ZeRO-2, L = L_ntp + 1.0 * (kept ratio - 0)^2.
#
#   bash scripts/v1_5/finetune_lpm.sh [BASE] [OUTPUT_DIR]
#
# Run it from the repository root (relative paths are taken from the current directory, as upstream's
# scripts do). Positional arguments win over the environment variables of the same name:
#   BASE            frozen base checkpoint            (default ./checkpoints/llava-v1.5-7b)
#   OUTPUT_DIR      where the LPM is written           (default ./checkpoints/llava-v1.5-7b-lpm)
# Other environment variables (defaults in brackets):
#   DATA            [./playground/data/llava_v1_5_mix665k.json]   IMAGES [./playground/data]
#   CONV_VERSION    conversation template (--version) [qwen2_5_vl for a Qwen2.5-VL base (its config's model_type), else v1]
#   DATA_FRACTION   [0.1]     DATA_SEED [42]     EPOCHS [1]
#   LR              [1e-3]    GLOBAL_BATCH [128] PER_DEVICE_BATCH [16]
#   PRUNE_LOSS_WEIGHT [1.0]   PRUNE_TARGET_RATIO [0.0]   LPM_HIDDEN [512]
#   CHECK_IMAGES    [True]    decode every image before training; all bad ones are reported in one error
#   SKIP_MISSING_IMAGES [False]  True: train without the samples whose image is missing or undecodable
#   ALLOW_CHANGED_ARGS  [False]  True: resume although data, lr, batch sizes, GPUs, ... differ from the checkpoint's
#   QUESTION_TYPES / EXCLUDE_QUESTION_TYPES  [all]  toy-world question types to train on / leave out, e.g. count,position
#   DATA_SOURCES    [all]     source datasets (first folder of 'image', e.g. coco,gqa; text-only) to train on
#                   the filter is applied before DATA_FRACTION and recorded in lpm_config.json ("data_filter")
#   DS_CONFIG       [./scripts/zero2.json]     NUM_GPUS [all visible GPUs]: processes per node
#   LAUNCHER        deepspeed | torchrun [deepspeed]      MASTER_PORT [29500]
# Several nodes (docs/training.md, "Several processes and nodes"); GLOBAL_BATCH stays the optimizer batch, the
# accumulation is GLOBAL_BATCH / (PER_DEVICE_BATCH x NUM_GPUS x NUM_NODES):
#   NUM_NODES       [1]
#   HOSTFILE        deepspeed launcher: "host slots=N" lines; run the script once, on the first host (pdsh over ssh)
#   NODE_RANK       this node's rank 0..NUM_NODES-1 when the same command runs on every node: torchrun [0], or
#                   the deepspeed launcher with HOSTFILE but without ssh (--no_ssh)
#   MASTER_ADDR     node 0's address, reachable from the others [torchrun: 127.0.0.1; deepspeed: the first host's]
#   PYTHON / DEEPSPEED / TORCHRUN  interpreter and launchers [.venv/bin/... if present]
#   EXTRA_ARGS      more train_lpm.py flags, e.g. "--max_steps 20 --save_steps 10"
#
# Learning rate and batch size are ours (the paper does not give them): the LPM is a freshly initialised
# 0.5M-parameter MLP, like LLaVA's projector in its stage-1 pretraining (lr 1e-3, AdamW, cosine, 3% warmup,
# no weight decay), and 10% of 665K at a global batch of 128 is only ~520 optimizer steps, so a small
# lr such as 2e-5 (LLaVA's full-finetune value) or 2e-4 would barely move it. See docs/training.md.
#
# Re-running the same command resumes from the last checkpoint in OUTPUT_DIR (finished steps are not
# repeated); it stops, naming the difference, if the data, lr, batch sizes or GPU count changed
# (OUTPUT_DIR/checkpoint-N/run_args.json holds the values it compares). The result, OUTPUT_DIR/lpm.safetensors + lpm_config.json, is what --lpm-path takes.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASE="${1:-${BASE:-./checkpoints/llava-v1.5-7b}}"
OUTPUT_DIR="${2:-${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-lpm}}"
DATA="${DATA:-./playground/data/llava_v1_5_mix665k.json}"
IMAGES="${IMAGES:-./playground/data}"
DATA_FRACTION="${DATA_FRACTION:-0.1}"
DATA_SEED="${DATA_SEED:-42}"
EPOCHS="${EPOCHS:-1}"
LR="${LR:-1e-3}"
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-16}"
PRUNE_LOSS_WEIGHT="${PRUNE_LOSS_WEIGHT:-1.0}"
PRUNE_TARGET_RATIO="${PRUNE_TARGET_RATIO:-0.0}"
LPM_HIDDEN="${LPM_HIDDEN:-512}"
CHECK_IMAGES="${CHECK_IMAGES:-True}"
SKIP_MISSING_IMAGES="${SKIP_MISSING_IMAGES:-False}"
ALLOW_CHANGED_ARGS="${ALLOW_CHANGED_ARGS:-False}"
DS_CONFIG="${DS_CONFIG:-$ROOT/scripts/zero2.json}"

for path in "$BASE/config.json" "$DATA"; do
    if [ ! -e "$path" ]; then echo "error: $path not found (see docs/training.md, 'Data and base model')" >&2; exit 1; fi
done
if [ -z "${CONV_VERSION:-}" ]; then  # the family's chat template: Qwen2.5-VL's ChatML, else vicuna_v1
    if grep -Eq '"model_type": *"qwen2_5_vl"' "$BASE/config.json"; then CONV_VERSION=qwen2_5_vl; else CONV_VERSION=v1; fi
fi
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
FILTER=()
[ -n "${QUESTION_TYPES:-}" ] && FILTER+=(--question_types "$QUESTION_TYPES")
[ -n "${EXCLUDE_QUESTION_TYPES:-}" ] && FILTER+=(--exclude_question_types "$EXCLUDE_QUESTION_TYPES")
[ -n "${DATA_SOURCES:-}" ] && FILTER+=(--data_sources "$DATA_SOURCES")

TAG=finetune_lpm
# shellcheck source=scripts/v1_5/launch_common.sh
source "$ROOT/scripts/v1_5/launch_common.sh"
"${LAUNCH[@]}" "$ROOT/llava/train/train_lpm.py" "${TRAIN_ARGS[@]}" \
    --prune_loss_weight "$PRUNE_LOSS_WEIGHT" \
    --prune_target_ratio "$PRUNE_TARGET_RATIO" \
    --lpm_hidden "$LPM_HIDDEN" \
    ${FILTER[@]+"${FILTER[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
