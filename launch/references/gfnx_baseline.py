"""Runs one of gfnx's own baselines (e.g. `tb_hypergrid.py`, `tb_bitseq.py`, from the gfnx sdist
on PyPI) unchanged, with `jax.tree_map` aliased to `jax.tree.map` (gfnx 0.0.1 still calls it;
current JAX removed it).
Usage: gfnx_baseline.py BASELINES_DIR SCRIPT [hydra overrides...]. bench-references.sh times the
process from outside, or reads the script's own progress lines."""

import os
import runpy
import sys

import jax

if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map

baselines, name, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
script = os.path.join(baselines, name)
sys.path.insert(0, baselines)  # the script imports its `utils` package
sys.argv = [script, *overrides]
runpy.run_path(script, run_name="__main__")
