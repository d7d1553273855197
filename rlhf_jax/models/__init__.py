"""Decoder LMs (GPT-2, GPT-NeoX, Llama/Mistral, Qwen2/Qwen3, Gemma 2/3), heads and HF checkpoint
interop."""

from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf import (
    config_from_hf,
    config_to_hf,
    hf_to_params,
    load,
    params_to_hf,
    save,
    value_from_reward,
)
from rlhf_jax.models.lora import LoRAConfig
from rlhf_jax.models.model import (
    KVCache,
    forward,
    init_cache,
    init_params,
    lm_logits,
    logical_axes,
    score,
    sequence_scores,
    unstack_layers,
)
from rlhf_jax.models.roles import value_from_policy, value_head_init
from rlhf_jax.models.sharded import jit_forward, param_shardings, sharded_init_params

__all__ = [
    "KVCache",
    "LoRAConfig",
    "ModelConfig",
    "config_from_hf",
    "config_to_hf",
    "forward",
    "hf_to_params",
    "init_cache",
    "init_params",
    "jit_forward",
    "lm_logits",
    "load",
    "lora",
    "logical_axes",
    "param_shardings",
    "params_to_hf",
    "save",
    "score",
    "sequence_scores",
    "sharded_init_params",
    "unstack_layers",
    "value_from_policy",
    "value_from_reward",
    "value_head_init",
]
