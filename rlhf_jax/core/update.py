"""The update of every RL algorithm: epochs x minibatches x micro-batches as nested `lax.scan`s.

Each epoch visits the batch in a fresh random order; each minibatch is one optimiser step on the
mean gradient of its `gradient_accumulation_steps` micro-batches; a step whose loss or gradients
are not finite is skipped. The loss of a micro-batch is the algorithm's policy loss
(`RLConfig.policy_objective`), plus `vf_coef` times the clipped value loss with a critic, minus
`entropy_coef` times the token entropy, plus `ptx_coef` times the language-modelling loss on a
pretraining batch (PPO-ptx). Only the trainable halves of the models (all of them without LoRA)
are differentiated, accumulated, optimised and carried through the loops.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import models
from rlhf_jax import sharding as sh
from rlhf_jax.core.config import RLConfig
from rlhf_jax.core.experience import Experience
from rlhf_jax.core.forward import (
    logprobs_from_response_hidden,
    response_hidden,
    value_estimates,
    values_from_hidden,
)
from rlhf_jax.core.state import (
    Optimizers,
    RLModels,
    RLState,
    default_optimizers,
    param_logical_axes,
)
from rlhf_jax.logprobs import logprobs_from_hidden
from rlhf_jax.losses import lm_loss, ppo_value_loss
from rlhf_jax.models import lora
from rlhf_jax.ops import masked_mean
from rlhf_jax.optim import accumulate_grads, apply_if_finite, scan_epochs, summarize_update
from rlhf_jax.sampling import prompt_positions

Params = Any

#: Policy-loss aux names -> metric names (TRL's where TRL has them).
_POLICY_METRICS = {
    "approx_kl": "policy/approxkl_avg",
    "clipfrac": "policy/clipfrac_avg",
    "dual_clipfrac": "policy/dual_clipfrac_avg",
    "ratio_mean": "val/ratio",
    "ratio_var": "val/ratio_var",
    "ratio_max": "val/ratio_max",
    "penalty_kl": "policy/penalty_kl",
    "kl_loss": "loss/kl_avg",
    "kl_mean": "policy/kl_avg",
}


class PtxBatch(NamedTuple):
    """Pretraining batch for PPO-ptx: `tokens`/`mask` `[N, S]` (N divisible by
    num_mini_batches x gradient_accumulation_steps); the LM loss covers tokens 1.. of each row
    where the mask is 1."""

    tokens: jax.Array
    mask: jax.Array


def ptx_loss(params: Params, config: models.ModelConfig, batch: PtxBatch) -> jax.Array:
    """Mean next-token negative log-likelihood of a `PtxBatch` under the policy."""
    tokens, mask = batch.tokens, batch.mask.astype(bool)
    hidden, _ = models.forward(params, config, tokens, prompt_positions(mask), mask)
    logprobs, _ = logprobs_from_hidden(
        hidden[:, :-1], tokens[:, 1:], lambda h: models.lm_logits(params, config, h)
    )
    return lm_loss(logprobs, mask[:, 1:] & mask[:, :-1])


def minibatch_token_scales(mask_AUT: jax.Array) -> jax.Array:
    """Per-micro-batch factors `[A]` that turn each micro-batch's token-mean loss into the token
    mean over the whole minibatch once the `A` micro-batch gradients are averaged (TRL's "dapo"
    normaliser): `count_a * A / sum_a count_a`, with `mask_AUT` the minibatch's response masks
    split into `A` micro-batches."""
    mask_AUT = jnp.asarray(mask_AUT, jnp.float32)
    counts_A = jnp.maximum(jnp.sum(mask_AUT, axis=(1, 2)), 1.0)
    return counts_A * mask_AUT.shape[0] / jnp.maximum(jnp.sum(mask_AUT), 1.0)


def loss(
    policy_params: Params,
    value_params: Params,
    mb: Experience,
    ptx: PtxBatch | None,
    token_scale: jax.Array,
    algo_state: Any,
    *,
    config: RLConfig,
    rl_models: RLModels,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of one micro-batch and its metrics (see the module docstring)."""
    common = (mb.prompts, mb.prompt_mask, mb.responses, mb.mask)
    # One trunk pass feeds both heads when the value head shares the policy trunk.
    hidden = response_hidden(policy_params, rl_models.policy, *common)
    logprobs, entropy = logprobs_from_response_hidden(
        policy_params,
        rl_models.policy,
        hidden,
        mb.responses,
        mb.mask,
        config.temperature,
        config.logprob_chunk_size,
        config.entropy_coef != 0 or config.log_entropy,
    )
    if config.entropy_coef == 0 and entropy is not None:
        # Only a metric then: no backward pass through the [B, T, V] entropy computation.
        entropy = jax.lax.stop_gradient(entropy)
    total, pg_aux = config.policy_objective(logprobs, mb, token_scale, algo_state)
    pg_aux = dict(pg_aux)
    aux = {"loss/policy_avg": pg_aux.pop("pg_loss", total)}
    aux.update({_POLICY_METRICS[k]: v for k, v in pg_aux.items() if k in _POLICY_METRICS})
    if config.has_critic:
        if rl_models.shared_value_head:
            head = rl_models.value_head
            values = values_from_hidden(value_params, head, hidden, mb.value_mask)
        else:
            values = value_estimates(value_params, rl_models.value, *common, mb.value_mask)
        vf_loss, vf_aux = ppo_value_loss(
            values, mb.values, mb.returns, mb.value_mask, clip_range=config.cliprange_value
        )
        total = total + config.vf_coef * vf_loss
        aux["loss/value_avg"] = vf_loss
        aux["val/clipfrac_avg"] = vf_aux["clipfrac"]
    if config.entropy_coef:
        total = total - config.entropy_coef * masked_mean(entropy, mb.mask)
    if entropy is not None:
        aux["policy/entropy_avg"] = masked_mean(entropy, mb.mask)
    if ptx is not None and config.ptx_coef > 0:
        lm = ptx_loss(policy_params, rl_models.policy, ptx)
        total = total + config.ptx_coef * lm
        aux["loss/ptx_avg"] = lm
    return total, aux


def update(
    state: RLState,
    exp: Experience,
    key: jax.Array,
    *,
    config: RLConfig,
    rl_models: RLModels,
    ptx: PtxBatch | None = None,
    optimizers: Optimizers | None = None,
) -> tuple[RLState, dict[str, jax.Array]]:
    """`config.epochs` passes over the experience, each in a fresh random order, as nested
    `lax.scan`s (epochs -> minibatches -> gradient-accumulation micro-batches).

    A minibatch whose loss or gradients are not finite is skipped (parameters and optimiser state
    keep their values) and counted in the `nonfinite/updates` metric so the caller can stop.
    `ptx`: a pretraining batch for `ptx_coef` (its rows split like the experience's).
    """
    tx = optimizers or default_optimizers(config)
    critic = config.has_critic
    n_mb, n_acc = config.num_mini_batches, config.gradient_accumulation_steps
    # Only the trainable halves (all of a model without LoRA) are differentiated, accumulated,
    # optimised and carried through the loops; a LoRA base is a loop-invariant closure.
    policy_lora, value_lora = rl_models.policy.lora, rl_models.value_lora
    policy_train, policy_frozen = lora.split(state.policy_params, policy_lora)
    value_train, value_frozen = (
        lora.split(state.value_params, value_lora) if critic else (None,) * 2
    )
    state = state.replace(policy_params=policy_train, value_params=value_train)

    def trainable_loss(train, *args, **kwargs):
        policy = lora.join(train[0], policy_frozen)
        value = lora.join(train[1], value_frozen) if critic else None
        return loss(policy, value, *args, **kwargs)

    grad_fn = jax.value_and_grad(trainable_loss, has_aux=True)
    if critic:
        policy_specs, value_specs = param_logical_axes(rl_models)
        value_specs = lora.split(value_specs, value_lora)[0]
    else:
        policy_specs, value_specs = models.logical_axes(rl_models.policy), None
    param_specs = (lora.split(policy_specs, policy_lora)[0], value_specs)
    if ptx is not None:
        n = ptx.tokens.shape[0]
        if n % (n_mb * n_acc):
            raise ValueError(
                f"the PPO-ptx batch ({n} rows) must divide into num_mini_batches x "
                f"gradient_accumulation_steps = {n_mb * n_acc} parts"
            )
        ptx = jax.tree.map(lambda x: x.reshape(n_mb, n_acc, n // (n_mb * n_acc), *x.shape[1:]), ptx)
    mask_f = exp.mask.astype(jnp.float32)

    def minibatch_step(state: RLState, inputs):
        idx_AU, ptx_mb = inputs
        if config.global_token_norm:
            scales_A = minibatch_token_scales(mask_f[idx_AU])
        else:
            scales_A = jnp.ones((n_acc,), jnp.float32)

        def micro_grads(micro_inputs):
            idx_U, ptx_micro, scale = micro_inputs
            # Rows picked through a global permutation: split them over the mesh like the batch.
            mb = sh.constrain_batch(jax.tree.map(lambda x: x[idx_U], exp))
            ptx_micro = sh.constrain_batch(ptx_micro)
            (value, aux), grads = grad_fn(
                (state.policy_params, state.value_params),
                mb,
                ptx_micro,
                scale,
                state.algo_state,
                config=config,
                rl_models=rl_models,
            )
            return grads, {**aux, "loss/total": value}

        params = (state.policy_params, state.value_params)
        (policy_grads, value_grads), aux = accumulate_grads(
            micro_grads, params, (idx_AU, ptx_mb, scales_A), n_acc, param_specs=param_specs
        )
        steps = [(tx.policy, policy_grads, state.opt_state, state.policy_params)]
        if critic:
            steps.append((tx.value, value_grads, state.value_opt_state, state.value_params))
        updated, ok, norms = apply_if_finite(steps, aux["loss/total"])
        state = state.replace(policy_params=updated[0][0], opt_state=updated[0][1])
        aux["grad_norm/policy"] = norms[0]
        if critic:
            state = state.replace(value_params=updated[1][0], value_opt_state=updated[1][1])
            aux["grad_norm/value"] = norms[1]
        aux["nonfinite/updates"] = 1.0 - ok.astype(jnp.float32)
        return state, aux

    state, aux = scan_epochs(
        minibatch_step,
        state,
        key,
        epochs=config.epochs,
        batch_size=config.batch_size,
        num_mini_batches=n_mb,
        gradient_accumulation_steps=n_acc,
        per_minibatch=ptx,
    )
    state = state.replace(
        policy_params=lora.join(state.policy_params, policy_frozen),
        value_params=lora.join(state.value_params, value_frozen) if critic else None,
    )
    return state, summarize_update(aux)
