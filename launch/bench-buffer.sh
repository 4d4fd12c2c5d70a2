#!/usr/bin/env bash
# Replay-buffer ranks on this machine. (1) Server throughput on loopback with several concurrent
# clients. (2) The training step of one trainer (one libtorch thread) with replay at ratio 0.5
# from a local buffer vs from a buffer rank (mpirun -np 2 --num-remote-buffers 1), and without
# replay. Usage: launch/bench-buffer.sh [STEPS] [extra gfn args]   (default 3000 steps)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
steps="${1:-3000}"; shift || true
source launch/setup.sh
cargo build --release --locked --quiet --bin gfn -p gfn-cli
cargo build --release --locked --quiet -p gfn-buffer --example throughput
echo "## Server throughput (loopback, batches of 16 trajectories, 8 samples taken per batch)"
target/release/examples/throughput 1,2,4,8 3 16
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
common=(train --set "train.steps=$steps" --set train.validate_every=0 --set train.checkpoint_every=0
        --set train.eval_samples=1000 --set train.threads=1 --set replay.ratio=0.5 --device cpu "$@")
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to core -x OMP_NUM_THREADS=1)
# Interleaved repetitions: this machine's speed drifts by more than the effect measured.
for rep in 1 2 3; do
  "${mpi[@]}" -np 1 target/release/gfn "${common[@]}" --out "$out/none$rep" >/dev/null 2>&1
  "${mpi[@]}" -np 1 target/release/gfn "${common[@]}" --set replay.capacity=10000 --out "$out/local$rep" >/dev/null 2>&1
  "${mpi[@]}" -np 2 target/release/gfn "${common[@]}" --num-remote-buffers 1 --out "$out/remote$rep" >/dev/null 2>&1
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [("none", "no replay"), ("local", "local replay buffer"), ("remote", "buffer rank (remote)")]
s = {k: [json.load(open(f"{sys.argv[1]}/{k}{r}/summary.json")) for r in (1, 2, 3)] for k, _ in runs}
rate = {k: statistics.median(x["steps_per_s"] for x in s[k]) for k, _ in runs}
print("\n## Training step, one trainer, 4x8 TB, batch 16 (+8 replayed); median of 3 interleaved runs")
print("| replay | steps/s | ms/step | exact TV (run 1) |")
print("|---|---:|---:|---:|")
for k, name in runs:
    print(f"| {name} | {rate[k]:.1f} | {1e3 / rate[k]:.3f} | {s[k][0]['exact_tv']:.4f} |")
pairs = [s["local"][i]["steps_per_s"] / s["remote"][i]["steps_per_s"] - 1 for i in range(3)]
r = s["remote"][0]
print(f"\nremote vs local replay: {100 * (rate['local'] / rate['remote'] - 1):+.1f}% step time "
      f"(pairwise: {', '.join(f'{100 * p:+.1f}%' for p in pairs)}); "
      f"{r['buffer_replayed']} trajectories replayed from the buffer rank, "
      f"{r['buffer_pushes_dropped']} pushes dropped")
PY
