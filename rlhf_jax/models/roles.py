"""Role initialisation: a model made for another role in RLHF (a value model from a reward model
or a policy, a value head on the policy's trunk, a reward model from a policy)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig

Params = Any


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
