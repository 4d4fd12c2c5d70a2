#!/usr/bin/env bash
# Times gfn-rs against the reference implementations on the same settings, in one invocation, and
# prints steps/s, trajectories/s and the ratios:
#   - torchgfn 2.4.1 (PyPI): separate P_F and P_B MLPs, so ours runs with model.backward=learned;
#   - gfnx (PyPI), jitted: one MLP with forward and backward heads, so ours runs with
#     model.backward=tied (the same FLOPs per state).
# Usage: launch/bench-references.sh [SECONDS_PER_SETTING]   (default 5)
# The reference venvs live in .venv-ref/ (created on first use; torchgfn reuses the project's torch).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${1:-5}"
source launch/setup.sh
cargo build --release --locked --quiet --bin gfn

ref="$root/.venv-ref"
if [ ! -x "$ref/torchgfn/bin/python" ] || ! "$ref/torchgfn/bin/python" -c 'import gfn' 2>/dev/null; then
  echo "[bench] installing torchgfn 2.4.1 into $ref/torchgfn" >&2
  python3 -m venv "$ref/torchgfn"
  site="$(ls -d "$ref"/torchgfn/lib/python3*/site-packages)"
  # Reuse the project's pinned torch rather than downloading a second copy.
  ls -d "$root"/.venv/lib/python3*/site-packages > "$site/project-torch.pth"
  "$ref/torchgfn/bin/pip" install -q torchgfn==2.4.1
fi
if [ ! -x "$ref/gfnx/bin/python" ] || ! "$ref/gfnx/bin/python" -c 'import gfnx' 2>/dev/null; then
  echo "[bench] installing gfnx into $ref/gfnx" >&2
  python3 -m venv "$ref/gfnx"
  "$ref/gfnx/bin/pip" install -q gfnx==0.0.1 equinox==0.13.8 optax==0.2.8 jax==0.6.2 jaxlib==0.6.2
fi

results="$(mktemp)"
trap 'rm -f "$results" "$results".json' EXIT
for setting in "4 8 16" "4 8 128" "2 64 16" "2 64 128"; do
  read -r dim height batch <<<"$setting"
  echo "[bench] ${dim}x${height} batch ${batch}" >&2
  for backward in learned tied; do
    target/release/gfn bench --grids "${dim}x${height}" --batches "$batch" --losses tb --seconds "$seconds" \
      --set "model.backward=$backward" --json "$results.json" >/dev/null 2>&1
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))[0]; r["impl"]="gfn-rs/"+sys.argv[2]; print(json.dumps(r))' "$results.json" "$backward" >>"$results"
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
