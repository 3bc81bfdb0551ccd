# Shared body of scripts/v1_5/eval/{msvd,msrvtt,tgif}.sh -- sourced after _common.sh with BENCH set.
# Layout (Video-LLaVA's scripts/v1_5/eval/run_qa_*.sh): $EVAL_ROOT/GPT_Zero_Shot_QA/<Bench>_Zero_Shot_QA/{<VIDEO_SUBDIR>/,test_q.json,test_a.json}.
# LIMIT (default 1000: the LearnPruner paper's "first 1k samples"; empty = all), NUM_FRAMES (default 8).
# Scoring: llava.eval.eval_video_qa_judge (JUDGE_ARGS, e.g. "--judge openai --judge-url URL --judge-model gpt-4.1").

DIR="$EVAL_ROOT/GPT_Zero_Shot_QA/${BENCH}_Zero_Shot_QA"
LIMIT="${LIMIT-1000}"
RUN_DIR="$DIR/answers/${LIMIT:-all}/$RUN"
VIDEO_ARGS=(--video-dir "$DIR/$VIDEO_SUBDIR" --gt-file-question "$DIR/test_q.json" --gt-file-answers "$DIR/test_a.json"
            --num-frames "${NUM_FRAMES:-8}")
if [ -n "$LIMIT" ]; then VIDEO_ARGS+=(--limit "$LIMIT"); fi

run_chunks llava.eval.model_video_qa "$RUN_DIR" "${VIDEO_ARGS[@]}"

if "$PYTHON" -c "import llava.eval.eval_video_qa_judge" 2> /dev/null; then
    read -r -a JUDGE <<< "${JUDGE_ARGS:-}"
    "$PYTHON" -m llava.eval.eval_video_qa_judge --pred-path "$RUN_DIR/merge.jsonl" --output-dir "$RUN_DIR/judge" \
        ${JUDGE[@]+"${JUDGE[@]}"}
fi
