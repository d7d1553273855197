"""Decoder LMs (GPT-2, GPT-NeoX, Llama/Mistral, Qwen2/Qwen3), heads and HF checkpoint interop."""

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.model import (
    KVCache,
    forward,
    init_cache,
    init_params,
    lm_logits,
    logical_axes,
    score,
    sequence_scores,
)

__all__ = [
    "KVCache",
    "ModelConfig",
    "forward",
    "init_cache",
    "init_params",
    "lm_logits",
    "logical_axes",
    "score",
    "sequence_scores",
]
