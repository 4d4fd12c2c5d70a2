#!/usr/bin/env bash
# Times gfn-rs against the reference implementations on the same settings, in one invocation, and
# prints steps/s, trajectories/s and the ratios:
#   - torchgfn 2.4.1 (PyPI): separate P_F and P_B MLPs, so ours runs with model.backward=learned;
#   - gfnx (PyPI), jitted: one MLP with forward and backward heads, so ours runs with
#     model.backward=tied (the same FLOPs per state).
# Then, at 4x8 (batch 16 and 128), the whole training programs at their own defaults: gfnx's
# `baselines/tb_hypergrid.py` (from the gfnx sdist on PyPI, run unchanged) against `gfn train`,
# both evaluating every 500 steps; steps/s = (2000 - 500) / (wall time of a 2000-step run minus
# that of a 500-step run), which cancels start-up and JAX's compilation. torchgfn's example
# scripts are not on PyPI, so it has only the step loop.
# Last, bitseq (n = 120, k = 8, 60 modes, beta = 3, batch 16, epsilon = 1e-3, Transformer of 3
# layers, 8 heads, width 64): gfnx's `baselines/tb_bitseq.py`, unchanged (Hydra overrides
# only), against `gfn train --config configs/gfnx/bitseq-120x8-tb.toml`, 2000 steps each with
# evaluations at 1000 and 2000 (gfnx also at 0): steps/s past compilation, modes found and
# test-set Spearman at the last step (launch/references/bitseq_compare.py).
# Usage: launch/bench-references.sh [SECONDS_PER_SETTING] [--bitseq-only | --hypergrid-only]
#   (default 5 seconds; the bitseq part alone takes about 40 minutes)
# The reference venvs live in .venv-ref/ (created on first use; torchgfn reuses the project's torch).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${1:-5}"
part="${2:-all}"
case "$part" in
  all | --bitseq-only | --hypergrid-only) ;;
  *) echo "bench-references.sh: unknown part '$part' (expected --bitseq-only or --hypergrid-only)" >&2; exit 2 ;;
esac
source launch/setup.sh
cargo build --release --locked --quiet --bin gfn

ref="$root/.venv-ref"
source launch/references/torchgfn-venv.sh
torchgfn_venv
if [ ! -x "$ref/gfnx/bin/python" ] || ! "$ref/gfnx/bin/python" -c 'import gfnx' 2>/dev/null; then
  echo "[bench] installing gfnx into $ref/gfnx" >&2
  python3 -m venv "$ref/gfnx"
  "$ref/gfnx/bin/pip" install -q gfnx==0.0.1 equinox==0.13.8 optax==0.2.8 jax==0.6.2 jaxlib==0.6.2
fi
if ! "$ref/gfnx/bin/python" -c 'import hydra' 2>/dev/null; then
  "$ref/gfnx/bin/pip" install -q hydra-core==1.3.2
fi
baselines="$ref/gfnx-0.0.1/baselines"
if [ ! -f "$baselines/tb_hypergrid.py" ]; then
  echo "[bench] fetching gfnx's baselines from its sdist into $ref" >&2
  "$ref/gfnx/bin/pip" download -q --no-deps --no-binary :all: gfnx==0.0.1 -d "$ref"
  tar -xzf "$ref/gfnx-0.0.1.tar.gz" -C "$ref"
fi

results="$(mktemp)"
scratch="$(mktemp -d)"
trap 'rm -rf "$results" "$results".json "$scratch"' EXIT

bitseq() {
  local steps=2000
  echo "[bench] bitseq: gfnx tb_bitseq.py, $steps steps (about half an hour)" >&2
  (cd "$scratch" && "$ref/gfnx/bin/python" "$root/launch/references/gfnx_baseline.py" "$baselines" tb_bitseq.py \
    num_train_steps="$steps" logging.use_writer=false logging.eval_each=1000 logging.tqdm_print_rate=20 \
    hydra.run.dir="$scratch/gfnx-bitseq") >"$scratch/gfnx-bitseq.log" 2>&1
  echo "[bench] bitseq: gfn train, $steps steps" >&2
  target/release/gfn train --config configs/gfnx/bitseq-120x8-tb.toml --out "$scratch/gfn-bitseq" \
    --set train.steps="$steps" --set train.validate_every=1000 >/dev/null 2>&1
  echo
  python3 launch/references/bitseq_compare.py "$scratch/gfnx-bitseq.log" "$scratch/gfn-bitseq" "$steps"
}
if [ "$part" = --bitseq-only ]; then
  bitseq
  exit 0
fi

for setting in "4 8 16" "4 8 128" "2 64 16" "2 64 128"; do
  read -r dim height batch <<<"$setting"
  echo "[bench] ${dim}x${height} batch ${batch}" >&2
  for backward in learned tied; do
    target/release/gfn bench --env "hypergrid:dim=${dim},height=${height}" --batches "$batch" --losses tb --seconds "$seconds" \
      --set "model.backward=$backward" --json "$results.json" >/dev/null 2>&1
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))[0]; r["impl"]="gfn-rs/"+sys.argv[2]; r["grid"]=sys.argv[3]; print(json.dumps(r))' "$results.json" "$backward" "${dim}x${height}" >>"$results"
  done
  "$ref/torchgfn/bin/python" launch/references/torchgfn_hypergrid.py --dim "$dim" --height "$height" --batch "$batch" --seconds "$seconds" 2>/dev/null | tail -n1 >>"$results"
  "$ref/gfnx/bin/python" launch/references/gfnx_tb_hypergrid.py --dim "$dim" --height "$height" --batch "$batch" --seconds "$seconds" 2>/dev/null | tail -n1 >>"$results"
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by = {}
for r in rows:
    by.setdefault((r["grid"], r["batch"]), {})[r["impl"]] = r
print("| grid | batch | gfn-rs learned P_B | torchgfn | ratio | gfn-rs tied P_B | gfnx | ratio |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for (grid, batch), impls in by.items():
    def cell(name):
        r = impls.get(name)
        return (r["steps_per_s"], r["trajectories_per_s"]) if r else (float("nan"), float("nan"))
    ours_l, torch_, ours_t, jax_ = cell("gfn-rs/learned"), cell("torchgfn"), cell("gfn-rs/tied"), cell("gfnx")
    fmt = lambda c: f"{c[0]:.1f} steps/s ({c[1]:.0f} traj/s)"
    print(f"| {grid} | {batch} | {fmt(ours_l)} | {fmt(torch_)} | {ours_l[0] / torch_[0]:.1f}x | {fmt(ours_t)} | {fmt(jax_)} | {ours_t[0] / jax_[0]:.1f}x |")
PY

# Whole programs: wall time of a run of N steps, for N = 500 and 2000.
wall() {  # wall IMPL BATCH STEPS -> seconds
  local impl="$1" batch="$2" steps="$3" start end
  rm -rf "$scratch/run"
  start="$(date +%s.%N)"
  if [ "$impl" = gfnx ]; then
    (cd "$scratch" && "$ref/gfnx/bin/python" "$root/launch/references/gfnx_baseline.py" "$baselines" tb_hypergrid.py \
      environment.dim=4 environment.side=8 num_envs="$batch" num_train_steps="$steps" \
      logging.use_writer=false hydra.run.dir="$scratch/run" >/dev/null 2>&1)
  else
    target/release/gfn train --out "$scratch/run" --set env.preset=easy --set model.backward=tied \
      --set sampling.batch_size="$batch" --set train.steps="$steps" >/dev/null 2>&1
  fi
  end="$(date +%s.%N)"
  python3 -c "print($end - $start)"
}
echo
echo "| batch | gfn train | gfnx tb_hypergrid.py | ratio |"
echo "|---:|---:|---:|---:|"
declare -A rate
for batch in 16 128; do
  echo "[bench] whole programs, 4x8 batch ${batch}" >&2
  for impl in gfn gfnx; do
    short="$(wall "$impl" "$batch" 500)"
    long="$(wall "$impl" "$batch" 2000)"
    rate[$impl]="$(python3 -c "print(1500 / ($long - $short))")"
  done
  python3 -c "
ours, theirs, b = ${rate[gfn]}, ${rate[gfnx]}, $batch
cell = lambda r: f'{r:.1f} steps/s ({r * b:.0f} traj/s)'
print(f'| {b} | {cell(ours)} | {cell(theirs)} | {ours / theirs:.1f}x |')"
done

[ "$part" = --hypergrid-only ] || bitseq
