# Sourced by the benchmark scripts: makes sure $root/.venv-ref/torchgfn holds torchgfn 2.4.1
# (reusing the project's pinned torch rather than downloading a second copy) and what its
# example scripts import (mpi4py, matplotlib, tqdm).
torchgfn_venv() {
  local venv="$root/.venv-ref/torchgfn" site
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import gfn.utils.distributed, matplotlib, tqdm' 2>/dev/null; then
    return
  fi
  echo "[bench] installing torchgfn 2.4.1 and its example scripts' imports into $venv" >&2
  python3 -m venv "$venv"
  site="$(ls -d "$venv"/lib/python3*/site-packages)"
  ls -d "$root"/.venv/lib/python3*/site-packages > "$site/project-torch.pth"
  "$venv/bin/pip" install -q torchgfn==2.4.1 mpi4py==4.1.1 matplotlib==3.10.7 tqdm==4.67.1
}
