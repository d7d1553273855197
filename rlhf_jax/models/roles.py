"""Role initialisation: a model made for another role in RLHF (a value model from a reward model
or a policy, a value head on the policy's trunk, a reward model from a policy)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.model import Params


def value_head_init(config: ModelConfig) -> Params:
    """Params of a value head on the trunk of `config` (a value function sharing the policy's
    trunk): `{"score": {"kernel": [hidden, 1]}}`, zero-initialised (values start at 0), in the
    params dtype."""
    return {"score": {"kernel": jnp.zeros((config.hidden_size, 1), config.params_dtype)}}


def value_from_policy(params: Params, config: ModelConfig) -> tuple[Params, ModelConfig]:
    """A value model from a policy: the same trunk, no LM head, a zero-initialised score head
    (values start at 0)."""
    trunk = {k: v for k, v in params.items() if k != "lm_head"}
    return {**trunk, **value_head_init(config)}, dataclasses.replace(
        config, head="score", num_labels=1
    )


def value_from_reward(params: Params, config: ModelConfig) -> tuple[Params, ModelConfig]:
    """A value model initialised from a reward model: copied params, same score head."""
    if config.head != "score" or config.num_labels != 1:
        raise ValueError(
            f"value_from_reward needs a reward model (head='score', num_labels=1), got "
            f"head={config.head!r}, num_labels={config.num_labels}"
        )
    return jax.tree.map(lambda x: x.copy(), params), config


def reward_init_from_policy(
    params: Params, config: ModelConfig, key: jax.Array, *, init_std: float | None = None
) -> tuple[Params, ModelConfig]:
    """A reward model initialised from a (SFT) policy, as TRL and lm-human-preferences do: the
    trunk is copied, the LM head dropped, and a fresh `score` head (normal, std
    `init_std` or the config's `initializer_range`) added."""
    if config.head != "lm":
        raise ValueError(f"reward_init_from_policy needs a causal LM, got head={config.head!r}")
    reward_config = dataclasses.replace(config, head="score", num_labels=1)
    std = config.initializer_range if init_std is None else init_std
    trunk = {
        k: jnp.copy(v) if not isinstance(v, dict) else jax.tree.map(jnp.copy, v)
        for k, v in params.items()
        if k != "lm_head"
    }
    kernel = std * jax.random.normal(
        key, (config.hidden_size, 1), trunk["embed"]["embedding"].dtype
    )
    return {**trunk, "score": {"kernel": kernel}}, reward_config
