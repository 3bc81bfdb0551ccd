# Shared body of scripts/v1_5/eval/{msvd,msrvtt,tgif}.sh -- sourced after _common.sh with BENCH set.
# Layout (Video-LLaVA's scripts/v1_5/eval/run_qa_*.sh): $EVAL_ROOT/GPT_Zero_Shot_QA/<Bench>_Zero_Shot_QA/{<VIDEO_SUBDIR>/,test_q.json,test_a.json}.
# LIMIT (default 1000: the LearnPruner paper's "first 1k samples"; empty = all), NUM_FRAMES (default 8).
# Scoring: llava.eval.eval_video_qa_judge with JUDGE_ARGS (default "--judge exact"; the paper's: "--judge openai
# --judge-url URL --judge-model gpt-4.1") into JUDGE_DIR (default $RUN_DIR/judge: verdicts.jsonl, report.json).

DIR="$EVAL_ROOT/GPT_Zero_Shot_QA/${BENCH}_Zero_Shot_QA"
LIMIT="${LIMIT-1000}"
RUN_DIR="$DIR/answers/${LIMIT:-all}/$RUN"
VIDEO_ARGS=(--video-dir "$DIR/$VIDEO_SUBDIR" --gt-file-question "$DIR/test_q.json" --gt-file-answers "$DIR/test_a.json"
            --num-frames "${NUM_FRAMES:-8}")
if [ -n "$LIMIT" ]; then VIDEO_ARGS+=(--limit "$LIMIT"); fi

run_chunks llava.eval.model_video_qa "$RUN_DIR" "${VIDEO_ARGS[@]}"

if [ -z "${JUDGE_ARGS:-}" ]; then
    echo "[$BENCH] judge: exact matching (no model). The paper's numbers need the GPT judge:" \
         "JUDGE_ARGS=\"--judge openai --judge-url URL --judge-model gpt-4.1\" (key in OPENAI_API_KEY)"
fi
read -r -a JUDGE <<< "${JUDGE_ARGS:---judge exact}"
# one verdict cache per judge: another judge needs another JUDGE_DIR (the judge refuses to mix them)
"$PYTHON" -m llava.eval.eval_video_qa_judge --pred-path "$RUN_DIR/merge.jsonl" --output-dir "${JUDGE_DIR:-$RUN_DIR/judge}" \
    "${JUDGE[@]}"
