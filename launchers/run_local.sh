#!/usr/bin/env bash
# Run MaskPro training with NPROC ranks on this machine (CPU or GPUs).
#
# Every argument is passed through to launchers/train.py, so config overrides work as usual:
#   launchers/run_local.sh --model.path .cache/demo/smollm2-135m-instruct --data.source .cache/demo/wiki/calib.txt
#   CONFIG=configs/demo_smollm2.yaml launchers/run_local.sh --train.steps=20
#   NPROC=8 CONFIG=configs/llama2_7b.yaml launchers/run_local.sh            # one 8-GPU node
#   LAUNCHER=deepspeed NPROC=2 launchers/run_local.sh --model.path M --data.source T
#   NPROC=4 CONFIG=configs/tiny_debug.yaml launchers/run_local.sh --resume --model.path M --data.source T
#
# Environment (defaults in brackets):
#   NPROC [2]                 ranks on this machine (GPUs on a GPU node)
#   CONFIG [configs/tiny_debug.yaml]
#   LAUNCHER [torchrun]       torchrun | deepspeed
#   MASTER_PORT [29500]       change it when two runs share a machine
#   PYTHON [python]           interpreter whose environment has maskpro_ds installed
#   OMP_NUM_THREADS [1]       several ranks share the cores; more threads make small ops far slower
#   DS_ACCELERATOR [cuda if nvidia-smi sees a GPU, else cpu]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-configs/tiny_debug.yaml}"
LAUNCHER="${LAUNCHER:-torchrun}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ -z "${DS_ACCELERATOR:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        export DS_ACCELERATOR=cuda
    else
        export DS_ACCELERATOR=cpu
    fi
fi
# Launchers set these per rank; stale values from the calling shell would confuse the mapping.
unset RANK WORLD_SIZE LOCAL_RANK

if [[ ! -f "$CONFIG" ]]; then
    echo "run_local.sh: CONFIG=$CONFIG does not exist (see configs/)" >&2
    exit 2
fi

case "$LAUNCHER" in
    torchrun)
        exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" \
            --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
            launchers/train.py --config "$CONFIG" "$@"
        ;;
    deepspeed)
        # deepspeed's --num_gpus means "ranks on this node", on CPU too.
        exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" \
            --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
            launchers/train.py --config "$CONFIG" "$@"
        ;;
    *)
        echo "run_local.sh: LAUNCHER=$LAUNCHER is not supported; use torchrun or deepspeed" >&2
        exit 2
        ;;
esac
