"""The built-in demo (no downloads).

Until the full SFT -> reward model -> PPO pipeline lands, this runs PPO built from the public math
core on a tabular token policy: sample responses, score them, shape rewards with a KL penalty
against the frozen initial policy, run GAE and whitening, and update with the clipped loss.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import optax

import rlhf_jax as rj

VOCAB, LENGTH, BATCH, STOP, PAD, GOOD = 8, 12, 64, 1, 0, 5
optimizer = optax.adam(0.05)


def _logits(table: jax.Array) -> jax.Array:
    return jnp.broadcast_to(table, (BATCH, LENGTH, VOCAB))


def _iteration(carry, key):
    table, ref_table, opt_state = carry
    responses = jax.random.categorical(key, _logits(table))
    responses, lengths = rj.truncate_after_stop(responses, STOP, PAD)
    mask = rj.response_mask(lengths, LENGTH)
    old_logp = jnp.where(mask, rj.selective_log_softmax(_logits(table), responses), 1.0)
    ref_logp = jnp.where(mask, rj.selective_log_softmax(_logits(ref_table), responses), 1.0)
    scores = jnp.sum((responses == GOOD) & mask, axis=1) / LENGTH
    rewards, kl = rj.shape_rewards(scores, old_logp, ref_logp, lengths, kl_coef=0.05)
    advantages, _ = rj.gae(
        jnp.where(mask, rewards, 0.0), jnp.zeros_like(rewards), gamma=1.0, lam=0.95
    )
    advantages = jnp.where(mask, rj.masked_whiten(advantages, mask), 0.0)

    def loss_fn(t):
        logp = rj.selective_log_softmax(_logits(t), responses)
        return rj.ppo_policy_loss(logp, old_logp, advantages, mask)[0]

    grads = jax.grad(loss_fn)(table)
    updates, opt_state = optimizer.update(grads, opt_state, table)
    table = optax.apply_updates(table, updates)
    metrics = {"score": scores.mean(), "kl": rj.masked_sum(kl, mask) / BATCH}
    return (table, ref_table, opt_state), metrics


def run_demo(out_dir: str = "demo_out", seed: int = 0, iterations: int = 200) -> dict:
    """Trains the tabular policy and writes `summary.json` into `out_dir`."""
    table = jnp.zeros((VOCAB,)).at[STOP].set(1.0)
    carry = (table, table, optimizer.init(table))
    keys = jax.random.split(jax.random.key(seed), iterations)
    _, metrics = jax.jit(lambda c, k: jax.lax.scan(_iteration, c, k))(carry, keys)
    first = {k: float(v[:10].mean()) for k, v in metrics.items()}
    last = {k: float(v[-10:].mean()) for k, v in metrics.items()}
    print(f"{'':10s}{'score':>10s}{'kl':>10s}")
    print(f"{'before':10s}{first['score']:10.3f}{first['kl']:10.3f}")
    print(f"{'after':10s}{last['score']:10.3f}{last['kl']:10.3f}")
    os.makedirs(out_dir, exist_ok=True)
    summary = {"before": first, "after": last}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
