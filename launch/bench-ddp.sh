#!/usr/bin/env bash
# Data-parallel scaling on this machine: the same per-rank batch with 1 and 2 MPI ranks, one
# libtorch thread per rank. The two run alternately REPEATS times (a VM's speed drifts by a few
# percent between runs) and the table gives medians and ranges: steps/s, trajectories/s, the
# gradient collectives' time per step, the wait for the slowest rank, and the scaling of each
# 1-rank/2-rank pair. Usage: launch/bench-ddp.sh [STEPS [REPEATS]] [extra gfn args]
# (default 2000 steps, 3 repeats)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
number='^[0-9]+$'
steps=2000; repeats=3
if [[ "${1:-}" =~ $number ]]; then steps="$1"; shift; fi
if [[ "${1:-}" =~ $number ]]; then repeats="$1"; shift; fi
source launch/setup.sh
cargo build --release --locked --quiet --bin gfn
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
common=(train --set "train.steps=$steps" --set train.validate_every=0 --set train.checkpoint_every=0
        --set train.eval_samples=1000 --set train.threads=1 --device cpu "$@")
for repeat in $(seq "$repeats"); do
  for ranks in 1 2; do
    echo "repeat $repeat/$repeats: $ranks rank(s), $steps steps" >&2
    mpirun --allow-run-as-root --oversubscribe --bind-to core -np "$ranks" -x OMP_NUM_THREADS=1 \
      target/release/gfn "${common[@]}" --out "$out/r$ranks-$repeat" >/dev/null 2>&1
  done
done
python3 - "$out" "$repeats" <<'PY'
import json, statistics, sys
out, repeats = sys.argv[1], int(sys.argv[2])
runs = {r: [json.load(open(f"{out}/r{r}-{k}/summary.json")) for k in range(1, repeats + 1)] for r in (1, 2)}
def traj(s):
    return s["trajectories"] / s["steps"] * s["steps_per_s"]
def spread(values, fmt):
    values = sorted(values)
    median = statistics.median(values)
    if format(values[0], fmt) == format(values[-1], fmt):
        return format(median, fmt)
    return f"{median:{fmt}} ({values[0]:{fmt}}–{values[-1]:{fmt}})"
print(f"medians (ranges) over {repeats} alternating runs each")
print()
print("| ranks | steps/s | trajectories/s | all-reduce ms/step | share of a step | waiting for the slowest rank, ms/step | share of a step |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for r in (1, 2):
    rs = runs[r]
    reduce = [s["time_all_reduce_ms_per_step"] for s in rs]
    wait = [s["time_rank_wait_ms_per_step"] for s in rs]
    step_ms = [1e3 / s["steps_per_s"] for s in rs]
    print(f"| {r} | {spread([s['steps_per_s'] for s in rs], '.1f')} | {spread([traj(s) for s in rs], '.0f')} "
          f"| {spread(reduce, '.3f')} | {spread([100 * a / b for a, b in zip(reduce, step_ms)], '.1f')} % "
          f"| {spread(wait, '.3f')} | {spread([100 * a / b for a, b in zip(wait, step_ms)], '.1f')} % |")
ratios = [traj(b) / traj(a) for a, b in zip(runs[1], runs[2])]
print(f"\n2 ranks: {spread(ratios, '.2f')}x the trajectories/s of 1, pair by pair "
      f"(scaling efficiency {50 * statistics.median(ratios):.0f}%)")
PY
