"""A whole iteration of any RL algorithm, as one jitted function or as jitted phases.

    rollout -> scores (reward model on device, or Python functions on the host)
      -> build_experience (the algorithm's advantages) -> update (the algorithm's loss)
      -> KL controller, algorithm state and counters

- `iteration` / `jit_iteration`: the whole thing as one program, scored by the reward model
  (scoring and update on all `response_length` columns: shapes are static inside one program).
- `iteration_programs`: the same as three jitted phases (`rollout`, `score`, `finish`) with the
  response columns cut between them to the batch's length bucket (only padding is cut; one
  compilation per bucket met), so scoring and the update cost what the real lengths need. The
  training loop and `make_host_iteration` (scores from Python functions) use them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.core.config import RLConfig
from rlhf_jax.core.experience import Experience, build_experience
from rlhf_jax.core.rollout import (
    Rollout,
    rollout,
    rollout_from_spec,
    rollout_spec,
    score_rollout,
    shared_rollout,
    slice_rollout,
)
from rlhf_jax.core.state import (
    FrozenParams,
    Optimizers,
    RLModels,
    RLShardings,
    RLState,
    abstract_state,
    init_state,
    rl_shardings,
)
from rlhf_jax.core.update import PtxBatch, update
from rlhf_jax.host import to_host


def finish_iteration(
    state: RLState,
    roll: Rollout,
    scores_B: jax.Array,
    key: jax.Array,
    *,
    config: RLConfig,
    rl_models: RLModels,
    ptx: PtxBatch | None = None,
    optimizers: Optimizers | None = None,
) -> tuple[RLState, dict[str, jax.Array]]:
    """`build_experience` + `update`, then the KL controller, the algorithm's state
    (`RLConfig.after_update`) and the iteration / episode counters advance.

    `key` is the update key (`jax.random.split(iteration_key)[1]`, as `iteration` uses it).
    Adds `perf/padded_fraction`: the fraction of the `[B, T]` response positions of `roll` (T: its
    width, the length bucket in the phased programs) that are padding.
    """
    exp, exp_metrics = build_experience(roll, scores_B, state.kl.kl_coef, config=config)
    lr = config.learning_rate_at(state.iteration)
    state, metrics = update(
        state, exp, key, config=config, rl_models=rl_models, ptx=ptx, optimizers=optimizers
    )
    kl = config.kl_controller().update(state.kl, exp_metrics["objective/kl"], config.batch_size)
    algo_state, metrics = config.after_update(state.algo_state, metrics)
    state = state.replace(
        kl=kl,
        algo_state=algo_state,
        iteration=state.iteration + 1,
        episode=state.episode + config.batch_size,
    )
    metrics = {**exp_metrics, **metrics, "lr": lr, "episode": state.episode}
    metrics["perf/padded_fraction"] = 1.0 - jnp.mean(roll.generation.mask.astype(jnp.float32))
    return state, metrics


def make_experience(
    state: RLState,
    frozen: FrozenParams,
    prompts_NP: jax.Array,
    prompt_mask_NP: jax.Array,
    key: jax.Array,
    *,
    config: RLConfig,
    rl_models: RLModels,
) -> tuple[Experience, dict[str, jax.Array]]:
    """Rollout, reward-model scores and the algorithm's advantages for one batch of prompts
    (`key`: the rollout key)."""
    roll = rollout(
        state, frozen, prompts_NP, prompt_mask_NP, key, config=config, rl_models=rl_models
    )
    scores = score_rollout(state, frozen, roll, rl_models=rl_models)
    return build_experience(roll, scores, state.kl.kl_coef, config=config)


def iteration(
    state: RLState,
    frozen: FrozenParams,
    prompts_NP: jax.Array,
    prompt_mask_NP: jax.Array,
    key: jax.Array,
    *,
    config: RLConfig,
    rl_models: RLModels,
    ptx: PtxBatch | None = None,
    optimizers: Optimizers | None = None,
) -> tuple[RLState, dict[str, jax.Array]]:
    """One whole iteration scored by the reward model (`rl_models.reward`). Pure; jit it with
    `config` and `rl_models` static (`jit_iteration`)."""
    if rl_models.reward is None:
        raise ValueError(
            "iteration() scores with the reward model but rl_models.reward is None; use "
            "make_host_iteration() for Python reward functions"
        )
    rollout_key, update_key = jax.random.split(key)
    roll = rollout(
        state, frozen, prompts_NP, prompt_mask_NP, rollout_key, config=config, rl_models=rl_models
    )
    scores = score_rollout(state, frozen, roll, rl_models=rl_models)
    return finish_iteration(
        state,
        roll,
        scores,
        update_key,
        config=config,
        rl_models=rl_models,
        ptx=ptx,
        optimizers=optimizers,
    )


def jit_iteration(
    config: RLConfig,
    rl_models: RLModels,
    mesh: jax.sharding.Mesh | None = None,
    rules: tuple[tuple[str, Any], ...] | None = None,
    optimizers: Optimizers | None = None,
    **jit_kwargs: Any,
):
    """`iteration` jitted with the configs bound and the state donated:
    `fn(state, frozen, prompts_NP, prompt_mask_NP, key, ptx=None) -> (state, metrics)`.
    Each call of `jit_iteration` returns a new function that compiles on its first call: keep it.

    Without a `mesh` this is a plain `jax.jit`. With a `mesh` (and logical-axis `rules`, default
    `sharding.DEFAULT_RULES`) inputs and outputs get the shardings of `rl_shardings`: params and
    optimiser states by the models' logical axes, prompts, the key, scalars and metrics
    replicated, a `PtxBatch` split over `("data", "fsdp")`; the returned state keeps the input
    state's shardings, so the donated buffers are reused. The function is traced inside
    `sharding.with_rules(mesh, rules)`. Batch statistics (baselines, whitening, metric means)
    are over the global batch. Build the state with `jit_init_state`.
    """

    def fn(state, frozen, prompts_NP, prompt_mask_NP, key, ptx=None):
        return iteration(
            state,
            frozen,
            prompts_NP,
            prompt_mask_NP,
            key,
            config=config,
            rl_models=rl_models,
            ptx=ptx,
            optimizers=optimizers,
        )

    if mesh is None:
        return sh.jit_with_rules(fn, None, rules, donate_argnums=(0,), **jit_kwargs)
    s = rl_shardings(config, rl_models, mesh, rules, optimizers)
    rep = s.replicated
    return sh.jit_with_rules(
        fn,
        mesh,
        rules,
        in_shardings=(s.state, s.frozen, rep, rep, rep, s.batch),
        out_shardings=(s.state, rep),
        donate_argnums=(0,),
        **jit_kwargs,
    )


class NonFiniteError(FloatingPointError):
    """Raised by `check_finite` when an iteration produced NaN/inf."""


def check_finite(metrics: dict[str, Any], iteration: int) -> None:
    """Raises `NonFiniteError` naming the iteration and quantity when scores, rewards, losses or
    gradients were not finite (updates with non-finite gradients were already skipped)."""
    bad = {k: float(v) for k, v in metrics.items() if k.startswith("nonfinite/") and float(v) > 0}
    for name in ("loss/policy_avg", "loss/value_avg", "objective/scores"):
        if name in metrics and not np.isfinite(metrics[name]):  # host values: no device work
            bad[name] = float(metrics[name])
    if bad:
        described = ", ".join(f"{k}={v:g}" for k, v in sorted(bad.items()))
        raise NonFiniteError(
            f"iteration {iteration}: non-finite values ({described}); the parameters were not "
            "updated with them. Lower the learning rate, check the reward function/model, or "
            "resume from the last checkpoint."
        )


# ------------------------------------------------------------------------------------ phases


class IterationPrograms(NamedTuple):
    """The jitted phases of an iteration (`iteration_programs`) and the state's layout.

    Attributes:
      shardings: `rl_shardings` on the mesh (None without one).
      abstract_state: the `RLState`'s shapes and dtypes.
      init: `init(policy_params, value_params=None) -> RLState`, born with its shardings.
      rollout: `rollout(state, frozen, prompts_NP, prompt_mask_NP, key) -> Rollout`.
      score: `score(state, frozen, roll, width=...) -> scores [B]` (the reward model).
      finish: `finish(state, roll, scores, key, ptx=None, width=...) -> (state, metrics)`
        (`finish_iteration`; the state is donated).
    """

    shardings: RLShardings | None
    abstract_state: RLState
    init: Callable[..., RLState]
    rollout: Callable[..., Rollout]
    score: Callable[..., jax.Array]
    finish: Callable[..., tuple[RLState, dict[str, jax.Array]]]


@functools.cache
def iteration_programs(
    config: RLConfig,
    rl_models: RLModels,
    mesh: jax.sharding.Mesh | None = None,
    optimizers: Optimizers | None = None,
) -> IterationPrograms:
    """The jitted phases of an iteration (cached: runs with the same configs and mesh share
    them, whatever their reward). Together they compute what `iteration` computes:

        rollout_key, update_key = split(key)
        roll = rollout(state, frozen, prompts, mask, rollout_key)
        width = config.bucket_width(roll's sequence lengths)          # on the host
        scores = score(state, frozen, roll, width=width)  or  Python reward functions
        state, metrics = finish(state, roll, scores, update_key, width=width)

    `score` and `finish` run on the response columns cut to `width` (`slice_rollout`), compiled
    once per length bucket they meet. Without a mesh the rollout is one module-level jitted
    function shared by every config with the same `rollout_spec` (`shared_rollout`).
    """
    kwargs = dict(config=config, rl_models=rl_models)
    spec = rollout_spec(config)

    def init(policy_params, value_params=None):
        return init_state(
            policy_params, config, rl_models, value_params=value_params, optimizers=optimizers
        )

    def roll_fn(state, frozen, prompts, mask, key):
        return rollout_from_spec(state, frozen, prompts, mask, key, spec=spec, rl_models=rl_models)

    def score(state, frozen, roll, *, width):
        return score_rollout(state, frozen, slice_rollout(roll, width), rl_models=rl_models)

    def finish(state, roll, scores, key, ptx=None, *, width):
        roll = slice_rollout(roll, width)
        return finish_iteration(state, roll, scores, key, ptx=ptx, optimizers=optimizers, **kwargs)

    abstract = abstract_state(config, rl_models, optimizers)
    if mesh is None:
        return IterationPrograms(
            None,
            abstract,
            jax.jit(init),
            functools.partial(shared_rollout, spec=spec, rl_models=rl_models),
            jax.jit(score, static_argnames="width"),
            jax.jit(finish, donate_argnums=(0,), static_argnames="width"),
        )
    s = rl_shardings(config, rl_models, mesh, None, optimizers)
    jit = functools.partial(sh.jit_with_rules, mesh=mesh)
    return IterationPrograms(
        s,
        abstract,
        jit(init, out_shardings=s.state),
        jit(roll_fn),
        jit(score, static_argnames="width"),
        jit(
            finish,
            out_shardings=(s.state, s.replicated),
            donate_argnums=(0,),
            static_argnames="width",
        ),
    )


ScoreFn = Callable[..., Any]


def score_and_finish(
    programs: IterationPrograms,
    config: RLConfig,
    rl_models: RLModels,
    state: RLState,
    frozen: FrozenParams,
    roll: Rollout,
    key: jax.Array,
    *,
    host_score: Callable[[Rollout], Any] | None = None,
    ptx: PtxBatch | None = None,
) -> tuple[RLState, dict[str, jax.Array], dict[str, Any], Any]:
    """The second half of a phased iteration: the batch's length bucket (on the host), the
    reward model's scores on it (`programs.score`, when `rl_models.reward` is set), then
    `host_score(roll)` (when given; `roll.model_scores` holds the model's scores) returning the
    scores `[B]` or `(scores, metrics)`, and the update (`programs.finish`, state donated).

    Returns `(state, device_metrics, host_metrics, scores)`; `host_metrics` holds
    `perf/response_bucket` and the host function's metrics.
    """
    width = config.bucket_width(to_host(roll.generation.sequence_lengths))
    scores, host_metrics = None, {"perf/response_bucket": float(width)}
    if rl_models.reward is not None:
        scores = programs.score(state, frozen, roll, width=width)
    if host_score is not None:
        out = host_score(roll._replace(model_scores=scores))
        if isinstance(out, tuple):
            out, metrics = out
            host_metrics.update(metrics)
        scores = np.asarray(out, np.float32)
        if scores.shape != (config.batch_size,):
            raise ValueError(
                f"the host score function must return {config.batch_size} scores (num_prompts "
                f"x group_size), got shape {list(scores.shape)}"
            )
        if programs.shardings is not None:  # every process has every score
            scores = sh.place_replicated(scores, programs.shardings.replicated.mesh)
    state, metrics = programs.finish(state, roll, scores, key, ptx, width=width)
    return state, metrics, host_metrics, scores


def make_host_iteration(
    config: RLConfig,
    rl_models: RLModels,
    score_fn: ScoreFn,
    *,
    mesh: jax.sharding.Mesh | None = None,
    optimizers: Optimizers | None = None,
) -> Callable[..., tuple[RLState, dict[str, Any]]]:
    """An iteration whose scores come from Python: the phases of `iteration_programs` with
    `score_fn` on the host between them (`score_and_finish`).

    Args:
      score_fn: called as `score_fn(roll, *score_args, **score_kwargs)` with the `Rollout`
        (device arrays; `model_scores` holds the reward model's scores when `rl_models.reward` is
        set) and whatever extra arguments `step` got (e.g. the batch's prompt texts); returns the
        scores `[B]` (array or list of floats) or `(scores, metrics)` with a dict of host floats
        added to the metrics (see `reward_functions.make_score_fn`).
      mesh: run the phases on this mesh (`iteration_programs`).
    Returns:
      `step(state, frozen, prompts_NP, prompt_mask_NP, key, *score_args, **score_kwargs) ->
      (state, metrics)`; with the same key and a `score_fn` returning the reward model's scores
      it computes what `iteration` computes (same functions and keys; XLA may round differently
      across the compilations). `step.programs` are the phases.
    """
    programs = iteration_programs(config, rl_models, mesh, optimizers)

    def step(state, frozen, prompts_NP, prompt_mask_NP, key, *score_args, **score_kwargs):
        rollout_key, update_key = jax.random.split(key)
        roll = programs.rollout(state, frozen, prompts_NP, prompt_mask_NP, rollout_key)
        host_score = lambda r: score_fn(r, *score_args, **score_kwargs)  # noqa: E731
        state, metrics, host_metrics, _ = score_and_finish(
            programs, config, rl_models, state, frozen, roll, update_key, host_score=host_score
        )
        return state, {**metrics, **host_metrics}

    step.programs = programs  # type: ignore[attr-defined]
    return step
