#!/usr/bin/env bash
# Data-parallel scaling on this machine: the same per-rank batch with 1 and 2 ranks, one
# libtorch thread per rank, under mpirun (MPI) and under torchrun (gloo). The four runs alternate
# REPEATS times (a VM's speed drifts by a few percent between runs) and the tables give medians
# and ranges: steps/s, trajectories/s, the gradient collectives' time per step, the wait for the
# slowest rank, and the scaling of each 1-rank/2-rank pair.
# Then torchgfn 2.4.1's own tutorials/examples/train_hypergrid_ddp.py under torchrun (gloo), once
# with 1 and once with 2 ranks, at our settings (4x8, TB, 16 trajectories per rank and step, the
# same number of steps, MLPs of 2 hidden layers of 256, on-policy, no buffer ranks), against one
# gfn run each: wall time, trajectories/s and the final L1 of 200000 samples (torchgfn's
# l1_dist; ours is the same quantity). Its trajectories/s leave out the two validations it runs
# (at iteration 0 and the last), as ours leave out evaluation.
# Usage: launch/bench-ddp.sh [STEPS [REPEATS]] [extra gfn args]
#   (default 2000 steps, 3 repeats; extra gfn args skip the torchgfn part, which would not match)
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
        --set train.threads=1 --device cpu)

elapsed() { awk -v start="$1" -v now="$(date +%s.%N)" 'BEGIN { print now - start }'; }

# gfn under LAUNCHER (mpi | gloo) with RANKS ranks into DIR; wall seconds into DIR.wall.
gfn_run() {
  local launcher="$1" ranks="$2" dir="$3"; shift 3
  local start; start="$(date +%s.%N)"
  if [ "$launcher" = mpi ]; then
    mpirun --allow-run-as-root --oversubscribe --bind-to core -np "$ranks" -x OMP_NUM_THREADS=1 \
      target/release/gfn "${common[@]}" "$@" --out "$dir" >/dev/null 2>&1
  else
    torchrun --standalone --nproc-per-node="$ranks" --no-python \
      target/release/gfn "${common[@]}" "$@" --out "$dir" >/dev/null 2>&1
  fi
  elapsed "$start" > "$dir.wall"
}

for repeat in $(seq "$repeats"); do
  for launcher in mpi gloo; do
    for ranks in 1 2; do
      echo "repeat $repeat/$repeats: $launcher, $ranks rank(s), $steps steps" >&2
      gfn_run "$launcher" "$ranks" "$out/$launcher-r$ranks-$repeat" --set train.eval_samples=1000 "$@"
    done
  done
done

# torchgfn's script is not in its wheel: the tag's tutorials/ folder, from GitHub.
torchgfn_part=1
if (($#)); then
  torchgfn_part=0
  echo "[bench] extra gfn arguments given: skipping torchgfn's train_hypergrid_ddp.py" >&2
fi
ref="$root/.venv-ref"
tutorials="$ref/torchgfn-2.4.1"
if ((torchgfn_part)); then
  source launch/references/torchgfn-venv.sh
  torchgfn_venv
  if [ ! -f "$tutorials/tutorials/examples/train_hypergrid_ddp.py" ]; then
    echo "[bench] fetching torchgfn v2.4.1's tutorials/ from GitHub into $tutorials" >&2
    mkdir -p "$tutorials"
    curl -sSfL https://github.com/GFNOrg/torchgfn/archive/refs/tags/v2.4.1.tar.gz |
      tar -xz -C "$tutorials" --strip-components=1 torchgfn-2.4.1/tutorials
  fi
  for ranks in 1 2; do
    echo "torchgfn train_hypergrid_ddp.py: torchrun, $ranks rank(s), $steps steps" >&2
    start="$(date +%s.%N)"
    (cd "$tutorials" && OMP_NUM_THREADS=1 PYTHONPATH="$tutorials" "$ref/torchgfn/bin/python" -m torch.distributed.run \
      --standalone --nproc-per-node="$ranks" tutorials/examples/train_hypergrid_ddp.py \
      --no_cuda --ndim 4 --height 8 --loss TB --batch_size $((16 * ranks)) \
      --n_trajectories $((16 * ranks * steps)) --n_hidden 2 --hidden_dim 256 \
      --num_remote_buffers 0 --replay_buffer_size 0 --validate_environment \
      --validation_interval "$steps" --validation_samples 200000 --timing --wandb_project "" \
      > "$out/torchgfn-r$ranks.log" 2>&1)
    elapsed "$start" > "$out/torchgfn-r$ranks.wall"
    echo "gfn: torchrun, $ranks rank(s), $steps steps, final evaluation of 200000 samples" >&2
    gfn_run gloo "$ranks" "$out/final-r$ranks" --set train.eval_samples=200000
  done
fi

python3 - "$out" "$repeats" "$torchgfn_part" <<'PY'
import ast, json, re, statistics, sys
out, repeats, torchgfn_part = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
def load(name):
    s = json.load(open(f"{out}/{name}/summary.json"))
    s["wall"] = float(open(f"{out}/{name}.wall").read())
    return s
def traj(s):
    return s["trajectories"] / s["steps"] * s["steps_per_s"]
def spread(values, fmt):
    values = sorted(values)
    median = statistics.median(values)
    if format(values[0], fmt) == format(values[-1], fmt):
        return format(median, fmt)
    return f"{median:{fmt}} ({values[0]:{fmt}}–{values[-1]:{fmt}})"
print(f"medians (ranges) over {repeats} alternating runs each")
for launcher, title in (("mpi", "mpirun, MPI"), ("gloo", "torchrun, gloo")):
    runs = {r: [load(f"{launcher}-r{r}-{k}") for k in range(1, repeats + 1)] for r in (1, 2)}
    print(f"\n{title}\n")
    print("| ranks | backend | steps/s | trajectories/s | all-reduce ms/step | share of a step | waiting for the slowest rank, ms/step | share of a step |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in (1, 2):
        rs = runs[r]
        reduce = [s["time_all_reduce_ms_per_step"] for s in rs]
        wait = [s["time_rank_wait_ms_per_step"] for s in rs]
        step_ms = [1e3 / s["steps_per_s"] for s in rs]
        print(f"| {r} | {rs[0]['backend']} | {spread([s['steps_per_s'] for s in rs], '.1f')} "
              f"| {spread([traj(s) for s in rs], '.0f')} "
              f"| {spread(reduce, '.3f')} | {spread([100 * a / b for a, b in zip(reduce, step_ms)], '.1f')} % "
              f"| {spread(wait, '.3f')} | {spread([100 * a / b for a, b in zip(wait, step_ms)], '.1f')} % |")
    ratios = [traj(b) / traj(a) for a, b in zip(runs[1], runs[2])]
    print(f"\n2 ranks: {spread(ratios, '.2f')}x the trajectories/s of 1, pair by pair "
          f"(scaling efficiency {50 * statistics.median(ratios):.0f}%)")
if not torchgfn_part:
    sys.exit()
def torchgfn(r):
    log = open(f"{out}/torchgfn-r{r}.log").read()
    done = re.search(r"Training complete, logs: (\{.*\})", log)
    if done is None:
        sys.exit(f"torchgfn with {r} rank(s) did not finish; its output:\n{log[-3000:]}")
    timing = dict(re.findall(r"INFO - (\w+)\s+([0-9.]+)s$", log, re.M))
    train_s = float(timing["total_time"]) - float(timing.get("validation", 0))
    steps = int(re.search(r"n_iterations = (\d+)", log).group(1))
    return {"wall": float(open(f"{out}/torchgfn-r{r}.wall").read()), "l1": ast.literal_eval(done.group(1))["l1_dist"],
            "traj_s": steps * 16 * r / train_s}
print("\ntorchgfn 2.4.1's train_hypergrid_ddp.py and gfn under torchrun (gloo), one run each\n")
print("| ranks | program | wall s | trajectories/s | final L1 (200000 samples) | gfn's trajectories/s over torchgfn's |")
print("|---:|---|---:|---:|---:|---:|")
for r in (1, 2):
    t, g = torchgfn(r), load(f"final-r{r}")
    print(f"| {r} | torchgfn | {t['wall']:.1f} | {t['traj_s']:.0f} | {t['l1']:.3f} | |")
    print(f"| {r} | gfn | {g['wall']:.1f} | {traj(g):.0f} | {g['l1']:.3f} | {traj(g) / t['traj_s']:.1f}x |")
PY
