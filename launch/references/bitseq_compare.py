"""Reads one gfnx tb_bitseq.py log and one `gfn train` run directory, trained on the same
setting for the same number of steps, and prints a markdown row each: steps/s past compilation
(gfnx: from its progress marks between step 20 and the last mark before the evaluation at step
1000, which exclude compilation and evaluations; ours: the summary's training steps/s, which
excludes evaluations), and the modes found and test-set Spearman at the last step.
Usage: bitseq_compare.py GFNX_LOG GFN_RUN_DIR STEPS"""

import json
import re
import sys

log_path, run_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = open(log_path).read().replace("\r", "\n")

marks = []
for n, total, clock in re.findall(r"(\d+)/(\d+) \[((?:\d+:)?\d+:\d+)", text):
    if int(total) != steps:
        continue
    parts = [int(p) for p in clock.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    marks.append((int(n), seconds))
window = [(n, s) for n, s in marks if 20 <= n < min(1000, steps)]
(n0, s0), (n1, s1) = window[0], window[-1]
gfnx_rate = (n1 - n0) / (s1 - s0)

evals = re.findall(r"\{'eval/[^}]*\}", text)
last = dict(re.findall(r"'eval/([^']+)': ([-0-9.eE]+)", evals[-1]))
gfnx_modes, gfnx_spearman = float(last["modes/num_modes"]), float(last["correlation/spearman"])

summary = json.load(open(f"{run_dir}/summary.json"))
ours_rate, ours_modes, ours_spearman = summary["steps_per_s"], summary["modes_found"], summary["spearman"]

print("| implementation | steps/s (past compilation) | modes found | Spearman |")
print("|---|---:|---:|---:|")
print(f"| gfnx tb_bitseq.py | {gfnx_rate:.2f} | {gfnx_modes:.0f} | {gfnx_spearman:.4f} |")
print(f"| gfn train | {ours_rate:.2f} | {ours_modes} | {ours_spearman:.4f} |")
print(f"| ratio | {ours_rate / gfnx_rate:.1f}x | | |")
