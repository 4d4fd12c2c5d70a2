"""Times torchgfn (PyPI 2.4.1) on HyperGrid the way its hypergrid example trains: KHot input,
MLP(256, 2 hidden layers) for P_F and P_B, Adam (lr 1e-3, log Z 0.1), on-policy sampling with
saved log-probs. Prints one JSON line: steps/s and trajectories/s."""

import argparse
import json
import time

import torch
from gfn.estimators import DiscretePolicyEstimator, ScalarEstimator
from gfn.gflownet import DBGFlowNet, SubTBGFlowNet, TBGFlowNet
from gfn.gym import HyperGrid
from gfn.preprocessors import KHotPreprocessor
from gfn.utils.modules import MLP

parser = argparse.ArgumentParser()
parser.add_argument("--dim", type=int, default=4)
parser.add_argument("--height", type=int, default=8)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--loss", choices=["tb", "db", "subtb"], default="tb")
parser.add_argument("--warmup", type=int, default=10)
parser.add_argument("--seconds", type=float, default=5.0)
args = parser.parse_args()

torch.manual_seed(0)
env = HyperGrid(ndim=args.dim, height=args.height)
pre = KHotPreprocessor(height=args.height, ndim=args.dim)
pf = DiscretePolicyEstimator(MLP(pre.output_dim, env.n_actions), env.n_actions, preprocessor=pre)
pb = DiscretePolicyEstimator(MLP(pre.output_dim, env.n_actions - 1), env.n_actions, preprocessor=pre, is_backward=True)
if args.loss == "tb":
    gfn = TBGFlowNet(pf=pf, pb=pb)
else:
    log_f = ScalarEstimator(MLP(pre.output_dim, 1), preprocessor=pre)
    gfn = DBGFlowNet(pf=pf, pb=pb, logF=log_f) if args.loss == "db" else SubTBGFlowNet(pf=pf, pb=pb, logF=log_f)
named = dict(gfn.named_parameters())
params = [{"params": [v for k, v in named.items() if "logZ" not in k], "lr": 1e-3}]
if "logZ" in named:
    params.append({"params": [named["logZ"]], "lr": 0.1})
optimizer = torch.optim.Adam(params, weight_decay=1e-4)


def step():
    trajectories = gfn.sample_trajectories(env, n=args.batch, save_logprobs=True)
    training_samples = gfn.to_training_samples(trajectories)
    optimizer.zero_grad()
    loss = gfn.loss(env, training_samples, recalculate_all_logprobs=False)
    loss.backward()
    optimizer.step()


for _ in range(args.warmup):
    step()
steps, start = 0, time.perf_counter()
while time.perf_counter() - start < args.seconds or steps < 3:
    step()
    steps += 1
elapsed = time.perf_counter() - start
print(json.dumps({"impl": "torchgfn", "grid": f"{args.dim}x{args.height}", "batch": args.batch, "loss": args.loss,
                  "steps_per_s": steps / elapsed, "trajectories_per_s": steps * args.batch / elapsed}))
