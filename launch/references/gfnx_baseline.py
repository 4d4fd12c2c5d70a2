"""Runs gfnx's own `baselines/tb_hypergrid.py` (from the gfnx sdist on PyPI) unchanged, with
`jax.tree_map` aliased to `jax.tree.map` (gfnx 0.0.1 still calls it; current JAX removed it).
Usage: gfnx_baseline.py BASELINES_DIR [hydra overrides...]; prints the wall time of the whole
run as one JSON line on stdout (compilation included: the caller takes differences of runs)."""

import json
import os
import runpy
import sys
import time

import jax

if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map

baselines, overrides = sys.argv[1], sys.argv[2:]
script = os.path.join(baselines, "tb_hypergrid.py")
sys.path.insert(0, baselines)  # the script imports its `utils` package
sys.argv = [script, *overrides]
start = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:  # hydra exits after the run
    if e.code not in (None, 0):
        raise
print(json.dumps({"wall_s": time.perf_counter() - start}))
