#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up (idempotent), then every test of the workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
# The srun tests need a Slurm cluster: as root, start a one-node one here.
if [ "$(id -u)" = 0 ]; then
  launch/local-slurm.sh >/dev/null
  export GFN_TEST_SLURM=1
else
  echo "[test] not root: the srun tests will report that they need launch/local-slurm.sh (as root)" >&2
fi
cargo test --release --locked --workspace "$@"
