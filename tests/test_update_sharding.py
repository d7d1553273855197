"""Updates state their shardings instead of leaving them to propagation (issue #25 item 5).

On an 8-device fsdp mesh, the compiled PPO, GRPO and SFT updates (gradient accumulation over
micro-batches picked through a global permutation, AdamW) keep their temporaries below one
unsharded float32 gradient: the accumulator carried through the micro-batch `lax.scan` is a
shard per device, like the params. A negative control shows the bound catches an accumulator
that holds the whole gradient on every device. The traced updates constrain the accumulator to
the params' shardings and the micro-batches to the batch's (`sharding.constrain`,
`sharding.constrain_batch`); without a mesh the same functions run unchanged.

The model (6 scanned layers of width 256, vocabulary 64, a few tokens per row) has params large
against its activations, so a full gradient is what would push the temporaries over the bound.
Compiled from abstract inputs only (nothing runs).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tolerances import GRADIENT, assert_f32_close

import rlhf_jax as rj
from rlhf_jax import models, optim, sft
from rlhf_jax import sharding as sh
from rlhf_jax.core.state import abstract_params

# The module (`rlhf_jax.core.update` the attribute is the function `update`).
core_update = importlib.import_module("rlhf_jax.core.update")

POLICY = models.ModelConfig(
    family="llama",
    vocab_size=64,
    hidden_size=256,
    num_layers=6,
    num_heads=8,
    num_kv_heads=8,
    head_dim=32,
    intermediate_size=512,
    max_position_embeddings=64,
    scan_layers=True,
)
VALUE = dataclasses.replace(POLICY, head="score", num_labels=1)
PROMPT, RESPONSE = 4, 4
PPO_CONFIG = rj.PPOConfig(
    batch_size=16,
    response_length=RESPONSE,
    stop_token_ids=(2,),
    num_ppo_epochs=1,
    num_mini_batches=2,
    gradient_accumulation_steps=2,
    total_iterations=10,
)
PPO_MODELS = rj.RLModels(policy=POLICY, value=VALUE, reward=VALUE)
GRPO_CONFIG = rj.GRPOConfig(
    num_prompts=4,
    num_generations=4,
    response_length=RESPONSE,
    stop_token_ids=(2,),
    num_mini_batches=2,
    gradient_accumulation_steps=2,
    beta=0.04,
)
CF_MODELS = rj.RLModels(policy=POLICY, reward=None)
SFT_CONFIG = sft.TrainConfig(gradient_accumulation_steps=2)
SFT_BATCH, SFT_LENGTH = 16, 8


@functools.cache
def mesh():
    return sh.make_mesh(sh.MeshConfig(data=1, fsdp=8, tensor=1))


def abstract(tree, shardings):
    """`tree`'s shapes and dtypes with `shardings` (a tree, or one sharding for every leaf)."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def batch_sharded(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=sh.batch_sharding(mesh(), x.ndim)
        ),
        tree,
    )


def gradient_bytes(params) -> int:
    """Bytes of one unsharded float32 gradient of `params`."""
    return 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def key_struct():
    return jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sh.replicated(mesh()))


def ppo_update():
    """`(update, args, trained params)`: `rj.update` (PPO) on the mesh and its abstract
    arguments."""
    s = rj.rl_shardings(PPO_CONFIG, PPO_MODELS, mesh())
    policy = jax.eval_shape(models.init_params, POLICY, jax.random.key(0))
    value = abstract_params(PPO_CONFIG, PPO_MODELS)[1]
    state = jax.eval_shape(lambda p, v: rj.init_state(p, PPO_CONFIG, value_params=v), policy, value)
    frozen = rj.FrozenParams(ref=policy, reward=value)
    prompts = jax.ShapeDtypeStruct((PPO_CONFIG.batch_size, PROMPT), jnp.int32)
    mask = jax.ShapeDtypeStruct((PPO_CONFIG.batch_size, PROMPT), jnp.bool_)
    exp, _ = jax.eval_shape(
        functools.partial(rj.make_experience, config=PPO_CONFIG, rl_models=PPO_MODELS),
        state,
        frozen,
        prompts,
        mask,
        jax.random.key(0),
    )
    exp = batch_sharded(exp)
    fn = sh.jit_with_rules(
        functools.partial(rj.update, config=PPO_CONFIG, rl_models=PPO_MODELS),
        mesh(),
        in_shardings=(s.state, jax.tree.map(lambda x: x.sharding, exp), s.replicated),
        out_shardings=(s.state, s.replicated),
        donate_argnums=(0,),
    )
    args = (abstract(state, s.state), exp, key_struct())
    return fn, args, (state.policy_params, state.value_params)


def grpo_update():
    """`(update, args, trained params)`: the critic-free update (GRPO) on the mesh."""
    s = rj.rl_shardings(GRPO_CONFIG, CF_MODELS, mesh())
    policy = jax.eval_shape(models.init_params, POLICY, jax.random.key(0))
    state = jax.eval_shape(lambda p: rj.init_state(p, GRPO_CONFIG), policy)
    frozen = rj.FrozenParams(ref=policy)
    prompts = jax.ShapeDtypeStruct((GRPO_CONFIG.num_prompts, PROMPT), jnp.int32)
    mask = jax.ShapeDtypeStruct((GRPO_CONFIG.num_prompts, PROMPT), jnp.bool_)
    kwargs = dict(config=GRPO_CONFIG, rl_models=CF_MODELS)

    def experience(state, frozen, prompts, mask, key):
        roll = rj.rollout(state, frozen, prompts, mask, key, **kwargs)
        scores = jnp.zeros((GRPO_CONFIG.batch_size,), jnp.float32)
        return rj.build_experience(roll, scores, state.kl.kl_coef, config=GRPO_CONFIG)[0]

    exp = batch_sharded(jax.eval_shape(experience, state, frozen, prompts, mask, jax.random.key(0)))
    fn = sh.jit_with_rules(
        functools.partial(rj.update, **kwargs),
        mesh(),
        in_shardings=(s.state, jax.tree.map(lambda x: x.sharding, exp), s.replicated),
        out_shardings=(s.state, s.replicated),
        donate_argnums=(0,),
    )
    return fn, (abstract(state, s.state), exp, key_struct()), state.policy_params


def sft_update():
    """`(update, args, trained params)`: the SFT trainer's step on the mesh."""
    s = sft.train_state_shardings(POLICY, SFT_CONFIG, mesh())
    params = jax.eval_shape(models.init_params, POLICY, jax.random.key(0))
    state = jax.eval_shape(lambda p: sft.init_train_state(p, SFT_CONFIG), params)
    fn = sft.jit_train_step(sft.make_sft_step(POLICY, SFT_CONFIG), POLICY, SFT_CONFIG, mesh())
    dtypes = (jnp.int32, jnp.bool_, jnp.bool_)
    batch = sft.SFTBatch(*(jax.ShapeDtypeStruct((SFT_BATCH, SFT_LENGTH), d) for d in dtypes))
    return fn, (abstract(state, s), batch_sharded(batch)), params


UPDATES = {"ppo": ppo_update, "grpo": grpo_update, "sft": sft_update}


def temp_bytes(fn, args) -> int:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", list(UPDATES))
def test_compiled_update_temporaries_stay_below_one_unsharded_gradient(name):
    fn, args, params = UPDATES[name]()
    bound = gradient_bytes(params)
    temp = temp_bytes(fn, args)
    assert temp < bound, (name, temp, bound)


def test_the_bound_catches_an_accumulator_holding_the_whole_gradient(monkeypatch):
    """The negative control: the PPO update with its accumulator constrained to be replicated
    (a full float32 gradient on every device) exceeds the bound."""
    original = core_update.param_logical_axes

    def replicated_axes(rl_models):
        return jax.tree.map(
            lambda _: P(), original(rl_models), is_leaf=lambda x: x is None or isinstance(x, P)
        )

    monkeypatch.setattr(core_update, "param_logical_axes", replicated_axes)
    fn, args, params = ppo_update()
    assert temp_bytes(fn, args) > gradient_bytes(params)


def sharding_constraints(jaxpr) -> set[tuple[tuple[int, ...], P]]:
    """`(shape, spec)` of every `sharding_constraint` in `jaxpr` and its sub-jaxprs."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            found.add((tuple(eqn.invars[0].aval.shape), eqn.params["sharding"].spec))
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found |= sharding_constraints(sub)
    return found


def param_constraints(model_config, params=None):
    shardings = models.param_shardings(model_config, mesh())
    shapes = jax.eval_shape(models.init_params, model_config, jax.random.key(0))
    if params is not None:
        shardings = {k: shardings[k] for k in params}
        shapes = {k: shapes[k] for k in params}
    return {
        (tuple(x.shape), s.spec)
        for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True)
    }


@pytest.mark.parametrize("name", list(UPDATES))
def test_updates_constrain_accumulators_like_params_and_micro_batches_like_the_batch(name):
    fn, args, _ = UPDATES[name]()
    with sh.with_rules(mesh()):
        found = sharding_constraints(fn.trace(*args).jaxpr.jaxpr)
    wanted = param_constraints(POLICY)
    if name == "ppo":
        wanted |= param_constraints(VALUE)
    assert wanted <= found, sorted(wanted - found, key=str)
    if name == "sft":  # [micro-batches, rows, length], 16 rows in 2 micro-batches: the rows axis
        assert ((2, SFT_BATCH // 2, SFT_LENGTH), P(None, ("data", "fsdp"))) in found
    else:  # rows gathered through the epoch's permutation: 16 rows / (2 minibatches x 2)
        assert ((4, RESPONSE), P(("data", "fsdp"))) in found


def test_constraints_are_a_no_op_without_a_mesh():
    """Outside a mesh context `constrain`, `constrain_batch` and `accumulate_grads` with specs
    return what they would without them (a single-device run is unchanged)."""
    params = {"w": jnp.arange(16.0).reshape(4, 4)}
    specs = {"w": P("embed", "mlp")}
    assert sh.constrain(params, specs) is params
    assert sh.constrain_batch(params) is params

    def grad_fn(x):
        return jax.grad(lambda p: jnp.sum(jnp.tanh(x @ p["w"])))(params), {"x": jnp.sum(x)}

    micro = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(3, 2, 4) / 10
    with_specs = jax.jit(lambda m: optim.accumulate_grads(grad_fn, params, m, 3, param_specs=specs))
    plain = jax.jit(lambda m: optim.accumulate_grads(grad_fn, params, m, 3))
    jax.tree.map(np.testing.assert_array_equal, with_specs(micro), plain(micro))


def test_constrained_accumulation_matches_and_is_sharded_on_a_mesh():
    """On the mesh the accumulated gradients equal the single-device ones and come out with the
    params' shardings."""
    m = mesh()
    specs = {"w": P("embed", "mlp")}
    shapes = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32)}
    shardings = sh.logical_to_sharding(specs, shapes, m)
    params = {"w": jnp.linspace(-1.0, 1.0, 128, dtype=jnp.float32).reshape(16, 8)}
    micro = jnp.linspace(-2.0, 2.0, 4 * 8 * 16, dtype=jnp.float32).reshape(4, 8, 16)

    def run(p, xs):
        def grad_fn(x):
            x = sh.constrain_batch(x)
            return jax.grad(lambda q: jnp.mean(jnp.tanh(x @ q["w"])))(p), {}

        return optim.accumulate_grads(grad_fn, p, xs, 4, param_specs=specs)[0]

    want = jax.jit(run)(params, micro)
    on_mesh = sh.jit_with_rules(run, m, in_shardings=(shardings, sh.replicated(m)))
    got = on_mesh(jax.device_put(params, shardings), micro)
    assert got["w"].sharding.is_equivalent_to(shardings["w"], 2)
    assert_f32_close(got, want, ulps=GRADIENT)
