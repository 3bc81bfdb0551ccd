#!/bin/bash
# Efficiency table (paper Table 5): FLOPs, KV cache, prefill/decode time, peak memory, vs an oracle.
#   bash scripts/v1_5/eval/efficiency.sh                       # LLaVA-1.5-7B architecture, random bf16 weights
#   MODEL_PATH=checkpoints/llava-v1.5-7b bash scripts/v1_5/eval/efficiency.sh
#   ANALYTIC=1 bash scripts/v1_5/eval/efficiency.sh            # FLOPs/KV only, no weights
# Extra arguments are passed through (e.g. --reps 5 --max-new-tokens 32 --json).
set -euo pipefail
METHODS=${METHODS:-none,learnpruner}
BUDGETS=${BUDGETS:-128,64,32}
if [ -n "${MODEL_PATH:-}" ]; then SRC=(--model-path "$MODEL_PATH"); else SRC=(--config-only "${CONFIG:-llava-v1.5-7b}"); fi
EXTRA=()
if [ -n "${ANALYTIC:-}" ]; then EXTRA+=(--analytic); fi
python -m llava.eval.efficiency "${SRC[@]}" --methods "$METHODS" --budgets "$BUDGETS" "${EXTRA[@]}" "$@"
