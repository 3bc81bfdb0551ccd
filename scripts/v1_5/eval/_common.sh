# Shared setup of scripts/v1_5/eval/<bench>.sh -- sourced, not run.
#
#   bash scripts/v1_5/eval/<bench>.sh [CKPT] [METHOD] [BUDGET] [LPM]
#
# Positional arguments win over the environment variables of the same name:
#   CKPT        checkpoint folder                      (default ./checkpoints/llava-v1.5-7b)
#   METHOD      pruning method                         (default none)
#   BUDGET      average vision tokens per LLM layer    (default empty = no pruning)
#   LPM         trained LPM folder, for learnpruner    (default empty)
# Other environment variables:
#   EVAL_ROOT   benchmark data root                    (default ./playground/data/eval, upstream's layout)
#   CONV_MODE   conversation template                  (default vicuna_v1)
#   MODEL_BASE  --model-base for projector-only checkpoints
#   EXTRA_ARGS  more generator flags, e.g. "--batch-size 8 --dtype bf16 --pruning-layer 12"
#   PYTHON      interpreter                            (default .venv/bin/python if present, else python3)
#   CUDA_VISIBLE_DEVICES  "0,1,2,3" runs 4 chunks in parallel, one per GPU (upstream's multi-GPU
#               chunking); unset = one chunk per GPU that nvidia-smi lists; no GPU (or set but empty) = 1 chunk.
# Answers go to $EVAL_ROOT/<bench>/answers/<split>/<ckpt name>-<METHOD>-<BUDGET or full>/ (chunk files
# <CHUNKS>_<IDX>.jsonl, merge.jsonl, metrics.json), so runs of different methods/budgets never mix.
# Re-running the same command resumes: answered questions are skipped.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
CKPT="${1:-${CKPT:-./checkpoints/llava-v1.5-7b}}"
METHOD="${2:-${METHOD:-none}}"
BUDGET="${3:-${BUDGET:-}}"
LPM="${4:-${LPM:-}}"
EVAL_ROOT="${EVAL_ROOT:-./playground/data/eval}"
CONV_MODE="${CONV_MODE:-vicuna_v1}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$BUDGET" ] && [ "$METHOD" = none ]; then
    echo "error: BUDGET=$BUDGET was given but METHOD is 'none', which keeps every vision token; pass a method" \
         "(e.g. bash $0 $CKPT learnpruner $BUDGET LPM_DIR) or drop the budget" >&2
    exit 2
fi

CKPT_NAME="$(basename "${CKPT%/}")"
case "$CKPT_NAME" in  # as llava.mm_utils.get_model_name_from_path: "<run>_checkpoint-N"
    checkpoint-*) CKPT_NAME="$(basename "$(dirname "${CKPT%/}")")_$CKPT_NAME" ;;
esac
RUN="${CKPT_NAME}-${METHOD}-${BUDGET:-full}"

GEN_ARGS=(--model-path "$CKPT" --temperature 0 --conv-mode "$CONV_MODE" --pruning-method "$METHOD")
if [ -n "$BUDGET" ]; then GEN_ARGS+=(--visual-token-budget "$BUDGET"); fi
if [ -n "$LPM" ]; then GEN_ARGS+=(--lpm-path "$LPM"); fi
if [ -n "${MODEL_BASE:-}" ]; then GEN_ARGS+=(--model-base "$MODEL_BASE"); fi
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
GEN_ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})

if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    gpu_list="$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi > /dev/null 2>&1 && NGPU="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU')" && [ "$NGPU" -gt 0 ]; then
    gpu_list="$(seq -s, 0 $((NGPU - 1)))"
else
    gpu_list=""
fi
IFS=',' read -r -a GPULIST <<< "$gpu_list"
CHUNKS=${#GPULIST[@]}
if [ "$CHUNKS" -eq 0 ]; then CHUNKS=1; fi

# run_chunks MODULE RUN_DIR ARGS...: one generator process per chunk (in parallel, one GPU each),
# then merge the chunk files into RUN_DIR/merge.jsonl (llava.eval.merge_answers: refuses a missing
# chunk, answers of different runs and duplicate questions).
run_chunks() {
    local module="$1" dir="$2"
    shift 2
    mkdir -p "$dir"
    echo "[$RUN] $module: $CHUNKS chunk(s) -> $dir" >&2
    local pids=() idx
    for idx in $(seq 0 $((CHUNKS - 1))); do
        local cmd=("$PYTHON" -m "$module" "$@" "${GEN_ARGS[@]}"
            --answers-file "$dir/${CHUNKS}_${idx}.jsonl" --num-chunks "$CHUNKS" --chunk-idx "$idx")
        if [ ${#GPULIST[@]} -gt 0 ]; then
            CUDA_VISIBLE_DEVICES="${GPULIST[$idx]}" "${cmd[@]}" &
        else
            "${cmd[@]}" &
        fi
        pids+=($!)
    done
    local failed=0 pid
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    if [ "$failed" -ne 0 ]; then
        echo "error: answer generation failed (see above); fix it and re-run the same command to resume" >&2
        exit 1
    fi
    local chunk_files=()
    for idx in $(seq 0 $((CHUNKS - 1))); do chunk_files+=("$dir/${CHUNKS}_${idx}.jsonl"); done
    "$PYTHON" -m llava.eval.merge_answers --out "$dir/merge.jsonl" "${chunk_files[@]}"
}

# score RUN_DIR MODULE ARGS...: run a scorer (llava/eval/eval_*.py), print its summary and write its
# metrics (the JSON object on the last line of `--json` output) to RUN_DIR/metrics.json.
score() {
    local dir="$1" module="$2"
    shift 2
    local out
    out="$("$PYTHON" -m "$module" "$@" --json)"
    printf '%s\n' "$out" | sed '$d'
    printf '%s\n' "$out" | tail -n 1 > "$dir/metrics.json.tmp"
    mv "$dir/metrics.json.tmp" "$dir/metrics.json"
    echo "[$RUN] metrics: $dir/metrics.json" >&2
}
