#!/bin/bash
# Methods x budgets x benchmarks -> results.csv/json, table.md (the paper table of the checkpoint's family:
# Table 1 LLaVA-1.5, Table 2 LLaVA-NeXT, Table 4 Qwen2.5-VL), accuracy_vs_budget.png.
#   bash scripts/v1_5/eval/sweep.sh [extra llava.eval.sweep flags, which override the defaults below]
# Environment: CKPT (./checkpoints/llava-v1.5-7b), METHODS (none,learnpruner), BUDGETS and BENCHMARKS (default:
#   the family's table, e.g. 128,64,32 and all eight for LLaVA-1.5, 426,284,142 and six for Qwen2.5-VL),
#   LPM (trained LPM folder), EVAL_ROOT (./playground/data/eval),
#   OUT (./outputs/sweep/<ckpt name>), PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
CKPT="${CKPT:-./checkpoints/llava-v1.5-7b}"
ARGS=(--model-path "$CKPT"
    --methods "${METHODS:-none,learnpruner}"
    --eval-root "${EVAL_ROOT:-./playground/data/eval}"
    --out "${OUT:-./outputs/sweep/$(basename "${CKPT%/}")}")
if [ -n "${BUDGETS:-}" ]; then ARGS+=(--budgets "$BUDGETS"); fi  # default: the family's paper table
if [ -n "${BENCHMARKS:-}" ]; then ARGS+=(--benchmarks "$BENCHMARKS"); fi
if [ -n "${LPM:-}" ]; then ARGS+=(--lpm-path "$LPM"); fi
exec "$PYTHON" -m llava.eval.sweep "${ARGS[@]}" "$@"
