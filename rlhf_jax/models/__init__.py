"""Decoder LMs (GPT-2, GPT-NeoX, Llama/Mistral, Qwen2/Qwen3, Gemma 2/3), heads, role
initialisation and HF checkpoint interop (config: `hf_config`, weight names: `weights`, files:
`io`)."""

from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf_config import config_from_hf, config_to_hf
from rlhf_jax.models.io import index_weights, load, read_weights, save
from rlhf_jax.models.lora_config import LoRAConfig
from rlhf_jax.models.model import (
    KVCache,
    forward,
    init_cache,
    init_params,
    lm_logits,
    logical_axes,
    param_shapes,
    score,
    sequence_scores,
    unstack_layers,
)
from rlhf_jax.models.roles import (
    reward_init_from_policy,
    value_from_policy,
    value_from_reward,
    value_head_init,
)
from rlhf_jax.models.sharded import jit_forward, param_shardings, sharded_init_params
from rlhf_jax.models.weights import hf_to_params, params_to_hf

__all__ = [
    "KVCache",
    "LoRAConfig",
    "ModelConfig",
    "config_from_hf",
    "config_to_hf",
    "forward",
    "hf_to_params",
    "index_weights",
    "init_cache",
    "init_params",
    "jit_forward",
    "lm_logits",
    "load",
    "lora",
    "logical_axes",
    "param_shapes",
    "param_shardings",
    "params_to_hf",
    "read_weights",
    "reward_init_from_policy",
    "save",
    "score",
    "sequence_scores",
    "sharded_init_params",
    "unstack_layers",
    "value_from_policy",
    "value_from_reward",
    "value_head_init",
]
