#!/usr/bin/env bash
# `launch/mpirun.sh -np N train [gfn args]`: N ranks under Open MPI on this machine (or on the
# hosts of an --hostfile / -H you add before the gfn arguments, e.g. -H a:2,b:2). One libtorch
# thread per rank (set OMP_NUM_THREADS to change it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
(cd "$root" && source launch/setup.sh && cargo build --release --locked --quiet --bin gfn) >&2
mpi_args=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do mpi_args+=("$1" "$2"); shift 2; done
exec mpirun --allow-run-as-root --oversubscribe --bind-to none -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  "${mpi_args[@]}" "$root/target/release/gfn" "$@"
