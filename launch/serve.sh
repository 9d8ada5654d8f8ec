#!/usr/bin/env bash
# Start an Infinite cluster with torchrun: one rank per GPU (or CPU rank).
#   launch/serve.sh [--nproc-per-node N] [--nnodes M --node-rank R --master-addr A --master-port P] [infinite serve flags]
# torchrun flags come first; everything from the first flag torchrun does not know goes to `infinite serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
torchrun_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node|--nnodes|--node-rank|--node_rank|--master-addr|--master_addr|--master-port|--master_port|--rdzv-endpoint|--rdzv_endpoint|--rdzv-backend|--rdzv_backend|--rdzv-id|--rdzv_id)
      torchrun_args+=("$1" "$2"); shift 2 ;;
    --standalone)
      torchrun_args+=("$1"); shift ;;
    *) break ;;
  esac
done
[ ${#torchrun_args[@]} -eq 0 ] && torchrun_args=(--standalone --nproc-per-node 2)
exec "${PYTHON:-python3}" -m torch.distributed.run "${torchrun_args[@]}" -m infinite.launch.serve "$@"
