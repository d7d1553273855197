"""Optimisation for every trainer (PPO, RLOO, GRPO, REINFORCE++, SFT, reward modelling).

- `lr_schedule`: the one learning-rate schedule (warm-up, then linear or cosine decay to a floor).
- `adamw`: AdamW on a schedule, after optional global-norm clipping.
- `scan_epochs`, `accumulate_grads`, `apply_if_finite` and `summarize_update`: the update loop of
  every RL algorithm (epochs x minibatches x micro-batches as nested `lax.scan`s with a fresh
  permutation per epoch, gradient accumulation, optimiser steps skipped when anything is not
  finite, and the summary of the per-minibatch metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import sharding as sh

Decay = Literal["linear", "cosine"]
DECAYS = ("linear", "cosine")


def check_schedule(decay: str, min_lr_ratio: float) -> None:
    """Raises ValueError for an unknown decay or a floor outside [0, 1] (config validation)."""
    if decay not in DECAYS:
        raise ValueError(f"lr_decay must be one of {DECAYS}, got {decay!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def lr_schedule(
    peak_lr: float,
    *,
    total: int,
    warmup: int = 0,
    steps_per_unit: int = 1,
    decay: Decay = "linear",
    min_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """The learning rate as a function of the optimiser step count.

    The schedule counts in units of `steps_per_unit` optimiser steps and is constant within a
    unit. RL trainers step their scheduler once per iteration (TRL, OpenRLHF), so their unit is an
    iteration of `epochs x minibatches` optimiser steps; supervised trainers use units of one step.
    In unit `u` (0-based):

    - warm-up, `u < warmup`: `(u + 1) / warmup` of the peak, so the first unit already trains
      (Hugging Face's warm-up starts at 0, which would leave a first PPO iteration unchanged);
    - then a decay over units `warmup .. total` from the peak to `min_lr_ratio * peak_lr`:
      "linear" (TRL's default, to 0) or "cosine" (half a cosine; "Secrets of RLHF" decays to 10%
      of the peak); after `total` units the rate stays at that floor.

    Args:
      peak_lr: the learning rate after warm-up.
      total: units until the end of the decay (>= 1).
      warmup: warm-up units (>= 0).
      steps_per_unit: optimiser steps per unit (>= 1).
      decay: "linear" | "cosine".
      min_lr_ratio: the floor as a fraction of `peak_lr`, in [0, 1].
    Returns:
      An optax schedule: `count (int32 scalar) -> learning rate (float32 scalar)`.
    """
    check_schedule(decay, min_lr_ratio)
    if total < 1 or warmup < 0 or steps_per_unit < 1:
        raise ValueError(
            f"need total >= 1, warmup >= 0 and steps_per_unit >= 1, got {total}, {warmup}, "
            f"{steps_per_unit}"
        )
    decay_units = max(total - warmup, 1)

    def schedule(count: jax.Array) -> jax.Array:
        unit = (count // steps_per_unit).astype(jnp.float32)
        warm = (unit + 1.0) / warmup if warmup else 1.0
        progress = jnp.clip((unit - warmup) / decay_units, 0.0, 1.0)
        if decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        factor = min_lr_ratio + (1.0 - min_lr_ratio) * shape
        return peak_lr * jnp.where(unit < warmup, warm, factor)

    return schedule


def check_trainable(params: Any, what: str = "trained params") -> None:
    """Raises ValueError when a floating leaf of `params` is narrower than float32.

    Adam's update is `lr * m / sqrt(v)`, about `lr` per weight: at RL learning rates (1e-6 to
    1e-5) that is below half a bfloat16 ulp of weights of magnitude ~0.02 (2^-6 * 2^-8 ~ 6e-5),
    so most of each step rounds away and the model silently does not learn. Trained params and
    their moments stay float32 (master weights); bfloat16 is for the compute dtype and for the
    frozen models.
    """
    narrow = sorted(
        {
            str(leaf.dtype)
            for leaf in jax.tree.leaves(params)
            if jnp.issubdtype(leaf.dtype, jnp.floating) and jnp.finfo(leaf.dtype).bits < 32
        }
    )
    if narrow:
        raise ValueError(
            f"{what} are {'/'.join(narrow)}: optimiser steps at RL learning rates round away in "
            "so few bits and the model does not learn. Keep trained params float32 "
            "(models.param_dtype=float32) and compute in bfloat16 instead (models.dtype=bfloat16); "
            "frozen models may be stored in bfloat16 (models.frozen_dtype=bfloat16)"
        )


NO_DECAY = ("bias", "scale")


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: every parameter except biases and norm
    scales (leaves named `bias` or `scale`), i.e. the weight matrices and embeddings."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return name not in NO_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    max_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """`optax.adamw`, after global-norm clipping of the gradients unless `max_grad_norm` is None
    (the state is then `(clip_state, adamw_state)`). Weight decay skips biases and norm scales
    (`decay_mask`), as Hugging Face's Trainer and TRL do."""
    tx = optax.adamw(learning_rate, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm is None:
        return tx
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)


def scan_epochs(
    minibatch_step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]],
    state: Any,
    key: jax.Array,
    *,
    epochs: int,
    batch_size: int,
    num_mini_batches: int,
    gradient_accumulation_steps: int,
    per_minibatch: Any = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """`epochs` passes over a batch of `batch_size` rows, each in a fresh random order, as nested
    `lax.scan`s (epochs -> minibatches).

    `minibatch_step(state, (rows_AU, extra)) -> (state, aux)` gets the row indices `[A, U]` of its
    `A = gradient_accumulation_steps` micro-batches of `U` rows and its slice of `per_minibatch`
    (a pytree with leading axis `num_mini_batches`, e.g. a PPO-ptx batch; None: nothing).
    Returns the final state and the aux metrics stacked `[epochs, num_mini_batches, ...]`.
    """
    micro = batch_size // (num_mini_batches * gradient_accumulation_steps)

    def epoch_step(state: Any, epoch_key: jax.Array):
        perm = jax.random.permutation(epoch_key, batch_size)
        rows = perm.reshape(num_mini_batches, gradient_accumulation_steps, micro)
        return jax.lax.scan(minibatch_step, state, (rows, per_minibatch))

    return jax.lax.scan(epoch_step, state, jax.random.split(key, epochs))


def summarize_update(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The iteration's update metrics from `scan_epochs`' stacked aux `[epochs, minibatches]`:
    means, the count of skipped (non-finite) updates, TRL's `val/ratio_var` (the variance of the
    minibatch mean ratios), and the first minibatch's ratio std and approximate KL. The first
    minibatch of the first epoch sees the rollout policy: ratio 1 and KL 0 up to the numeric gap
    between sampling and the training forward (the mixed-precision health check)."""
    metrics = {k: jnp.mean(v) for k, v in aux.items() if not k.startswith("nonfinite")}
    metrics["nonfinite/updates"] = jnp.sum(aux["nonfinite/updates"])
    metrics["val/ratio_var"] = jnp.var(aux["val/ratio"])
    metrics["val/ratio_mean_var"] = jnp.mean(aux["val/ratio_var"])
    metrics["policy/first_ratio_std"] = jnp.sqrt(aux["val/ratio_var"][0, 0])
    metrics["policy/first_approxkl"] = aux["policy/approxkl_avg"][0, 0]
    return metrics


def accumulate_grads(
    grad_fn: Callable[[Any], tuple[Any, dict[str, jax.Array]]],
    params: Any,
    micro_inputs: Any,
    n_micro: int,
    *,
    param_specs: Any = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """Mean gradients over `n_micro` micro-batches (the leading axis of `micro_inputs`) and the
    mean of their aux metrics. `grad_fn(one_micro_batch) -> (grads, aux)`; `params` gives the
    gradients' structure. One micro-batch calls it directly (no accumulation buffers), more run
    as a `lax.scan` that adds `grads / n_micro`.

    `param_specs`: the logical `PartitionSpec`s of `params` (e.g. `models.logical_axes(config)`).
    Traced on a mesh (`sharding.with_rules`), each micro-batch's gradients and the accumulator
    are constrained to the params' shardings (`sharding.constrain`), as levanter's `grad_accum`
    does: the carry then holds each device's shard of the float32 gradient instead of a full
    copy, and the gradients are reduce-scattered, not all-reduced. Without a mesh (or with
    None) nothing changes.
    """

    def constrain(grads: Any) -> Any:
        return grads if param_specs is None else sh.constrain(grads, param_specs)

    if n_micro == 1:
        grads, aux = grad_fn(jax.tree.map(lambda x: x[0], micro_inputs))
        return constrain(grads), aux

    def step(acc, inputs):
        grads, aux = grad_fn(inputs)
        grads = constrain(grads)
        return constrain(jax.tree.map(lambda a, g: a + g / n_micro, acc, grads)), aux

    zeros = constrain(jax.tree.map(jnp.zeros_like, params))
    grads, aux = jax.lax.scan(step, zeros, micro_inputs)
    return grads, jax.tree.map(jnp.mean, aux)


def apply_if_finite(
    models: Sequence[tuple[optax.GradientTransformation, Any, Any, Any]], loss: jax.Array
) -> tuple[list[tuple[Any, Any]], jax.Array, list[jax.Array]]:
    """Applies one optimiser step per `(tx, grads, opt_state, params)`, all or none.

    The step is skipped (params and optimiser moments unchanged) when `loss` or any
    gradient norm is not finite; the norms are `optax.tree.norm`, so an inf or NaN anywhere in
    a gradient makes its norm non-finite (as does a finite gradient whose squares overflow, which
    global-norm clipping could not use either). A `lax.cond`, so a skipped step costs nothing.
    A skipped step still advances the learning-rate schedules' step counters (not Adam's), as
    PyTorch's scheduler steps past an optimiser step that a gradient scaler skipped, so the
    schedule keeps following the iteration.

    Returns `[(params, opt_state), ...]`, `ok` (bool scalar, the step was applied) and the
    gradient norms.
    """
    norms = [optax.tree.norm(grads) for _, grads, _, _ in models]
    ok = jnp.isfinite(loss)
    for norm in norms:
        ok = ok & jnp.isfinite(norm)

    def apply(_):
        out = []
        for tx, grads, opt_state, params in models:
            updates, opt_state = tx.update(grads, opt_state, params)
            out.append((optax.apply_updates(params, updates), opt_state))
        return out

    def keep(_):
        return [(params, _advance_schedules(opt_state)) for _, _, opt_state, params in models]

    return jax.lax.cond(ok, apply, keep, None), ok, norms


def _is_schedule_state(node: Any) -> bool:
    return isinstance(node, optax.ScaleByScheduleState)


def _advance_schedules(opt_state: Any) -> Any:
    """`opt_state` with the step counter of every `scale_by_schedule` (the learning-rate schedule
    inside `optax.adamw(schedule)`) advanced by one."""
    return jax.tree.map(
        lambda node: (
            node._replace(count=optax.safe_increment(node.count))
            if _is_schedule_state(node)
            else node
        ),
        opt_state,
        is_leaf=_is_schedule_state,
    )
