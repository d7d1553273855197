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
from rlhf_jax.algorithms import (
    TRL_LOSS_TYPES,
    GRPOConfig,
    PPOConfig,
    ReinforcePPConfig,
    RLOOConfig,
    trl_loss_aggregation,
)
from rlhf_jax.core import (
    Experience,
    FrozenParams,
    NonFiniteError,
    Optimizers,
    PtxBatch,
    RLConfig,
    RLModels,
    RLShardings,
    RLState,
    Rollout,
    build_experience,
    check_finite,
    finish_iteration,
    init_state,
    iteration,
    iteration_programs,
    jit_init_state,
    jit_iteration,
    make_experience,
    make_host_iteration,
    rl_shardings,
    rollout,
    update,
)
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
    "ADVANTAGE_ESTIMATORS",
    "AdvantageInputs",
    "DEFAULT_RULES",
    "Experience",
    "FrozenParams",
    "GRPOConfig",
    "Generation",
    "INVALID_LOGPROB",
    "KLController",
    "KLState",
    "MeshConfig",
    "NonFiniteError",
    "Optimizers",
    "PPOConfig",
    "PreferenceBatch",
    "PtxBatch",
    "RLConfig",
    "RLModels",
    "RLOOConfig",
    "RLShardings",
    "RLState",
    "ReinforcePPConfig",
    "RewardFunctionError",
    "Rollout",
    "SFTBatch",
    "SamplingConfig",
    "TRL_LOSS_TYPES",
    "TrainConfig",
    "TrainState",
    "adapt_penalty_beta",
    "adaptive_kl_controller",
    "aggregate_loss",
    "apply_missing_stop_penalty",
    "bradley_terry_loss",
    "build_experience",
    "check_finite",
    "compute_rewards",
    "discounted_returns",
    "entropy_from_logits",
    "estimate_advantages",
    "finish_iteration",
    "first_true_indices",
    "fixed_kl_controller",
    "gae",
    "generate",
    "grpo_advantages",
    "init_state",
    "init_train_state",
    "iteration",
    "iteration_programs",
    "jit_forward",
    "jit_generate",
    "jit_init_state",
    "jit_iteration",
    "kl_penalty",
    "lm_loss",
    "load_reward_function",
    "local_batch_slice",
    "logprobs_from_hidden",
    "make_experience",
    "make_host_iteration",
    "make_mesh",
    "make_rm_step",
    "make_score_fn",
    "make_sft_step",
    "make_train_step",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_head",
    "param_shardings",
    "place_batch",
    "ppo_penalty_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "response_mask",
    "reward_init_from_policy",
    "reward_terms",
    "rl_shardings",
    "rloo_advantages",
    "rm_loss",
    "rollout",
    "score_indices",
    "selective_log_softmax",
    "sft_loss",
    "shape_rewards",
    "shard_params",
    "sharded_init",
    "sharded_init_params",
    "trl_loss_aggregation",
    "truncate_after_stop",
    "update",
    "with_rules",
]
