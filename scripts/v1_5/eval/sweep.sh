#!/bin/bash
# Methods x budgets x benchmarks -> results.csv/json, table.md (Table 1 layout), accuracy_vs_budget.png.
#   bash scripts/v1_5/eval/sweep.sh [extra llava.eval.sweep flags, which override the defaults below]
# Environment: CKPT (./checkpoints/llava-v1.5-7b), METHODS (none,learnpruner), BUDGETS (128,64,32),
#   BENCHMARKS (all eight), LPM (trained LPM folder), EVAL_ROOT (./playground/data/eval),
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
    --budgets "${BUDGETS:-128,64,32}"
    --benchmarks "${BENCHMARKS:-gqa,sqa,textvqa,pope,mme,vqav2,mmbench,mmbench_cn}"
    --eval-root "${EVAL_ROOT:-./playground/data/eval}"
    --out "${OUT:-./outputs/sweep/$(basename "${CKPT%/}")}")
if [ -n "${LPM:-}" ]; then ARGS+=(--lpm-path "$LPM"); fi
exec "$PYTHON" -m llava.eval.sweep "${ARGS[@]}" "$@"
