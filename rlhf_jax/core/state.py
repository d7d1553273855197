"""The models, parameters and train state of every RL algorithm, and where they live on a mesh.

- `RLModels`: the static architectures (policy; reward model, when rewards come from one; value
  model, for algorithms with a critic).
- `FrozenParams`: what no algorithm updates (the reference policy, the reward model).
- `RLState`: what an iteration updates (policy, optionally value params, optimiser states, the
  KL controller, counters, the algorithm's own adapted state): one pytree, checkpointed whole.
- `Optimizers`: the optax transformations of the policy and the value function (the config's
  AdamW on its schedule by default; pass your own to `init_state` and the iteration functions).
- `rl_shardings` / `jit_init_state`: the shardings of all of these on a device mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax import sharding as sh
from rlhf_jax.core.config import RLConfig
from rlhf_jax.models import lora
from rlhf_jax.models.lora import LoRAConfig
from rlhf_jax.optim import check_trainable
from rlhf_jax.rewards import KLState

Params = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLModels:
    """Static architecture of the models (hashable). The reference model shares `policy`.

    Attributes:
      policy: the trained causal LM.
      reward: the reward model (a scalar score head), or None when rewards come only from host
        functions.
      value: with a critic (`RLConfig.has_critic`), the value model; None puts the value function
        on the policy: a scalar head (`models.value_head_init`) reads the policy trunk's final
        hidden states, the value loss (times `vf_coef`) trains the trunk together with the policy
        loss, and `RLState.value_params` holds only that head (its own optimiser). Ignored
        without a critic.
      value_shares_reward_base: a LoRA value model of the reward model's architecture whose
        frozen half in `RLState.value_params` *is* the reward model's base; `FrozenParams.reward`
        then holds only the reward model's score head (`reward_params`). With LoRA on the policy
        too, a run holds two base models, not four.
    """

    policy: models.ModelConfig
    reward: models.ModelConfig | None = None
    value: models.ModelConfig | None = None
    value_shares_reward_base: bool = False

    @property
    def shared_value_head(self) -> bool:
        """With a critic: whether the value function is a head on the policy trunk."""
        return self.value is None

    @property
    def value_lora(self) -> LoRAConfig | None:
        """The value model's LoRA (None: its params train whole; a shared head always does)."""
        return None if self.value is None else self.value.lora

    @property
    def value_head(self) -> models.ModelConfig:
        """Config whose `score` head the value function uses: the value model's, or with a shared
        head the policy's architecture with a scalar score head."""
        if self.value is not None:
            return self.value
        policy_lora = self.policy.lora  # the trunk's adapters; heads are the policy's business
        value_lora = (
            None if policy_lora is None else dataclasses.replace(policy_lora, train_modules=())
        )
        return dataclasses.replace(self.policy, head="score", num_labels=1, lora=value_lora)

    def __post_init__(self) -> None:
        if self.policy.head != "lm":
            raise ValueError("the policy must be a causal LM (head='lm')")
        if self.value_shares_reward_base and (
            self.value is None
            or self.value.lora is None
            or "score" not in self.value.lora.train_modules
            or dataclasses.replace(self.value, lora=None) != self.reward
        ):
            raise ValueError(
                "value_shares_reward_base needs a LoRA value model (with its score head in "
                "train_modules) of the reward model's exact architecture"
            )
        for name in ("value", "reward"):
            config = getattr(self, name)
            if config is None:
                continue
            if config.head != "score" or config.num_labels != 1:
                raise ValueError(
                    f"the {name} model must have a scalar score head (head='score', "
                    f"num_labels=1), got head={config.head!r}, num_labels={config.num_labels}"
                )
            if config.vocab_size < self.policy.vocab_size:
                raise ValueError(
                    f"the {name} model's vocabulary ({config.vocab_size}) is smaller than the "
                    f"policy's ({self.policy.vocab_size}); they must share a tokenizer"
                )


class FrozenParams(NamedTuple):
    """Parameters no algorithm updates. `ref`: the reference policy (None when no KL is used, or
    with LoRA on the policy: the reference is then the policy's own base with the adapters off).
    `reward`: the reward model (None when rewards come from host functions; only its score head
    with `RLModels.value_shares_reward_base`)."""

    ref: Params | None = None
    reward: Params | None = None


class RLState(flax.struct.PyTreeNode):
    """Everything an iteration updates (a pytree; checkpoint it whole). Without a critic
    `value_params` and `value_opt_state` are None; `algo_state` is the algorithm's
    (`RLConfig.init_algo_state`: PPO-Penalty's beta, else None)."""

    policy_params: Params
    opt_state: optax.OptState
    kl: KLState
    iteration: jax.Array  # int32 scalar: completed iterations
    episode: jax.Array  # int32 scalar: rows (completions) sampled
    value_params: Params = None
    value_opt_state: optax.OptState = None
    algo_state: Any = None


class Optimizers(NamedTuple):
    """The optax transformations of the policy and (with a critic) the value function."""

    policy: optax.GradientTransformation
    value: optax.GradientTransformation | None = None


def default_optimizers(config: RLConfig) -> Optimizers:
    """The config's AdamW on its learning-rate schedule (the value function's peak learning rate
    is `value_learning_rate` when the algorithm has one)."""
    if not config.has_critic:
        return Optimizers(config.optimizer())
    value_lr = getattr(config, "value_learning_rate", None) or config.learning_rate
    return Optimizers(config.optimizer(), config.optimizer(value_lr))


def init_state(
    policy_params: Params,
    config: RLConfig,
    rl_models: RLModels | None = None,
    *,
    value_params: Params = None,
    optimizers: Optimizers | None = None,
) -> RLState:
    """Fresh optimiser, KL-controller and algorithm state around copies of the given params.

    The state owns its buffers, so iterations can donate it even when `policy_params` are the same
    arrays as the frozen reference (the usual start) or `value_params` the reward model's.
    Trained params must be float32 (`optim.check_trainable`; cast frozen ones as you like). With
    LoRA models (pass `rl_models`) only the trainable half (`lora.split`: adapters and the
    modules in `train_modules`) has optimiser state and must be float32; the base may be 16-bit.

    Args:
      value_params: with a critic, the value model's params, or `models.value_head_init(policy)`
        for a value head on the policy trunk; None without one.
      optimizers: default `default_optimizers(config)`; pass the same to the iteration.
    """
    if config.has_critic and value_params is None:
        raise ValueError(f"{type(config).__name__} trains a value function: pass value_params")
    if rl_models is None:
        if lora.has_adapters(policy_params) or (
            value_params is not None and lora.has_adapters(value_params)
        ):
            raise ValueError("the params hold LoRA adapters: pass rl_models to init_state")
        policy_lora = value_lora = None
    else:
        policy_lora, value_lora = rl_models.policy.lora, rl_models.value_lora
    tx = optimizers or default_optimizers(config)
    policy_train, _ = lora.split(policy_params, policy_lora)
    check_trainable(policy_train, "policy params")
    value_opt_state = None
    if config.has_critic:
        value_train, _ = lora.split(value_params, value_lora)
        check_trainable(value_train, "value params")
        value_opt_state = tx.value.init(value_train)  # (only shapes are read)
    else:
        value_params = None
    policy_params, value_params = jax.tree.map(jnp.copy, (policy_params, value_params))
    return RLState(
        policy_params=policy_params,
        opt_state=tx.policy.init(policy_train),
        kl=config.kl_controller().init(),
        iteration=jnp.zeros((), jnp.int32),
        episode=jnp.zeros((), jnp.int32),
        value_params=value_params,
        value_opt_state=value_opt_state,
        algo_state=config.init_algo_state(),
    )


def reference_params(state: RLState, frozen: FrozenParams, rl_models: RLModels) -> Params:
    """The reference policy's params: `frozen.ref`, or with LoRA (and `frozen.ref` None) the
    policy's base without its adapters (the same arrays: no second copy)."""
    if frozen.ref is not None:
        return frozen.ref
    if rl_models.policy.lora is None:
        raise ValueError(
            "this config uses a KL to the reference policy (a KL coefficient, kl_target or beta "
            "is set) but frozen.ref is None; pass the reference parameters or set the KL "
            "coefficients to 0"
        )
    return lora.base(state.policy_params)


def reward_params(state: RLState, frozen: FrozenParams, rl_models: RLModels) -> Params:
    """The reward model's params: `frozen.reward`, or with `value_shares_reward_base` the value
    model's frozen base (the same arrays) with the reward head `frozen.reward["score"]`."""
    if frozen.reward is None:
        raise ValueError("frozen.reward is None; pass the reward model's parameters")
    if not rl_models.value_shares_reward_base:
        return frozen.reward
    base = lora.split(state.value_params, rl_models.value_lora)[1]
    return {**base, "score": frozen.reward["score"]}


def param_logical_axes(rl_models: RLModels) -> tuple[Params, Params]:
    """Logical `PartitionSpec`s of `(RLState.policy_params, RLState.value_params)` with a critic
    (the value model's, or only the shared value head's)."""
    value = models.logical_axes(rl_models.value_head)
    if rl_models.shared_value_head:
        value = {"score": value["score"]}
    return models.logical_axes(rl_models.policy), value


def abstract_params(config: RLConfig, rl_models: RLModels) -> tuple[Params, Params]:
    """Shapes and dtypes of the policy params and (with a critic) the value params (the value
    model's, or the shared value head's; None without a critic)."""
    policy = models.param_shapes(rl_models.policy)
    if not config.has_critic:
        return policy, None
    if rl_models.shared_value_head:
        return policy, jax.eval_shape(lambda: models.value_head_init(rl_models.policy))
    return policy, models.param_shapes(rl_models.value)


def abstract_state(
    config: RLConfig, rl_models: RLModels, optimizers: Optimizers | None = None
) -> RLState:
    """Shapes and dtypes of the `RLState` that `init_state` builds (nothing is computed)."""
    policy, value = abstract_params(config, rl_models)
    return jax.eval_shape(
        lambda p, v: init_state(p, config, rl_models, value_params=v, optimizers=optimizers),
        policy,
        value,
    )


# ---------------------------------------------------------------------------------- sharding


class RLShardings(NamedTuple):
    """Where an iteration's inputs live on a mesh (`NamedSharding` leaves).

    Attributes:
      state: an `RLState` of shardings: params by the models' logical axes, optimiser states
        mirroring their params (`sharding.optimizer_state_shardings`), the rest replicated.
      frozen: `FrozenParams` of shardings (reference like the policy, reward by its own axes;
        None where the run has none).
      batch: for `[B, S]` training-row arrays (`PtxBatch` fields): the leading axis over
        `("data", "fsdp")`.
      replicated: for prompts (`[num_prompts, P]`: the rows are split after the group expansion,
        by the models' activation constraints, so `num_prompts` need not divide the mesh), keys,
        scalars and metrics.
    """

    state: RLState
    frozen: FrozenParams
    batch: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding


def rl_shardings(
    config: RLConfig,
    rl_models: RLModels,
    mesh: jax.sharding.Mesh,
    rules: tuple[tuple[str, Any], ...] | None = None,
    optimizers: Optimizers | None = None,
) -> RLShardings:
    """The shardings of `RLState`, `FrozenParams` and the batch on `mesh` (shapes only)."""
    policy = models.param_shardings(rl_models.policy, mesh, rules)
    abstract = abstract_state(config, rl_models, optimizers)
    rep = sh.replicated(mesh)
    value = value_opt = None
    if config.has_critic:
        value = models.param_shardings(rl_models.value_head, mesh, rules)
        if rl_models.shared_value_head:
            value = {"score": value["score"]}
        value_opt = sh.optimizer_state_shardings(abstract.value_opt_state, value, mesh)
    state = RLState(
        policy_params=policy,
        opt_state=sh.optimizer_state_shardings(abstract.opt_state, policy, mesh),
        kl=jax.tree.map(lambda _: rep, abstract.kl),
        iteration=rep,
        episode=rep,
        value_params=value,
        value_opt_state=value_opt,
        algo_state=jax.tree.map(lambda _: rep, abstract.algo_state),
    )
    reward = None
    if rl_models.reward is not None:
        reward = models.param_shardings(rl_models.reward, mesh, rules)
        if rl_models.value_shares_reward_base:
            reward = {"score": reward["score"]}
    needs_ref = config.needs_ref and rl_models.policy.lora is None  # LoRA: the policy's base
    return RLShardings(
        state=state,
        frozen=FrozenParams(ref=policy if needs_ref else None, reward=reward),
        batch=sh.batch_sharding(mesh, 2),
        replicated=rep,
    )


def jit_init_state(
    config: RLConfig,
    rl_models: RLModels,
    mesh: jax.sharding.Mesh | None = None,
    rules: tuple[tuple[str, Any], ...] | None = None,
    optimizers: Optimizers | None = None,
):
    """`init_state` jitted: `fn(policy_params, value_params=None) -> RLState`. With a `mesh`
    the params are expected (and the state is born) with the shardings of `rl_shardings`, so
    the optimiser moments never exist unsharded. The inputs are not donated (the policy params
    are usually also the frozen reference). Each call compiles anew: keep the function."""

    def fn(policy_params, value_params=None):
        return init_state(
            policy_params, config, rl_models, value_params=value_params, optimizers=optimizers
        )

    if mesh is None:
        return sh.jit_with_rules(fn, None, rules)
    s = rl_shardings(config, rl_models, mesh, rules, optimizers).state
    params = (s.policy_params, s.value_params) if config.has_critic else (s.policy_params,)
    return sh.jit_with_rules(fn, mesh, rules, in_shardings=params, out_shardings=s)
