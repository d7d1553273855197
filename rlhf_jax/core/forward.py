"""The model passes of the core: log-probs, values and reward scores of prompt + response.

Every function takes left-padded prompts `[B, P]` with their mask and right-padded responses
`[B, T]` with their mask (real tokens up to and including the stop token), runs one full forward
pass of prompt + response, and reads position `P - 1 + t` for response token `t`: the state from
which token `t` is predicted (and valued).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import models
from rlhf_jax.logprobs import logprobs_from_hidden
from rlhf_jax.ops import INVALID_LOGPROB
from rlhf_jax.sampling import prompt_positions

Params = Any


def full_sequence(prompts_BP, prompt_mask_BP, responses_BT, mask_BT):
    """Prompt + response tokens `[B, P + T]`, their positions and their bool mask."""
    tokens = jnp.concatenate([prompts_BP, responses_BT], axis=1)
    mask = jnp.concatenate([prompt_mask_BP, mask_BT], axis=1).astype(bool)
    return tokens, prompt_positions(mask), mask


def response_hidden(
    params: Params,
    config: models.ModelConfig,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
) -> jax.Array:
    """Hidden states `[B, T, D]` at positions `P-1 .. P+T-2` of prompt + response: entry `t` is
    the state from which response token `t` is predicted (and valued)."""
    tokens, positions, mask = full_sequence(prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    outputs = (prompts_BP.shape[1] - 1, responses_BT.shape[1])
    return models.forward(params, config, tokens, positions, mask, outputs=outputs)[0]


def policy_logprobs(
    params: Params,
    config: models.ModelConfig,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    temperature: float,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Temperature-scaled log-probs `[B, T]` of the response tokens (`INVALID_LOGPROB` outside
    `mask_BT`) and optionally the per-token entropy, float32."""
    hidden = response_hidden(params, config, prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    return logprobs_from_response_hidden(
        params, config, hidden, responses_BT, mask_BT, temperature, chunk_size, with_entropy
    )


def logprobs_from_response_hidden(
    params, config, hidden_BTD, responses_BT, mask_BT, temperature, chunk_size, with_entropy
):
    """`policy_logprobs` from the `response_hidden` states (one trunk pass for several heads)."""
    logprobs, entropy = logprobs_from_hidden(
        hidden_BTD,
        responses_BT,
        lambda h: models.lm_logits(params, config, h),
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )
    return jnp.where(mask_BT, logprobs, INVALID_LOGPROB), entropy


def value_estimates(
    params: Params,
    config: models.ModelConfig,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
    value_mask_BT: jax.Array,
) -> jax.Array:
    """Values `[B, T]` (float32) of the states before each response token; 0 outside
    `value_mask_BT`."""
    hidden = response_hidden(params, config, prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    return values_from_hidden(params, config, hidden, value_mask_BT)


def values_from_hidden(
    params: Params, config: models.ModelConfig, hidden_BTD: jax.Array, value_mask_BT: jax.Array
) -> jax.Array:
    """Values `[B, T]` (float32) from `response_hidden` states; 0 outside `value_mask_BT`."""
    values = models.score(params, config, hidden_BTD)[..., 0].astype(jnp.float32)
    return jnp.where(value_mask_BT, values, 0.0)


def reward_scores(
    params: Params,
    config: models.ModelConfig,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
) -> jax.Array:
    """Reward-model score `[B]` (float32) read at the last real token of prompt + response (the
    last layer computes only positions `P-1 ..`: prompts are left-padded, so the last real token
    is never earlier)."""
    tokens, positions, mask = full_sequence(prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    scores = models.sequence_scores(
        params, config, tokens, positions, mask, first_scored=prompts_BP.shape[1] - 1
    )
    return scores[:, 0].astype(jnp.float32)
