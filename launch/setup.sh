#!/usr/bin/env bash
# Idempotent set-up: the project-local venv with the pinned torch (libtorch for tch), and the
# Debian packages the build needs. Takes seconds when everything is already in place.
# Source-able: after `source launch/setup.sh` the build environment is exported, and the caller's
# shell options are left as they were.
_gfn_saved_options="$(set +o)"
set -euo pipefail

GFN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="2.11.0"
VENV="${GFN_VENV:-$GFN_ROOT/.venv}"
# g++: gfn-core compiles its CPU attention against libtorch. libgloo-dev: the gloo backend
# (torchrun on CPUs).
APT_PACKAGES=(g++ libclang-dev libgloo-dev libopenmpi-dev openmpi-bin pkg-config)
# Debian's python3 needs python3-venv for `python3 -m venv`.
python3 -c 'import ensurepip' 2>/dev/null || APT_PACKAGES+=(python3-venv)

log() { printf '[setup] %s\n' "$*" >&2; }

missing_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing_apt+=("$pkg")
done
if ((${#missing_apt[@]})); then
  if [ "$(id -u)" = 0 ]; then
    log "installing Debian packages: ${missing_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
  else
    log "missing Debian packages; run as root:"
    log "  sudo apt-get update && sudo apt-get install -y ${missing_apt[*]}"
    exit 1
  fi
fi

venv_torch() { "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])' 2>/dev/null || true; }
if [ "$(venv_torch)" != "$TORCH_VERSION" ]; then
  log "creating $VENV with torch==$TORCH_VERSION (about a minute, 4.7 GB)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
  [ "$(venv_torch)" = "$TORCH_VERSION" ] || { log "torch $TORCH_VERSION did not install into $VENV"; exit 1; }
fi

# cudarc's NCCL loader asks for libnccl.so; the wheel ships only libnccl.so.2.
nccl_dir="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/nccl/lib 2>/dev/null | head -n1 || true)"
if [ -n "$nccl_dir" ] && [ -e "$nccl_dir/libnccl.so.2" ] && [ ! -e "$nccl_dir/libnccl.so" ]; then
  ln -s libnccl.so.2 "$nccl_dir/libnccl.so"
fi

export LIBTORCH_USE_PYTORCH=1
export PATH="$VENV/bin:$PATH"
export GFN_ROOT
eval "$_gfn_saved_options"
unset _gfn_saved_options
