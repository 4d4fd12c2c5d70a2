"""Times gfnx (PyPI) on HyperGrid with trajectory balance, set up like gfnx's `tb_hypergrid`
baseline: one jitted step = forward rollout + TB loss + Adam (optax; lr 1e-3, log Z 0.1), MLP of
width 256 and depth 2 (equinox) giving forward and backward logits. Prints one JSON line."""

import argparse
import json
import time

import jax

# gfnx 0.0.1 still calls jax.tree_map, which current JAX removed.
if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map

import equinox as eqx
import gfnx
import jax.numpy as jnp
import optax

parser = argparse.ArgumentParser()
parser.add_argument("--dim", type=int, default=4)
parser.add_argument("--height", type=int, default=8)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--warmup", type=int, default=10)
parser.add_argument("--seconds", type=float, default=5.0)
args = parser.parse_args()

env = gfnx.environment.HypergridEnvironment(gfnx.GeneralHypergridRewardModule(R0=0.1, R1=0.5, R2=2.0), dim=args.dim, side=args.height)
env_params = env.init(jax.random.PRNGKey(1))
n_fwd, n_bwd = env.action_space.n, env.backward_action_space.n
key, init_key = jax.random.split(jax.random.PRNGKey(0))
net = eqx.nn.MLP(env.observation_space.shape[0], n_fwd + n_bwd, 256, 2, key=init_key)
params = {"net": eqx.filter(net, eqx.is_array), "log_z": jnp.array(0.0)}
static = eqx.partition(net, eqx.is_array)[1]
optimizer = optax.multi_transform(
    {"net": optax.adam(1e-3), "log_z": optax.adam(0.1)}, {"net": "net", "log_z": "log_z"}
)
opt_state = optimizer.init(params)


def logits_of(net_params, obs):
    return jax.vmap(eqx.combine(net_params, static))(obs)


def policy_fn(_key, obs, net_params):
    out = logits_of(net_params, obs)
    return out[:, :n_fwd], {}


def over_time(fn, states):
    """Applies a batched env function at every time step of [B, L, ...] states."""
    swapped = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), states)
    return jnp.swapaxes(jax.vmap(fn, in_axes=(0, None))(swapped, env_params), 0, 1)


def tb_loss(p, traj):
    out = jax.vmap(lambda o: logits_of(p["net"], o))(traj.obs)
    fwd = gfnx.utils.mask_logits(out[..., :n_fwd], over_time(env.get_invalid_mask, traj.state))
    log_pf = jnp.take_along_axis(jax.nn.log_softmax(fwd), traj.action[..., None], -1)[..., 0]
    log_pf = jnp.where(traj.pad, 0.0, log_pf).sum(1)
    later = jax.tree.map(lambda x: x[:, 1:], traj.state)
    earlier = jax.tree.map(lambda x: x[:, :-1], traj.state)
    bwd_actions = jax.vmap(jax.vmap(lambda s, a, n: env.get_backward_action(s, a, n, env_params)))(later, traj.action[:, :-1], earlier)
    bwd = gfnx.utils.mask_logits(out[:, 1:, n_fwd:], over_time(env.get_invalid_backward_mask, later))
    log_pb = jnp.take_along_axis(jax.nn.log_softmax(bwd), bwd_actions[..., None], -1)[..., 0]
    pad = traj.pad[:, :-1]
    target = jnp.where(pad, 0.0, log_pb + traj.log_gfn_reward[:, :-1]).sum(1)
    return jnp.mean((p["log_z"] + log_pf - target) ** 2)


@jax.jit
def train_step(carry, _):
    p, state, key = carry
    key, rollout_key = jax.random.split(key)
    traj, _ = gfnx.utils.forward_rollout(rollout_key, args.batch, policy_fn, p["net"], env, env_params)
    loss, grads = jax.value_and_grad(tb_loss)(p, traj)
    updates, state = optimizer.update(grads, state, p)
    return (optax.apply_updates(p, updates), state, key), loss


carry = (params, opt_state, key)
for _ in range(args.warmup):
    carry, loss = train_step(carry, None)
jax.block_until_ready(loss)
steps, start = 0, time.perf_counter()
while time.perf_counter() - start < args.seconds or steps < 3:
    carry, loss = train_step(carry, None)
    jax.block_until_ready(loss)
    steps += 1
elapsed = time.perf_counter() - start
print(json.dumps({"impl": "gfnx", "grid": f"{args.dim}x{args.height}", "batch": args.batch, "loss": "tb",
                  "steps_per_s": steps / elapsed, "trajectories_per_s": steps * args.batch / elapsed}))
