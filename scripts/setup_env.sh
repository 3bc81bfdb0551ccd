#!/usr/bin/env bash
# Create (or update) the project venv at .venv/ with pinned dependencies. Idempotent.
#   bash scripts/setup_env.sh            # core + train + demo + eval + test + lmms + video + ray extras (CPU)
#   EXTRAS=train,demo,gpu bash scripts/setup_env.sh   # on a GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-train,demo,eval,test,lmms,video,ray}
STAMP=.venv/.installed-$(cat setup.py | sha1sum | cut -c1-12)-${EXTRAS//,/-}

if [ ! -x .venv/bin/python ]; then
  echo "[setup_env] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if [ -f "$STAMP" ]; then
  echo "[setup_env] .venv is up to date"
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and exactly pinned: the CPU wheel comes from the local disk, never a CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
if [[ ",${EXTRAS}," == *",lmms,"* ]]; then
  # lmms-eval's own requirements pull a CUDA torch and torchvision: install it alone; the "lmms" extra above holds
  # the runtime dependencies it needs here (pinned in setup.py next to LMMS_EVAL)
  .venv/bin/python -m pip install --quiet --no-deps "$(sed -n 's/^LMMS_EVAL = "\(.*\)".*/\1/p' setup.py)"
fi
.venv/bin/python -c 'import torch, sys; sys.exit(None if torch.__version__.split("+")[0] == "2.13.0" else f"[setup_env] torch {torch.__version__} was installed; torch must stay 2.13.0")'
touch "$STAMP"
echo "[setup_env] done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
