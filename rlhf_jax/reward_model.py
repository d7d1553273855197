"""Reward-model training: pairwise Bradley-Terry loss (+ the optional LM loss on the chosen
response from "Secrets of RLHF"), pairwise accuracy, and head normalisation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.logprobs import logprobs_from_hidden
from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.models.roles import reward_init_from_policy  # noqa: F401 (re-exported)
from rlhf_jax.ops import masked_mean
from rlhf_jax.sampling import prompt_positions
from rlhf_jax.sft import TrainConfig, make_train_step

Params = Any


class PreferenceBatch(NamedTuple):
    """Pairs of sequences (prompt + response) sharing a prompt; each `[B, S]`.

    `*_mask` are 1 on real tokens (any padding side: the score is read at the last real token).
    `chosen_loss_mask` marks the chosen response's tokens for the optional LM loss.
    """

    chosen: jax.Array
    chosen_mask: jax.Array
    rejected: jax.Array
    rejected_mask: jax.Array
    chosen_loss_mask: jax.Array


def pair_scores(
    params: Params, config: models.ModelConfig, batch: PreferenceBatch
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(chosen_scores_B, rejected_scores_B, hidden_of_chosen)` from one forward over 2B rows."""
    tokens = jnp.concatenate([batch.chosen, batch.rejected], axis=0)
    mask = jnp.concatenate([batch.chosen_mask, batch.rejected_mask], axis=0).astype(bool)
    hidden, _ = models.forward(params, config, tokens, prompt_positions(mask), mask)
    length = tokens.shape[1]
    last = jnp.max(jnp.where(mask, jnp.arange(length), 0), axis=1)
    scores = models.score(params, config, hidden)[jnp.arange(tokens.shape[0]), last, 0]
    n = batch.chosen.shape[0]
    return scores[:n].astype(jnp.float32), scores[n:].astype(jnp.float32), hidden[:n]


def rm_loss(
    params: Params, config: models.ModelConfig, batch: PreferenceBatch, *, beta_rm: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`-log sigmoid(r(x, y_chosen) - r(x, y_rejected))` averaged over pairs, plus `beta_rm` x the
    LM loss on the chosen response ("Secrets of RLHF"; needs tied embeddings so the score model
    can produce token logits). aux: `accuracy`, `margin_mean`, `lm_loss`."""
    chosen, rejected, hidden = pair_scores(params, config, batch)
    loss, aux = bradley_terry_loss(chosen, rejected)
    if beta_rm:
        logprobs, _ = logprobs_from_hidden(
            hidden[:, :-1], batch.chosen[:, 1:], lambda h: models.lm_logits(params, config, h)
        )
        lm = -masked_mean(logprobs, jnp.asarray(batch.chosen_loss_mask, bool)[:, 1:])
        loss = loss + beta_rm * lm
        aux["lm_loss"] = lm
    return loss, aux


def make_rm_step(model_config: models.ModelConfig, config: TrainConfig, *, beta_rm: float = 0.0):
    """The reward-model `step(state, PreferenceBatch) -> (state, metrics)`; jit it."""
    if beta_rm and not model_config.tie_embeddings:
        raise ValueError(
            "beta_rm > 0 adds an LM loss, which needs the reward model's token embeddings to be "
            "tied to its output (tie_embeddings=True); set beta_rm=0 for this model"
        )
    return make_train_step(
        lambda p, b: rm_loss(p, model_config, b, beta_rm=beta_rm),
        config,
        param_specs=models.logical_axes(model_config),
        lora_config=model_config.lora,
    )


def normalize_head(
    params: Params, config: models.ModelConfig, reference_scores: Any
) -> tuple[Params, dict[str, float]]:
    """Rescales the score head so that scores on a reference set (e.g. SFT samples) have std 1,
    and shifts them to mean 0 where the architecture allows (lm-human-preferences).

    The HF `score` head has no bias, so the shift goes into the final LayerNorm's bias (it only
    feeds the head in a score model): exact for LayerNorm families (GPT-2, GPT-NeoX). RMSNorm
    families have no bias to carry it; there only the scale is changed and the remaining mean is
    returned (PPO's whitened advantages do not depend on a constant offset).

    Returns `(params, {"mean", "std", "residual_mean"})` measured before the change.
    """
    scores = np.asarray(reference_scores, np.float64)
    mean, std = float(scores.mean()), float(scores.std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"reference scores must vary to be normalised (std={std})")
    kernel = params["score"]["kernel"] / std
    params = {**params, "score": {**params["score"], "kernel": kernel}}
    residual = mean / std
    if config.norm == "layernorm":
        w = kernel[:, 0].astype(jnp.float32)
        bias = params["final_norm"]["bias"] - (residual * w / jnp.sum(w * w)).astype(
            params["final_norm"]["bias"].dtype
        )
        params = {**params, "final_norm": {**params["final_norm"], "bias": bias}}
        residual = 0.0
    return params, {"mean": mean, "std": std, "residual_mean": residual}
