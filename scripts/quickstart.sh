#!/usr/bin/env bash
# The main job on the built-in default: set up .venv, then answer questions about a generated
# toy image with the unpruned model and with LearnPruner, printing the token accounting.
#   bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
OUT=outputs/quickstart
mkdir -p "$OUT"

MODEL=${MODEL:-checkpoints/toy-llava}
if [ ! -f "$MODEL/config.json" ]; then
  # No trained default is shipped yet: use a tiny RANDOM model with LLaVA-style geometry, so the
  # answers are gibberish but every stage (loading, pruning, generation, accounting) runs for real.
  MODEL=$OUT/tiny-llava
  [ -f "$MODEL/config.json" ] || $PY -m learnpruner_ext.tiny --out "$MODEL" --format hf --text-layers 8 --image-size 168 --patch-size 14
  echo "NOTE: no trained default checkpoint found; using a tiny random model at $MODEL"
fi

$PY - "$OUT/example.png" <<'PYEOF'
import sys
import numpy as np
from learnpruner_ext.toy.generate import draw_scene, sample_scene
draw_scene(sample_scene(np.random.default_rng(0), 192), 192).save(sys.argv[1])
PYEOF

for spec in "none:" "learnpruner:32" "learnpruner:8"; do
  method=${spec%%:*}; budget=${spec#*:}
  $PY -W ignore -m llava.eval.run_llava --model-path "$MODEL" --image-file "$OUT/example.png" \
      --query "What color is the background?" --max_new_tokens 8 --json \
      --pruning-method "$method" ${budget:+--visual-token-budget $budget} 2>/dev/null
done
