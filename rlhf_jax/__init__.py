"""rlhf_jax: RLHF (PPO, RLOO, GRPO, REINFORCE++) as pure, jitted, sharded JAX functions.

The public API is re-exported flat from this module.
"""

from rlhf_jax.advantages import gae
from rlhf_jax.logprobs import entropy_from_logits, logprobs_from_hidden, selective_log_softmax
from rlhf_jax.losses import (
    aggregate_loss,
    bradley_terry_loss,
    lm_loss,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_jax.ops import (
    INVALID_LOGPROB,
    first_true_indices,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask,
    truncate_after_stop,
)
from rlhf_jax.ppo import (
    Experience,
    FrozenParams,
    NonFiniteError,
    PPOConfig,
    PPOModels,
    PPOState,
    PtxBatch,
    build_experience,
    check_finite,
    init_state,
    jit_ppo_iteration,
    make_experience,
    ppo_iteration,
    rollout,
    update,
)
from rlhf_jax.rewards import (
    KLController,
    KLState,
    adaptive_kl_controller,
    apply_missing_stop_penalty,
    fixed_kl_controller,
    kl_penalty,
    score_indices,
    shape_rewards,
)
from rlhf_jax.sampling import Generation, SamplingConfig, generate
from rlhf_jax.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    make_mesh,
    place_batch,
    shard_params,
    sharded_init,
    with_rules,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RULES",
    "Experience",
    "FrozenParams",
    "MeshConfig",
    "NonFiniteError",
    "PPOConfig",
    "PPOModels",
    "PPOState",
    "PtxBatch",
    "build_experience",
    "check_finite",
    "init_state",
    "jit_ppo_iteration",
    "make_experience",
    "make_mesh",
    "place_batch",
    "ppo_iteration",
    "rollout",
    "shard_params",
    "sharded_init",
    "update",
    "with_rules",
    "INVALID_LOGPROB",
    "Generation",
    "KLController",
    "KLState",
    "adaptive_kl_controller",
    "aggregate_loss",
    "apply_missing_stop_penalty",
    "bradley_terry_loss",
    "entropy_from_logits",
    "first_true_indices",
    "fixed_kl_controller",
    "gae",
    "kl_penalty",
    "lm_loss",
    "logprobs_from_hidden",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "generate",
    "response_mask",
    "SamplingConfig",
    "score_indices",
    "selective_log_softmax",
    "shape_rewards",
    "truncate_after_stop",
]
