#!/usr/bin/env bash
# The main job: set up .venv, then compare every pruning method at budgets 32/16/8 (of 144 vision tokens)
# on the toy-world test split with the shipped toy LLaVA (checkpoints/toy-llava, its LPM in lpm/), through
# the real answer generator (llava.eval.model_vqa_loader) and scorer (llava.eval.eval_toy).
#   bash scripts/quickstart.sh                 # first QUESTIONS (default 300) of the 1000 test questions
#   QUESTIONS=1000 bash scripts/quickstart.sh  # the whole test split (what docs/results_toy.md reports)
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
PY=.venv/bin/python
OUT=outputs/quickstart
QUESTIONS=${QUESTIONS:-300}
MODEL=${MODEL:-checkpoints/toy-llava}
if [ ! -f "$MODEL/config.json" ]; then
  echo "error: $MODEL is missing; retrain it with: bash scripts/toy/train_all.sh" >&2
  exit 1
fi
t1=$(date +%s)

# The held-out test split is a pure function of (seed, number of test images): regenerate it (seconds)
# instead of shipping images, then keep its first $QUESTIONS questions (the order is already shuffled).
$PY -m toyworld.generate --out "$OUT/data/toy" --seed 0 --num-train 1 --num-test 1000 > /dev/null 2>&1
$PY - "$OUT/data/toy" "$QUESTIONS" <<'PYEOF'
import sys
folder, n = sys.argv[1], int(sys.argv[2])
for name in ("test_questions.jsonl", "test_answers.jsonl"):
    path = f"{folder}/{name}"
    lines = open(path).read().splitlines(keepends=True)[:n]
    open(path, "w").writelines(lines)
PYEOF

rm -rf "$OUT/sweep"
$PY -m llava.eval.sweep --model-path "$MODEL" --methods none,learnpruner,vispruner,fastv,visionzip,divprune,dart,random,cls,downsample,pyramiddrop,sparsevlm \
    --budgets 32,16,8 --benchmarks toy --eval-root "$OUT/data" --out "$OUT/sweep" --batch-size 50 \
    --max-new-tokens 4 --device cpu --no-progress > "$OUT/sweep.log" 2>&1 || { tail -20 "$OUT/sweep.log"; exit 1; }
$PY -m toyworld.report --sweep "$OUT/sweep" --answer-key "$OUT/data/toy/test_answers.jsonl" > "$OUT/report.log" 2>&1 || { tail -20 "$OUT/report.log"; exit 1; }

echo
echo "Toy world, $QUESTIONS test questions, model $MODEL (LearnPruner uses its shipped LPM $MODEL/lpm)"
echo
cat "$OUT/sweep/table_toy.md"
echo
echo "plot:          $OUT/sweep/accuracy_vs_budget.png"
echo "per-type plot: $OUT/sweep/accuracy_by_type.png"
echo "answers:       $OUT/sweep/answers/toy/   results: $OUT/sweep/results.csv"
echo "[quickstart] setup $((t1 - t0)) s, comparison $(( $(date +%s) - t1 )) s"
