#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up (idempotent), then every test of the workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
cargo test --release --locked --workspace "$@"
