#!/usr/bin/env bash
# One node, N ranks: `launch/local.sh -n N train [gfn args]`.
# With GPUs: N processes with torchrun-style variables, one GPU per training rank (NCCL); the
#            last --num-remote-buffers ranks serve the replay buffer and need no GPU.
# Without:   mpirun -np N (MPI), one libtorch thread per rank.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ranks=1
if [ "${1:-}" = "-n" ]; then ranks="$2"; shift 2; fi
case "$ranks" in ''|*[!0-9]*|0) echo "local.sh: -n takes a positive number of ranks, got '$ranks'" >&2; exit 2 ;; esac
gfn="$root/target/release/gfn"
(cd "$root" && source launch/setup.sh && cargo build --release --locked --quiet --bin gfn) >&2

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"; fi
buffers=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --num-remote-buffers) buffers="${args[i+1]:-0}" ;;
    --num-remote-buffers=*) buffers="${args[i]#*=}" ;;
  esac
done
if [ "$gpus" -gt 0 ]; then
  trainers=$((ranks - buffers))
  [ "$trainers" -le "$gpus" ] || { echo "local.sh: $trainers training ranks but $gpus GPUs on this node" >&2; exit 2; }
  port="${MASTER_PORT:-$((20000 + RANDOM % 20000))}"
  pids=()
  for ((r = 0; r < ranks; r++)); do
    RANK=$r WORLD_SIZE=$ranks LOCAL_RANK=$r LOCAL_WORLD_SIZE=$ranks MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      "$gfn" "$@" &
    pids+=($!)
  done
  # A failed rank ends the job: stop the others and return its status.
  status=0
  while ((${#pids[@]})); do
    if wait -n "${pids[@]}"; then :; else status=$?; kill "${pids[@]}" 2>/dev/null || true; fi
    alive=()
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
    pids=("${alive[@]}")
  done
  exit "$status"
else
  exec "$root/launch/mpirun.sh" -np "$ranks" "$@"
fi
