"""The one learning-rate schedule and optimiser (`rlhf_jax.optim`) against the formulas."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import REORDERED, assert_f32_close

import rlhf_jax as rj
from rlhf_jax import optim, sft


def np_lr(step, *, peak, total, warmup, per_unit, decay, floor):
    """The schedule written out from its docstring, in float64."""
    unit = step // per_unit
    if unit < warmup:
        return peak * (unit + 1) / warmup
    progress = min(max((unit - warmup) / max(total - warmup, 1), 0.0), 1.0)
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (floor + (1.0 - floor) * shape)


class ScheduleTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_against_the_formula(self):
        for decay, floor, warmup, per_unit in [
            ("linear", 0.0, 0, 1),
            ("linear", 0.0, 3, 4),
            ("cosine", 0.1, 2, 3),
            ("cosine", 0.0, 0, 2),
            ("linear", 0.25, 1, 1),
        ]:
            kw = dict(total=10, warmup=warmup, decay=decay)
            fn = optim.lr_schedule(2e-5, steps_per_unit=per_unit, min_lr_ratio=floor, **kw)
            steps = np.arange(0, 14 * per_unit)
            got = np.asarray([self.variant(fn)(jnp.int32(s)) for s in steps])
            want = [np_lr(s, peak=2e-5, per_unit=per_unit, floor=floor, **kw) for s in steps]
            assert_f32_close(got, want, ulps=REORDERED, err_msg=f"{decay} {floor} {warmup}")
            # Constant within a unit; the floor after the decay; the first unit trains.
            assert np.all(got.reshape(-1, per_unit) == got.reshape(-1, per_unit)[:, :1])
            assert_f32_close(got[-1], 2e-5 * floor, ulps=REORDERED, scale=2e-5)
            assert got[0] > 0

    def test_bad_options_are_errors(self):
        with pytest.raises(ValueError, match="lr_decay must be one of"):
            optim.lr_schedule(1e-5, total=10, decay="step")
        with pytest.raises(ValueError, match=r"min_lr_ratio must be in \[0, 1\]"):
            optim.lr_schedule(1e-5, total=10, min_lr_ratio=1.5)
        with pytest.raises(ValueError, match="total >= 1"):
            optim.lr_schedule(1e-5, total=0)
        # The trainers' configs check the same options when they are built.
        with pytest.raises(ValueError, match="lr_decay"):
            rj.PPOConfig(batch_size=4, lr_decay="exponential")
        with pytest.raises(ValueError, match="min_lr_ratio"):
            rj.GRPOConfig(num_prompts=2, num_generations=2, min_lr_ratio=-0.1)
        with pytest.raises(ValueError, match="lr_decay"):
            sft.TrainConfig(lr_decay="exp")


def test_every_trainer_uses_the_one_schedule():
    """PPO, the critic-free algorithms and SFT read their learning rate from `lr_schedule` with
    their own units: iterations of epochs x minibatches steps, or single steps."""
    config = rj.PPOConfig(
        batch_size=4,
        num_mini_batches=2,
        num_ppo_epochs=3,
        total_iterations=8,
        warmup_iterations=2,
        lr_decay="cosine",
        min_lr_ratio=0.1,
        learning_rate=1e-5,
    )
    want = [
        np_lr(6 * i, peak=1e-5, total=8, warmup=2, per_unit=6, decay="cosine", floor=0.1)
        for i in range(10)
    ]
    got = [float(config.learning_rate_at(i)) for i in range(10)]
    assert_f32_close(got, want, ulps=REORDERED)
    grpo = rj.GRPOConfig(
        num_prompts=2,
        num_generations=2,
        total_iterations=8,
        warmup_iterations=2,
        lr_decay="cosine",
        min_lr_ratio=0.1,
        learning_rate=1e-5,
    )
    per = grpo.epochs * grpo.num_mini_batches
    want = [
        np_lr(per * i, peak=1e-5, total=8, warmup=2, per_unit=per, decay="cosine", floor=0.1)
        for i in range(10)
    ]
    assert_f32_close([float(grpo.learning_rate_at(i)) for i in range(10)], want, ulps=REORDERED)
    # SFT: the optimiser's first update is scaled by the warm-up's first step, 1/warmup.
    train = sft.TrainConfig(learning_rate=1e-3, total_steps=10, warmup_steps=4, max_grad_norm=None)
    tx = train.optimizer()
    params = {"w": jnp.ones(3)}
    updates, _ = jax.jit(tx.update)({"w": jnp.ones(3)}, tx.init(params), params)
    assert_f32_close(updates["w"], np.full(3, -1e-3 / 4), ulps=REORDERED)
    assert dataclasses.replace(train, lr_decay="cosine").optimizer() is not None


def test_every_trainer_refuses_16_bit_trained_params():
    """Adam moves each weight by about the learning rate; at RL rates that is below half a
    bfloat16 ulp of typical weights, so 16-bit trained params would not learn (optim docs)."""
    params = {"w": jnp.full((4, 4), 0.02, jnp.bfloat16), "step": jnp.zeros((), jnp.int32)}
    tx = optim.adamw(3e-6)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert bool(jnp.all(optax.apply_updates(params, updates)["w"] == params["w"]))  # the problem
    optim.check_trainable(jax.tree.map(lambda x: x.astype(jnp.float32), params))
    for init in (
        lambda p: rj.init_state(p, rj.GRPOConfig(num_prompts=2, num_generations=2)),
        lambda p: sft.init_train_state(p, sft.TrainConfig()),
        lambda p: rj.init_state(p, rj.PPOConfig(batch_size=4), value_params={"v": jnp.zeros(2)}),
    ):
        with pytest.raises(ValueError, match="bfloat16: optimiser steps at RL learning rates"):
            init(params)
        with pytest.raises(ValueError, match="float16"):
            init({"w": jnp.zeros(3, jnp.float16)})


def test_weight_decay_skips_biases_and_norm_scales():
    """With zero gradients AdamW only decays: kernels and embeddings shrink by lr * wd * w, biases
    and norm scales (Hugging Face's and TRL's exclusions) stay put."""
    params = {
        "embed": {"embedding": jnp.ones((3, 2))},
        "layers": {"mlp": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
        "final_norm": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
    }
    tx = optim.adamw(0.1, weight_decay=0.5, max_grad_norm=1.0)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert_f32_close(new["embed"]["embedding"], np.full((3, 2), 0.95), ulps=REORDERED)
    assert_f32_close(new["layers"]["mlp"]["kernel"], np.full((2, 2), 0.95), ulps=REORDERED)
    for leaf in (
        new["layers"]["mlp"]["bias"],
        new["final_norm"]["scale"],
        new["final_norm"]["bias"],
    ):
        np.testing.assert_array_equal(leaf, 1.0)
