#!/usr/bin/env bash
# Launch sbtrain.train with torchrun on one node or many; every argument is a Hydra override.
#
#   launch/torchrun.sh experiment=tiny_cpu trainer.max_steps=100          # one node, NPROC ranks
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh ...         # on each of 4 nodes
#
# Environment (all optional):
#   NPROC         ranks per node (default: GPUs on the node, else 1)
#   NNODES        nodes in the job (default 1); >1 uses a c10d rendezvous at MASTER_ADDR:MASTER_PORT
#   MASTER_ADDR   rendezvous host (default localhost), MASTER_PORT (default 29500)
#   RDZV_ID       rendezvous id shared by the nodes of one job (default: SLURM_JOB_ID or "sbtrain")
#   MAX_RESTARTS  torchrun restarts of the whole worker group after a rank dies (default 0); each
#                 restart resumes from the newest checkpoint (trainer.resume=auto)
#   SHUTDOWN_TIMEOUT  seconds the ranks get to checkpoint after SIGTERM/SIGUSR1 before SIGKILL (default 100)
#   SBTRAIN_MODULE    the Python module torchrun runs (default sbtrain.train)
#   PYTHON        interpreter (default: .venv/bin/python of this checkout if present, else python3)
#
# torchrun forwards a signal to the ranks only when it is named in --signals-to-handle: SIGUSR1 is
# added so that Slurm's pre-emption warning (launch/slurm/train.sbatch) reaches the trainer, which
# checkpoints at the end of its step and exits 0.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${NPROC:-}" ]]; then
    NPROC="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-sbtrain}}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-100}"
SBTRAIN_MODULE="${SBTRAIN_MODULE:-sbtrain.train}"

# CPU runs: keep freed memory for reuse instead of page-faulting fresh >32 MB tensors (docs/DESIGN_NOTES.md §7).
export MALLOC_MMAP_MAX_="${MALLOC_MMAP_MAX_:-0}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-17179869184}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$NNODES" -gt 1 ]]; then
    rendezvous=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
else
    # One node: a private rendezvous on a free port, so two jobs on one machine never collide.
    rendezvous=(--standalone)
fi

cd "$ROOT"
# exec: signals sent to this script go straight to torchrun.
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node "$NPROC" \
    --max-restarts "$MAX_RESTARTS" --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "$SHUTDOWN_TIMEOUT" -m "$SBTRAIN_MODULE" "$@"
