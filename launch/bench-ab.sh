#!/usr/bin/env bash
# `gfn bench` of an earlier commit against the working tree's binary, alternated ROUNDS times in
# one invocation (this VM's speed drifts by more than most changes), with medians per setting.
# Both binaries run `gfn bench` at its defaults (HyperGrid 4x8 and 2x64, batches 16 and 128,
# TB/DB/SubTB), which earlier commits share.
# Usage: launch/bench-ab.sh REV [ROUNDS]   (default 3 rounds; about 90 s a round)
# The earlier binary is built in a git worktree under target/ab/ (the first time from a copy of
# target/release, so only the workspace's own crates compile).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rev="$(git rev-parse --short "${1:?usage: launch/bench-ab.sh REV [ROUNDS]}")"
rounds="${2:-3}"
source launch/setup.sh
cargo build --release --locked --quiet --bin gfn

ab="$root/target/ab"
tree="$ab/tree-$rev"
if [ ! -d "$tree" ]; then
  mkdir -p "$ab"
  git worktree add --detach "$tree" "$rev" >/dev/null
fi
if [ ! -d "$ab/target" ]; then
  mkdir -p "$ab/target"
  cp -a target/release "$ab/target/release"
fi
echo "[ab] building $rev" >&2
(cd "$tree" && CARGO_TARGET_DIR="$ab/target" cargo build --release --locked --quiet --bin gfn)
cp "$ab/target/release/gfn" "$ab/gfn-$rev"

results="$(mktemp -d)"
trap 'rm -rf "$results"' EXIT
for round in $(seq "$rounds"); do
  echo "[ab] round $round/$rounds: $rev" >&2
  "$ab/gfn-$rev" bench --json "$results/before-$round.json" >/dev/null 2>&1
  echo "[ab] round $round/$rounds: working tree" >&2
  target/release/gfn bench --json "$results/after-$round.json" >/dev/null 2>&1
done

python3 - "$results" "$rounds" "$rev" <<'PY'
import json, statistics, sys
results, rounds, rev = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def runs(kind):
    per_round = [json.load(open(f"{results}/{kind}-{r}.json")) for r in range(1, rounds + 1)]
    return list(zip(*per_round))  # one tuple of rows per setting, in bench order
before, after = runs("before"), runs("after")
med = lambda rows, field: statistics.median(r[field] for r in rows)
print(f"before = {rev}; medians of {rounds} alternating rounds")
print("| env | batch | loss | steps/s before | steps/s | trajectories/s | sample ms/step (before) | update ms/step (before) | change |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
for old, new in zip(before, after):
    a, b = med(old, "steps_per_s"), med(new, "steps_per_s")
    print(f"| {new[0]['env']} | {new[0]['batch']} | {new[0]['loss']} | {a:.1f} | {b:.1f} "
          f"| {med(new, 'trajectories_per_s'):.0f} | {med(new, 'sample_ms'):.2f} ({med(old, 'sample_ms'):.2f}) "
          f"| {med(new, 'update_ms'):.2f} ({med(old, 'update_ms'):.2f}) | {100 * (b / a - 1):+.0f}% |")
print("steps/s per round, before:", [[round(r["steps_per_s"]) for r in rows] for rows in before])
print("steps/s per round, after: ", [[round(r["steps_per_s"]) for r in rows] for rows in after])
PY
