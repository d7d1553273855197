"""rlhf_jax: RLHF (PPO, RLOO, GRPO, REINFORCE++) as pure, jitted, sharded JAX functions.

The public API is re-exported flat from this module.
"""

import logging as _logging

from rlhf_jax.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    discounted_returns,
    estimate_advantages,
    gae,
    grpo_advantages,
    rloo_advantages,
)
from rlhf_jax.critic_free import (
    TRL_LOSS_TYPES,
    CriticFreeFrozen,
    CriticFreeModels,
    CriticFreeState,
    GroupRollout,
    GRPOConfig,
    ReinforcePPConfig,
    RLOOConfig,
    make_host_iteration,
    trl_loss_aggregation,
)
from rlhf_jax.critic_free import jit_iteration as jit_critic_free_iteration
from rlhf_jax.logprobs import entropy_from_logits, logprobs_from_hidden, selective_log_softmax
from rlhf_jax.losses import (
    adapt_penalty_beta,
    aggregate_loss,
    bradley_terry_loss,
    lm_loss,
    ppo_penalty_loss,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_jax.models import jit_forward, param_shardings, sharded_init_params
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
    PPOShardings,
    PPOState,
    PtxBatch,
    build_experience,
    check_finite,
    init_state,
    jit_init_state,
    jit_ppo_iteration,
    make_experience,
    ppo_iteration,
    ppo_shardings,
    rollout,
    update,
)
from rlhf_jax.reward_functions import (
    RewardFunctionError,
    compute_rewards,
    load_reward_function,
    make_score_fn,
    reward_terms,
)
from rlhf_jax.reward_model import (
    PreferenceBatch,
    make_rm_step,
    normalize_head,
    reward_init_from_policy,
    rm_loss,
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
from rlhf_jax.sampling import Generation, SamplingConfig, generate, jit_generate
from rlhf_jax.sft import (
    SFTBatch,
    TrainConfig,
    TrainState,
    init_train_state,
    make_sft_step,
    make_train_step,
    sft_loss,
)
from rlhf_jax.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    local_batch_slice,
    make_mesh,
    place_batch,
    shard_params,
    sharded_init,
    with_rules,
)


def _drop_missing_torch_advice(record: _logging.LogRecord) -> bool:
    # transformers warns on import that PyTorch is missing; rlhf_jax uses transformers only for
    # tokenizers, configs and file utilities, so that advice is noise to our users.
    return not str(record.msg).startswith("PyTorch was not found")


_logging.getLogger("transformers").addFilter(_drop_missing_torch_advice)

__version__ = "0.1.0"

__all__ = [
    "adapt_penalty_beta",
    "ppo_penalty_loss",
    "PPOShardings",
    "jit_forward",
    "jit_generate",
    "jit_init_state",
    "local_batch_slice",
    "param_shardings",
    "ppo_shardings",
    "sharded_init_params",
    "ADVANTAGE_ESTIMATORS",
    "AdvantageInputs",
    "CriticFreeFrozen",
    "CriticFreeModels",
    "CriticFreeState",
    "GRPOConfig",
    "GroupRollout",
    "RLOOConfig",
    "ReinforcePPConfig",
    "RewardFunctionError",
    "TRL_LOSS_TYPES",
    "compute_rewards",
    "discounted_returns",
    "estimate_advantages",
    "grpo_advantages",
    "jit_critic_free_iteration",
    "load_reward_function",
    "make_host_iteration",
    "make_score_fn",
    "reward_terms",
    "rloo_advantages",
    "trl_loss_aggregation",
    "PreferenceBatch",
    "SFTBatch",
    "TrainConfig",
    "TrainState",
    "init_train_state",
    "make_rm_step",
    "make_sft_step",
    "make_train_step",
    "normalize_head",
    "reward_init_from_policy",
    "rm_loss",
    "sft_loss",
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
