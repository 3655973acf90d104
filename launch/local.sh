#!/usr/bin/env bash
# One node, N processes: torchrun --standalone runs the rendezvous itself (no MASTER_ADDR needed).
#   bash launch/local.sh configs/quickstart.yaml --train.device=cuda --train.dtype=bf16
#   NPROC=2 bash launch/local.sh configs/tiny.yaml --parallel.dp_shard=-1     # CPU: gloo
# NPROC defaults to "auto": one process per GPU, or per CPU core without GPUs (torchrun's rule).
# Every extra argument goes to `kfm train` (dotted config overrides).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: [NPROC=n] $0 CONFIG [--key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
# Each rank would otherwise start one OpenMP thread per core: N ranks x N cores oversubscribe
# the CPU. torchrun sets 1 itself only when it is unset, with a warning; say it here once.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-auto}" \
    -m kfm_cli train "$CONFIG" "$@"
