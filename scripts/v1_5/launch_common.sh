# Shared by finetune_lpm.sh and finetune_atp.sh (sourced, not run): the interpreter and launchers, the GPU count, the
# gradient accumulation and the launcher command. Reads ROOT, GLOBAL_BATCH, PER_DEVICE_BATCH, TAG and the
# environment variables those scripts document (NUM_GPUS, NUM_NODES, HOSTFILE, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# LAUNCHER, PYTHON, DEEPSPEED, TORCHRUN); sets PYTHON, GRAD_ACC, the LAUNCH array and TRAIN_ARGS, the flags both
# training scripts pass (the base, data, batch, schedule, checkpointing and logging; from BASE, OUTPUT_DIR, DS_CONFIG,
# CONV_VERSION, DATA, IMAGES, CHECK_IMAGES, SKIP_MISSING_IMAGES, DATA_FRACTION, DATA_SEED, ALLOW_CHANGED_ARGS, EPOCHS,
# LR); the caller adds its own flags and EXTRA_ARGS after them (a later flag wins).

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
LAUNCHER="${LAUNCHER:-deepspeed}"
MASTER_PORT="${MASTER_PORT:-29500}"
NUM_NODES="${NUM_NODES:-1}"
for tool in DEEPSPEED TORCHRUN; do
    name=$(tr '[:upper:]' '[:lower:]' <<< "$tool")
    if [ -z "${!tool:-}" ]; then
        if [ -x "$ROOT/.venv/bin/$name" ]; then printf -v "$tool" '%s' "$ROOT/.venv/bin/$name"; else printf -v "$tool" '%s' "$name"; fi
    fi
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${NUM_GPUS:-}" ]; then
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        NUM_GPUS=$(awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES")
    elif command -v nvidia-smi > /dev/null 2>&1; then
        NUM_GPUS=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
    fi
    NUM_GPUS=${NUM_GPUS:-0}
fi
if [ "$NUM_GPUS" -lt 1 ]; then
    echo "error: no GPU found (set NUM_GPUS, or see docs/training.md for a CPU smoke run)" >&2
    exit 1
fi
if [ "$LAUNCHER" = deepspeed ] && [ "$NUM_NODES" -gt 1 ] && [ -z "${HOSTFILE:-}" ]; then
    echo "error: NUM_NODES=$NUM_NODES with the deepspeed launcher needs HOSTFILE (or LAUNCHER=torchrun and NODE_RANK)" >&2
    exit 1
fi
WORLD=$((NUM_GPUS * NUM_NODES))
if [ $((GLOBAL_BATCH % (PER_DEVICE_BATCH * WORLD))) -ne 0 ]; then
    echo "error: GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of PER_DEVICE_BATCH=$PER_DEVICE_BATCH x NUM_GPUS=$NUM_GPUS" \
        "x NUM_NODES=$NUM_NODES" >&2
    exit 1
fi
GRAD_ACC=$((GLOBAL_BATCH / (PER_DEVICE_BATCH * WORLD)))

NODES=""
[ "$NUM_NODES" -gt 1 ] && NODES="${NUM_NODES} nodes x "
echo "[$TAG] $BASE -> $OUTPUT_DIR: ${NODES}${NUM_GPUS} GPU(s) x ${PER_DEVICE_BATCH} x ${GRAD_ACC} accumulation = ${GLOBAL_BATCH}, lr ${LR}" >&2
case "$LAUNCHER" in
    deepspeed)
        LAUNCH=("$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
        [ -n "${HOSTFILE:-}" ] && LAUNCH+=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES")
        [ -n "${HOSTFILE:-}" ] && [ -n "${NODE_RANK:-}" ] && LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
        [ -n "${MASTER_ADDR:-}" ] && LAUNCH+=(--master_addr "$MASTER_ADDR")
        ;;
    torchrun)
        LAUNCH=("$TORCHRUN" --nproc_per_node "$NUM_GPUS" --nnodes "$NUM_NODES" --node_rank "${NODE_RANK:-0}"
            --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT")
        ;;
    *) echo "error: LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2; exit 1 ;;
esac
TRAIN_ARGS=(
    --deepspeed "$DS_CONFIG" --model_name_or_path "$BASE" --version "$CONV_VERSION"
    --data_path "$DATA" --image_folder "$IMAGES" --check_images "$CHECK_IMAGES" --skip_missing_images "$SKIP_MISSING_IMAGES"
    --data_fraction "$DATA_FRACTION" --data_seed "$DATA_SEED" --bf16 True
    --output_dir "$OUTPUT_DIR" --allow_changed_args "$ALLOW_CHANGED_ARGS"
    --num_train_epochs "$EPOCHS" --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC"
    --learning_rate "$LR" --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine
    --model_max_length 2048 --gradient_checkpointing True
    --save_strategy steps --save_steps 50 --save_total_limit 3
    --logging_steps 1 --dataloader_num_workers 4 --lazy_preprocess True --report_to none
)
