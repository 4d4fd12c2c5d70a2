#!/usr/bin/env bash
# Data-parallel scaling on this machine: the same per-rank batch with 1 and 2 MPI ranks, one
# libtorch thread per rank. Prints steps/s, trajectories/s, scaling efficiency and the all-reduce
# time per step. Usage: launch/bench-ddp.sh [STEPS] [extra gfn args]   (default 2000 steps)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
steps="${1:-2000}"; shift || true
source launch/setup.sh
cargo build --release --locked --quiet --bin gfn
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
common=(train --set "train.steps=$steps" --set train.validate_every=0 --set train.checkpoint_every=0
        --set train.eval_samples=1000 --set train.threads=1 --device cpu "$@")
for ranks in 1 2; do
  mpirun --allow-run-as-root --oversubscribe --bind-to core -np "$ranks" -x OMP_NUM_THREADS=1 \
    target/release/gfn "${common[@]}" --out "$out/r$ranks" >/dev/null 2>&1
done
python3 - "$out" <<'PY'
import json, sys
s = {r: json.load(open(f"{sys.argv[1]}/r{r}/summary.json")) for r in (1, 2)}
traj = {r: s[r]["trajectories"] / s[r]["steps"] * s[r]["steps_per_s"] for r in (1, 2)}
print("| ranks | steps/s | trajectories/s | all-reduce ms/step | all-reduce share of a step | waiting for the slowest rank, ms/step (share) |")
print("|---:|---:|---:|---:|---:|---:|")
for r in (1, 2):
    step_ms = 1e3 / s[r]["steps_per_s"]
    reduce_ms, wait_ms = s[r]["all_reduce_ms_per_step"], s[r]["rank_wait_ms_per_step"]
    print(f"| {r} | {s[r]['steps_per_s']:.1f} | {traj[r]:.0f} | {reduce_ms:.3f} | {100 * reduce_ms / step_ms:.1f}% | {wait_ms:.3f} ({100 * wait_ms / step_ms:.1f}%) |")
print(f"\n2 ranks: {traj[2] / traj[1]:.2f}x the trajectories/s of 1 (scaling efficiency {50 * traj[2] / traj[1]:.0f}%)")
PY
