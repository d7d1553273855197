"""The policy-optimisation core shared by every RL algorithm.

One rollout (`rollout`: sample -> old / reference log-probs -> values with a critic), one
experience pytree (`build_experience`: the algorithm's advantages), one update loop (`update`:
epochs x minibatches x micro-batches as nested `lax.scan`s, a fresh permutation per epoch,
non-finite steps skipped), one state (`RLState`) and one iteration (`iteration`, or its phases
`iteration_programs` / `make_host_iteration` for host rewards and length buckets). An algorithm
is an `RLConfig` subclass implementing its hooks (`rlhf_jax.algorithms`).
"""

from rlhf_jax.core.config import Advantages, GroupedConfig, RLConfig
from rlhf_jax.core.experience import Experience, build_experience
from rlhf_jax.core.forward import policy_logprobs, reward_scores, value_estimates
from rlhf_jax.core.iteration import (
    IterationPrograms,
    NonFiniteError,
    check_finite,
    finish_iteration,
    iteration,
    iteration_programs,
    jit_iteration,
    make_experience,
    make_host_iteration,
    score_and_finish,
)
from rlhf_jax.core.rollout import (
    Rollout,
    RolloutSpec,
    rollout,
    rollout_spec,
    score_rollout,
    shared_rollout,
    slice_rollout,
    state_values,
)
from rlhf_jax.core.state import (
    FrozenParams,
    Optimizers,
    RLModels,
    RLShardings,
    RLState,
    abstract_state,
    default_optimizers,
    init_state,
    jit_init_state,
    param_logical_axes,
    reference_params,
    reward_params,
    rl_shardings,
)
from rlhf_jax.core.update import PtxBatch, loss, minibatch_token_scales, ptx_loss, update

__all__ = [
    "Advantages",
    "Experience",
    "FrozenParams",
    "GroupedConfig",
    "IterationPrograms",
    "NonFiniteError",
    "Optimizers",
    "PtxBatch",
    "RLConfig",
    "RLModels",
    "RLShardings",
    "RLState",
    "Rollout",
    "RolloutSpec",
    "abstract_state",
    "build_experience",
    "check_finite",
    "default_optimizers",
    "finish_iteration",
    "init_state",
    "iteration",
    "iteration_programs",
    "jit_init_state",
    "jit_iteration",
    "loss",
    "make_experience",
    "make_host_iteration",
    "minibatch_token_scales",
    "param_logical_axes",
    "policy_logprobs",
    "ptx_loss",
    "reference_params",
    "reward_params",
    "reward_scores",
    "rl_shardings",
    "rollout",
    "rollout_spec",
    "score_and_finish",
    "score_rollout",
    "shared_rollout",
    "slice_rollout",
    "state_values",
    "update",
    "value_estimates",
]
