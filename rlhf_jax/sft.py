"""Supervised fine-tuning: masked next-token loss on completion tokens, as a pure jitted step.

Also holds the small pieces SFT and reward-model training share: `TrainConfig` (optimiser and
schedule), `TrainState` and `make_train_step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax import sharding as sh
from rlhf_jax.logprobs import logprobs_from_hidden
from rlhf_jax.models import lora
from rlhf_jax.models.lora import LoRAConfig
from rlhf_jax.ops import masked_mean
from rlhf_jax.optim import (
    Decay,
    accumulate_grads,
    adamw,
    check_schedule,
    check_trainable,
    lr_schedule,
)
from rlhf_jax.sampling import prompt_positions

Params = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimiser settings for SFT and reward-model training.

    Attributes:
      learning_rate: peak AdamW learning rate.
      total_steps: optimiser steps; the rate decays to its floor over them after warmup.
      warmup_steps: linear warmup; step `s < warmup_steps` uses `(s + 1) / warmup_steps` of the
        peak (see `optim.lr_schedule`).
      lr_decay, min_lr_ratio: "linear" or "cosine" decay, to `min_lr_ratio` of the peak.
      weight_decay, adam_eps: AdamW settings.
      max_grad_norm: global-norm clipping (None: off).
      gradient_accumulation_steps: micro-batches averaged per optimiser step (the batch's leading
        axis must divide by it).
    """

    learning_rate: float = 1e-4
    total_steps: int = 1000
    warmup_steps: int = 0
    lr_decay: Decay = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.warmup_steps < 0 or self.gradient_accumulation_steps < 1:
            raise ValueError(
                "total_steps and gradient_accumulation_steps must be >= 1 and warmup_steps >= 0, "
                f"got {self.total_steps}, {self.gradient_accumulation_steps}, {self.warmup_steps}"
            )
        check_schedule(self.lr_decay, self.min_lr_ratio)

    def optimizer(self) -> optax.GradientTransformation:
        schedule = lr_schedule(
            self.learning_rate,
            total=self.total_steps,
            warmup=self.warmup_steps,
            decay=self.lr_decay,
            min_lr_ratio=self.min_lr_ratio,
        )
        return adamw(
            schedule,
            weight_decay=self.weight_decay,
            eps=self.adam_eps,
            max_grad_norm=self.max_grad_norm,
        )


class TrainState(flax.struct.PyTreeNode):
    """Parameters, optimiser state and step count of a supervised stage (a pytree)."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array


def init_train_state(
    params: Params, config: TrainConfig, lora_config: LoRAConfig | None = None
) -> TrainState:
    """A fresh state owning a copy of `params` (float32: `optim.check_trainable`). With LoRA
    (`lora_config`, the model's `ModelConfig.lora`) only the trainable half (`lora.split`) has
    AdamW moments and must be float32."""
    trainable, _ = lora.split(params, lora_config)
    check_trainable(trainable)
    opt_state = config.optimizer().init(trainable)  # (only shapes are read)
    return TrainState(jax.tree.map(jnp.copy, params), opt_state, jnp.zeros((), jnp.int32))


LossFn = Callable[[Params, Any], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(
    loss_fn: LossFn,
    config: TrainConfig,
    *,
    param_specs: Params | None = None,
    lora_config: LoRAConfig | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)`: gradient accumulation over the leading batch
    axis (`optim.accumulate_grads`), one AdamW update. `loss_fn(params, micro_batch) ->
    (loss, aux)`. Jit the result (donate the state); `jit_train_step` does, on a mesh.

    `param_specs`: the params' logical `PartitionSpec`s (`models.logical_axes`). Traced on a
    mesh, the gradient accumulator is sharded like the params and each micro-batch is split over
    `("data", "fsdp")` like the batch (see `optim.accumulate_grads`). With `lora_config` only
    the trainable half of the params (`lora.split`) is differentiated and updated."""
    tx = config.optimizer()
    n_acc = config.gradient_accumulation_steps
    if param_specs is not None:
        param_specs = lora.split(param_specs, lora_config)[0]

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        leading = jax.tree.leaves(batch)[0].shape[0]
        if leading % n_acc:
            raise ValueError(
                f"batch of {leading} rows does not divide into {n_acc} accumulation steps"
            )
        micro = jax.tree.map(lambda x: x.reshape(n_acc, leading // n_acc, *x.shape[1:]), batch)
        micro = sh.constrain_batch(micro, axis=1)

        trainable, frozen = lora.split(state.params, lora_config)
        grad_fn = jax.value_and_grad(lambda t, mb: loss_fn(lora.join(t, frozen), mb), has_aux=True)

        def micro_grads(mb: Any) -> tuple[Params, dict[str, jax.Array]]:
            (loss, aux), grads = grad_fn(trainable, mb)
            return grads, {**aux, "loss": loss}

        grads, metrics = accumulate_grads(
            micro_grads, trainable, micro, n_acc, param_specs=param_specs
        )
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        metrics["grad_norm"] = optax.tree.norm(grads)
        params = lora.join(optax.apply_updates(trainable, updates), frozen)
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


def train_state_shardings(
    model_config: models.ModelConfig,
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules | None = None,
) -> TrainState:
    """Where a `TrainState` of a `model_config` model lives on `mesh` (shapes only): the params
    by the model's logical axes (`models.param_shardings`, as the RL trainers place them), the
    AdamW moments mirroring them (`sharding.optimizer_state_shardings`), the step replicated."""
    params = models.param_shardings(model_config, mesh, rules)
    abstract_params = models.param_shapes(model_config)
    abstract = jax.eval_shape(
        lambda p: init_train_state(p, config, model_config.lora), abstract_params
    )
    opt_state = sh.optimizer_state_shardings(abstract.opt_state, params, mesh)
    return TrainState(params, opt_state, sh.replicated(mesh))


def jit_init_train_state(
    model_config: models.ModelConfig,
    config: TrainConfig,
    mesh: jax.sharding.Mesh | None = None,
    rules: sh.Rules | None = None,
) -> Callable[[Params], TrainState]:
    """`init_train_state` jitted: `fn(params) -> TrainState`. With a `mesh` the params are
    expected with, and the state is born with, the shardings of `train_state_shardings`."""
    fn = lambda params: init_train_state(params, config, model_config.lora)  # noqa: E731
    if mesh is None:
        return sh.jit_with_rules(fn, None, rules)
    s = train_state_shardings(model_config, config, mesh, rules)
    return sh.jit_with_rules(fn, mesh, rules, in_shardings=(s.params,), out_shardings=s)


def jit_train_step(
    step: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]],
    model_config: models.ModelConfig,
    config: TrainConfig,
    mesh: jax.sharding.Mesh | None = None,
    rules: sh.Rules | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """A `make_sft_step` / `make_rm_step` step jitted with the state donated. With a `mesh`
    (the RL trainers' `mesh` section) the state keeps `train_state_shardings`, the batch's `[B, S]`
    arrays are split over `("data", "fsdp")` (`sharding.place_batch`; B divisible by data x fsdp),
    the metrics are replicated, and the step is traced inside `sharding.with_rules`, so the
    models' activation constraints and the step's own (accumulator like the params, micro-batches
    like the batch) apply."""
    if mesh is None:
        return sh.jit_with_rules(step, None, rules, donate_argnums=(0,))
    s = train_state_shardings(model_config, config, mesh, rules)
    return sh.jit_with_rules(
        step,
        mesh,
        rules,
        in_shardings=(s, sh.batch_sharding(mesh, 2)),
        out_shardings=(s, sh.replicated(mesh)),
        donate_argnums=(0,),
    )


class SFTBatch(NamedTuple):
    """`tokens`/`mask` int/bool `[B, S]` (prompt + completion, any padding side);
    `loss_mask` bool `[B, S]`: True on the tokens to be predicted (the completion, its stop token
    included; prompt and padding False)."""

    tokens: jax.Array
    mask: jax.Array
    loss_mask: jax.Array


def sft_loss(
    params: Params, config: models.ModelConfig, batch: SFTBatch
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean negative log-likelihood of the `loss_mask` tokens given everything before them.

    Returns `(loss, aux)`; aux `num_tokens` counts the supervised tokens."""
    tokens, mask = jnp.asarray(batch.tokens), jnp.asarray(batch.mask, bool)
    hidden, _ = models.forward(params, config, tokens, prompt_positions(mask), mask)
    targets = tokens[:, 1:]
    logprobs, _ = logprobs_from_hidden(
        hidden[:, :-1], targets, lambda h: models.lm_logits(params, config, h)
    )
    loss_mask = jnp.asarray(batch.loss_mask, bool)[:, 1:]
    return -masked_mean(logprobs, loss_mask), {"num_tokens": jnp.sum(loss_mask).astype(jnp.float32)}


def make_sft_step(model_config: models.ModelConfig, config: TrainConfig):
    """The SFT `step(state, SFTBatch) -> (state, metrics)`; jit it."""
    return make_train_step(
        lambda p, b: sft_loss(p, model_config, b),
        config,
        param_specs=models.logical_axes(model_config),
        lora_config=model_config.lora,
    )
