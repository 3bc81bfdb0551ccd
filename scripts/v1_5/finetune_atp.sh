#!/usr/bin/env bash
# Train ATP-LLaVA's Adaptive Token Pruning modules on a LLaVA-1.5-7B (paper Sec. 4.1; docs/training.md, "ATP-LLaVA"):
# 10% of LLaVA-665K, 1 epoch, bf16, DeepSpeed ZeRO-2, L = L_ntp + LAMBDA_ATP * L_ATP + 0.2 * |N - TARGET_TOKENS|,
# lr 1e-4 for the modules; the LLM frozen by default (the paper's Table 3 "Frozen" row).
#
#   TARGET_TOKENS=144 bash scripts/v1_5/finetune_atp.sh [BASE] [OUTPUT_DIR]
#
# Run it from the repository root. Positional arguments win over the environment variables of the same name:
#   BASE            base checkpoint (LLaVA-1.5 family)  (default ./checkpoints/llava-v1.5-7b)
#   OUTPUT_DIR      where the modules are written       (default ./checkpoints/llava-v1.5-7b-atp-$TARGET_TOKENS)
# Other environment variables (defaults in brackets):
#   TARGET_TOKENS   N_target: average vision tokens per LLM layer to train for (required, e.g. 144 or 88)
#   LAMBDA_ATP [0.05] (the paper: 0.01 to 0.1)   LAMBDA_TARGET [0.2]   ATP_LAYERS [the paper's 4,14,24 of 32, scaled]
#   LR [1e-4] (ATP modules)   LLM_LR [2e-5] (the LLM, when it trains)
#   FREEZE_LLM [True]  False: the LLM trains too, LLM_TUNING full | lora [full] (LORA_R [16], LORA_ALPHA [32])
#   DATA [./playground/data/llava_v1_5_mix665k.json]   IMAGES [./playground/data]   CONV_VERSION [v1]
#   DATA_FRACTION [0.1]   DATA_SEED [42]   EPOCHS [1]   GLOBAL_BATCH [128]   PER_DEVICE_BATCH [16]
#   CHECK_IMAGES [True]   SKIP_MISSING_IMAGES [False]   ALLOW_CHANGED_ARGS [False]
#   QUESTION_TYPES / EXCLUDE_QUESTION_TYPES / DATA_SOURCES  [all]  as in finetune_lpm.sh
#   DS_CONFIG [./scripts/zero2_client_optimizer.json]: ZeRO-2 with the Trainer's optimizer (two learning rates)
#   NUM_GPUS, NUM_NODES, HOSTFILE, NODE_RANK, MASTER_ADDR, MASTER_PORT, LAUNCHER, PYTHON / DEEPSPEED / TORCHRUN,
#   EXTRA_ARGS: as in finetune_lpm.sh (scripts/v1_5/launch_common.sh)
#
# Re-running the same command resumes from the last checkpoint in OUTPUT_DIR. The result,
# OUTPUT_DIR/atp.safetensors + atp_config.json, is what --atp-path takes; with FREEZE_LLM=False the tuned model is
# also written to OUTPUT_DIR/model (its modules in model/atp/), for --model-path.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${TARGET_TOKENS:-}" ]; then
    echo "error: set TARGET_TOKENS, the average vision tokens per LLM layer to train for (e.g. TARGET_TOKENS=144)" >&2
    exit 1
fi
BASE="${1:-${BASE:-./checkpoints/llava-v1.5-7b}}"
OUTPUT_DIR="${2:-${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-atp-$TARGET_TOKENS}}"
DATA="${DATA:-./playground/data/llava_v1_5_mix665k.json}"
IMAGES="${IMAGES:-./playground/data}"
CONV_VERSION="${CONV_VERSION:-v1}"
DATA_FRACTION="${DATA_FRACTION:-0.1}"
DATA_SEED="${DATA_SEED:-42}"
EPOCHS="${EPOCHS:-1}"
LR="${LR:-1e-4}"
LLM_LR="${LLM_LR:-2e-5}"
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-16}"
LAMBDA_ATP="${LAMBDA_ATP:-0.05}"
LAMBDA_TARGET="${LAMBDA_TARGET:-0.2}"
FREEZE_LLM="${FREEZE_LLM:-True}"
LLM_TUNING="${LLM_TUNING:-full}"
LORA_R="${LORA_R:-16}"
LORA_ALPHA="${LORA_ALPHA:-32}"
CHECK_IMAGES="${CHECK_IMAGES:-True}"
SKIP_MISSING_IMAGES="${SKIP_MISSING_IMAGES:-False}"
ALLOW_CHANGED_ARGS="${ALLOW_CHANGED_ARGS:-False}"
DS_CONFIG="${DS_CONFIG:-$ROOT/scripts/zero2_client_optimizer.json}"

for path in "$BASE/config.json" "$DATA"; do
    if [ ! -e "$path" ]; then echo "error: $path not found (see docs/training.md, 'Data and base model')" >&2; exit 1; fi
done
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
OPTIONAL=()
[ -n "${ATP_LAYERS:-}" ] && OPTIONAL+=(--atp_layers "$ATP_LAYERS")
[ -n "${QUESTION_TYPES:-}" ] && OPTIONAL+=(--question_types "$QUESTION_TYPES")
[ -n "${EXCLUDE_QUESTION_TYPES:-}" ] && OPTIONAL+=(--exclude_question_types "$EXCLUDE_QUESTION_TYPES")
[ -n "${DATA_SOURCES:-}" ] && OPTIONAL+=(--data_sources "$DATA_SOURCES")

TAG=finetune_atp
# shellcheck source=scripts/v1_5/launch_common.sh
source "$ROOT/scripts/v1_5/launch_common.sh"
"${LAUNCH[@]}" "$ROOT/llava/train/train_atp.py" "${TRAIN_ARGS[@]}" \
    --llm_learning_rate "$LLM_LR" \
    --target_tokens "$TARGET_TOKENS" \
    --lambda_atp "$LAMBDA_ATP" \
    --lambda_target "$LAMBDA_TARGET" \
    --freeze_llm "$FREEZE_LLM" \
    --llm_tuning "$LLM_TUNING" \
    --lora_r "$LORA_R" \
    --lora_alpha "$LORA_ALPHA" \
    ${OPTIONAL[@]+"${OPTIONAL[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
