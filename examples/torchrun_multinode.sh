#!/bin/bash
# Pre-train on N GPU nodes without a scheduler: run this same command on every node, from the repository, with the
# environment that has myna installed active. HEAD is a node every node can reach (its torchrun hosts the c10d
# rendezvous store); node ranks are handed out at the rendezvous, so no node needs its own number:
#   HEAD=node0 NNODES=2 DATA=runs/mydata OUT=runs/base examples/torchrun_multinode.sh
set -euo pipefail

: "${HEAD:?the rendezvous host, e.g. HEAD=node0}"
: "${NNODES:?the number of nodes, e.g. NNODES=2}"
DATA=${DATA:-runs/mydata}
OUT=${OUT:-runs/base}
PRESET=${PRESET:-1b}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
# the same id on every node of one run, and a new one for the next run
RUN_ID=${RUN_ID:-myna-$(basename "$OUT")}

# NCCL over the cluster network, not loopback or a container bridge; InfiniBand adapters by name prefix; a failed
# collective tears its process down instead of hanging the others (examples/slurm/train.sbatch says more).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

torchrun \
    --nnodes "$NNODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD:${RDZV_PORT:-29500}" \
    --rdzv-id "$RUN_ID" \
    -m myna pretrain --data "$DATA" --out "$OUT" --preset "$PRESET" \
    --parallel hsdp --activation-checkpointing --resume
