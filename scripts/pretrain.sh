#!/usr/bin/env bash
# torchrun launcher for `scripts/train.py pretrain`; extra arguments go to train.py (config overrides, --resume ...).
#   one node, all its GPUs:   bash scripts/pretrain.sh model=small
#   one node, 4 GPUs:         NPROC=4 bash scripts/pretrain.sh --config pretrain model=small
#   two nodes (run on each):  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash scripts/pretrain.sh model=medium
#                             NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 bash scripts/pretrain.sh model=medium
#   CPU, 2 processes (gloo):  NPROC=2 bash scripts/pretrain.sh --config pretrain_debug
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ "$NNODES" == "1" ]]; then
  exec torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" scripts/train.py pretrain "$@"
fi
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  scripts/train.py pretrain "$@"
