"""The RL algorithms, one module each: a frozen `RLConfig` subclass with the option names of
TRL / OpenRLHF and the hooks the core calls (`rlhf_jax.core.config`). To add an algorithm, write
such a module and register a run config for it (`config.register_algorithm`)."""

from rlhf_jax.algorithms.grpo import TRL_LOSS_TYPES, GRPOConfig, trl_loss_aggregation
from rlhf_jax.algorithms.ppo import PPOConfig
from rlhf_jax.algorithms.reinforce_pp import ReinforcePPConfig
from rlhf_jax.algorithms.rloo import RLOOConfig

#: Algorithm name -> config class.
ALGORITHMS = {
    "ppo": PPOConfig,
    "rloo": RLOOConfig,
    "grpo": GRPOConfig,
    "reinforce++": ReinforcePPConfig,
}

__all__ = [
    "ALGORITHMS",
    "GRPOConfig",
    "PPOConfig",
    "RLOOConfig",
    "ReinforcePPConfig",
    "TRL_LOSS_TYPES",
    "trl_loss_aggregation",
]
