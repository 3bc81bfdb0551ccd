# Sourced by the toy scripts after they set ROOT: the interpreter, an offline quiet environment, the thread count
# and the CPU's training precision (PYTHON, THREADS, PRECISION may be set by the caller).
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
THREADS="${THREADS:-$(nproc)}"
# bf16 where the CPU multiplies bf16 natively (AVX-512 BF16 / AMX), else fp32 (7x faster on AVX2)
if grep -qE "avx512_bf16|amx_bf16" /proc/cpuinfo; then PRECISION="${PRECISION:-}"; else PRECISION="${PRECISION:---bf16 False}"; fi
