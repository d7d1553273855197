"""Sharded models, sampler and PPO on 8 virtual CPU devices: every mesh gives the single-device
result (forward logits, greedy tokens, one whole PPO iteration), parameters and optimiser states
are sharded as the logical-axis rules say, and a 2-process run equals the 1-process run.

Each mesh compiles each function once (module-level caches shared by the tests)."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import rlhf_jax as rj
from rlhf_jax import models, sampling
from rlhf_jax import sharding as sh
from rlhf_jax.sampling import SamplingConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

import multihost_worker  # noqa: E402
from tolerances import GRADIENT, MODEL, REORDERED, assert_f32_close  # noqa: E402

MESHES = {
    "8x1x1": sh.MeshConfig(data=8, fsdp=1, tensor=1),
    "1x8x1": sh.MeshConfig(data=1, fsdp=8, tensor=1),
    "2x2x2": sh.MeshConfig(data=2, fsdp=2, tensor=2),
    "1x2x4": sh.MeshConfig(data=1, fsdp=2, tensor=4),
}
PROBLEM = multihost_worker.ppo_problem()
CONFIG, PPO_MODELS = PROBLEM["config"], PROBLEM["ppo_models"]
POLICY, REWARD = PPO_MODELS.policy, PPO_MODELS.reward
PROMPTS, PROMPT_MASK = PROBLEM["prompts"], PROBLEM["prompt_mask"]
# Three decode chunks: the growing cache is sharded like the fixed one (chunked == one scan on a
# single device is tests/test_sampling.py's).
GREEDY = SamplingConfig(max_new_tokens=6, greedy=True, stop_token_ids=(2,), decode_chunks=3)
# The default run keeps all three axes together; pure data parallelism (also the trainer tests'
# default mesh), fsdp=8 and fsdp x tensor=4 run with `-m slow` (CI runs both).
MESH_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n != "2x2x2" else n for n in MESHES]


def host(tree):
    return jax.tree.map(np.asarray, tree)


def padded(spec, ndim):
    """A spec as a tuple of one entry per dimension (trailing None made explicit)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


@functools.cache
def reference():
    """Single-device results (plain `jax.jit`, no mesh)."""
    policy = models.init_params(POLICY, jax.random.key(0))
    reward = multihost_worker.ppo_scale_reward(models.init_params(REWARD, jax.random.key(1)))
    logits = models.jit_forward(POLICY)(policy, PROMPTS, PROMPT_MASK)
    gen = sampling.jit_generate(POLICY, GREEDY)(policy, PROMPTS, PROMPT_MASK, jax.random.key(3))
    state0 = rj.jit_init_state(CONFIG, PPO_MODELS)(policy, reward)
    state0_host = host(state0)
    iteration = rj.jit_iteration(CONFIG, PPO_MODELS)
    frozen = rj.FrozenParams(ref=policy, reward=reward)
    key = multihost_worker.ppo_iteration_key(0)
    state, metrics = iteration(state0, frozen, PROMPTS, PROMPT_MASK, key)
    return {
        "policy": host(policy),
        "reward": host(reward),
        "logits": np.asarray(logits),
        "gen": host(gen),
        "state0": state0_host,
        "state": host(state),
        "metrics": host(metrics),
    }


@functools.cache
def mesh_run(name):
    """Forward, greedy generate and one PPO iteration on mesh `name`, each compiled once.

    On 2x2x2 the params are born sharded and the state comes from `jit_init_state`
    (`multihost_worker.ppo_setup`, as in the 2-process run); elsewhere the reference's host
    values are placed with `device_put`. The forward and the sampler take batch-sharded prompts;
    the iteration takes them replicated (`rl_shardings`: the rows are split after the rollout).
    """
    ref = reference()
    mesh = sh.make_mesh(MESHES[name])
    shardings = rj.rl_shardings(CONFIG, PPO_MODELS, mesh)
    if name == "2x2x2":
        setup = multihost_worker.ppo_setup(mesh)
        state0, frozen = setup["state"], setup["frozen"]
    else:
        frozen = jax.device_put(rj.FrozenParams(ref["policy"], ref["reward"]), shardings.frozen)
        state0 = jax.device_put(ref["state0"], shardings.state)
    born = {"policy": host(frozen.ref), "reward": host(frozen.reward), "state0": host(state0)}
    prompts, mask = sh.place_batch((PROMPTS, PROMPT_MASK), mesh)
    logits = models.jit_forward(POLICY, mesh)(frozen.ref, prompts, mask)
    gen = sampling.jit_generate(POLICY, GREEDY, mesh)(frozen.ref, prompts, mask, jax.random.key(3))
    iteration = rj.jit_iteration(CONFIG, PPO_MODELS, mesh)
    replicated = sh.place_replicated((PROMPTS, PROMPT_MASK), mesh)
    state, metrics = iteration(state0, frozen, *replicated, multihost_worker.ppo_iteration_key(0))
    return {
        "mesh": mesh,
        "shardings": shardings,
        "born": born,
        "logits": logits,
        "gen": gen,
        "state": state,
        "metrics": metrics,
        "iteration": iteration,
        "frozen": frozen,
        "batch": (prompts, mask),
        "replicated": replicated,
    }


@functools.cache
def two_iterations_on_2x2x2():
    """`multihost_worker.ppo_run`'s output computed in this process: the cached first iteration
    on 2x2x2 and a second one through the same compiled step."""
    run = mesh_run("2x2x2")
    iteration = run["iteration"]
    state = jax.tree.map(lambda x: x.copy(), run["state"])  # keep the cached result intact
    key = multihost_worker.ppo_iteration_key(1)
    state, metrics = iteration(state, run["frozen"], *run["replicated"], key)
    assert multihost_worker.PPO_ITERATIONS == 2
    out = {f"0/{k}": np.asarray(v) for k, v in run["metrics"].items()}
    out |= {f"1/{k}": np.asarray(v) for k, v in metrics.items()}
    out |= multihost_worker.ppo_summaries(state, run["mesh"])
    return out, iteration.jitted._cache_size(), state


# ------------------------------------------------------------------------------ expected specs

RULES = dict(sh.DEFAULT_RULES)


def spec_from_rules(logical, shape, mesh):
    """The mesh spec the default rules give a parameter, written out per dimension. The test
    models are chosen so that every sharded dimension divides (asserted), i.e. no fallback."""
    out = []
    for name, dim in zip(padded(logical, len(shape)), shape, strict=True):
        axes = RULES.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        assert dim % math.prod(mesh.shape[a] for a in axes) == 0, (logical, shape, dict(mesh.shape))
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return tuple(out)


def expected_param_specs(config, mesh):
    shapes = jax.eval_shape(lambda k: models.init_params(config, k), jax.random.key(0))
    return jax.tree.map(
        lambda logical, x: spec_from_rules(logical, x.shape, mesh),
        models.logical_axes(config),
        shapes,
        is_leaf=lambda x: isinstance(x, P),
    )


def actual_specs(tree):
    return jax.tree.map(lambda x: padded(x.sharding.spec, x.ndim), tree)


# ----------------------------------------------------------------------------------- the tests


def test_rules_give_the_documented_specs():
    """Anchor the derivation on a few specs written out by hand (layer axis first)."""
    mesh = sh.make_mesh(MESHES["2x2x2"])
    specs = expected_param_specs(POLICY, mesh)
    assert specs["layers"]["attn"]["q"]["kernel"] == (None, "fsdp", "tensor", None)
    assert specs["layers"]["attn"]["o"]["kernel"] == (None, "tensor", None, "fsdp")
    assert specs["layers"]["mlp"]["down"]["kernel"] == (None, "tensor", "fsdp")
    assert specs["embed"]["embedding"] == ("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == ("fsdp", "tensor")
    assert specs["layers"]["attn_norm"]["scale"] == (None, "fsdp")
    assert expected_param_specs(REWARD, mesh)["score"]["kernel"] == ("fsdp", None)


@pytest.mark.parametrize("name", MESH_PARAMS)
def test_params_and_optimizer_states_are_sharded_by_the_rules(name):
    run = mesh_run(name)
    mesh, state = run["mesh"], run["state"]
    policy_specs = expected_param_specs(POLICY, mesh)
    value_specs = expected_param_specs(REWARD, mesh)
    assert actual_specs(run["frozen"].ref) == policy_specs
    assert actual_specs(run["frozen"].reward) == value_specs
    # The state coming out of the iteration keeps the shardings (donation reuses the buffers).
    assert actual_specs(state.policy_params) == policy_specs
    assert actual_specs(state.value_params) == value_specs
    for opt_state, specs in (
        (state.opt_state, policy_specs),
        (state.value_opt_state, value_specs),
    ):
        _clip, (adam, *_) = opt_state  # chain(clip_by_global_norm, adamw)
        assert actual_specs(adam.mu) == specs and actual_specs(adam.nu) == specs
        assert adam.count.sharding.spec == P()
    for leaf in (state.iteration, state.episode, *jax.tree.leaves(state.kl)):
        assert leaf.sharding.spec == P() and leaf.sharding.mesh == mesh
    # Each device really holds a 1/(fsdp*tensor) slice of the q kernel, not a copy.
    q = state.policy_params["layers"]["attn"]["q"]["kernel"]
    shard_elems = {s.data.size for s in q.addressable_shards}
    assert shard_elems == {q.size // (mesh.shape["fsdp"] * mesh.shape["tensor"])}
    assert all(s.sharding.spec == run["shardings"].batch.spec for s in run["batch"])


@pytest.mark.parametrize("name", MESH_PARAMS)
def test_forward_logits_match_single_device(name):
    run = mesh_run(name)
    logits = run["logits"]
    assert padded(logits.sharding.spec, 3) == (("data", "fsdp"), None, "tensor")
    assert_f32_close(np.asarray(logits), reference()["logits"], ulps=MODEL)


@pytest.mark.parametrize("name", MESH_PARAMS)
def test_greedy_generate_matches_single_device(name):
    run, ref = mesh_run(name), reference()["gen"]
    gen = run["gen"]
    assert gen.tokens.sharding.spec == P(("data", "fsdp"), None)
    assert gen.sequence_lengths.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(gen.tokens), ref.tokens)
    np.testing.assert_array_equal(np.asarray(gen.mask), ref.mask)
    np.testing.assert_array_equal(np.asarray(gen.sequence_lengths), ref.sequence_lengths)
    assert_f32_close(np.asarray(gen.logprobs), ref.logprobs, ulps=MODEL)


def test_early_exit_decoding_on_a_mesh():
    """Decoding stops when every row of the global batch has stopped (the test is a reduction
    over all devices): the same tokens and step count as on one device."""
    ref, run = reference(), mesh_run("2x2x2")
    mesh = run["mesh"]
    stops = tuple(int(t) for t in ref["gen"].tokens[:, 1])  # every row stops by its 2nd token
    cfg = dataclasses.replace(GREEDY, stop_token_ids=stops)
    key = jax.random.key(3)
    want = sampling.jit_generate(POLICY, cfg)(ref["policy"], PROMPTS, PROMPT_MASK, key)
    policy = jax.device_put(ref["policy"], run["shardings"].frozen.ref)
    got = sampling.jit_generate(POLICY, cfg, mesh)(
        policy, *sh.place_batch((PROMPTS, PROMPT_MASK), mesh), key
    )
    assert int(want.decode_steps) == int(got.decode_steps) <= 2 < GREEDY.max_new_tokens
    np.testing.assert_array_equal(np.asarray(got.tokens), want.tokens)
    np.testing.assert_array_equal(np.asarray(got.mask), want.mask)


@pytest.mark.parametrize("name", MESH_PARAMS)
def test_ppo_iteration_matches_single_device(name):
    run, ref = mesh_run(name), reference()
    # The inputs are the reference's (born sharded on 2x2x2: same values, threefry).
    for name_ in ("policy", "reward", "state0"):
        assert_f32_close(run["born"][name_], ref[name_], ulps=REORDERED)
    state, metrics = host(run["state"]), host(run["metrics"])
    assert metrics.keys() == ref["metrics"].keys()
    assert_f32_close(metrics, ref["metrics"], ulps=GRADIENT, floor=1.0, per_leaf=True)
    assert_f32_close(jax.tree.leaves(state), jax.tree.leaves(ref["state"]), ulps=GRADIENT)
    # The update really moved the params (so the comparison above is not vacuous).
    moved = np.abs(state.policy_params["lm_head"]["kernel"] - ref["policy"]["lm_head"]["kernel"])
    assert moved.max() > 1e-3
    assert int(state.iteration) == 1 and int(state.episode) == CONFIG.batch_size


@pytest.mark.slow  # one more compiled PPO iteration per layout
def test_shared_value_head_iteration_matches_single_device():
    """PPO with the value head on the policy trunk (`RLModels(value=None)`) on 2x2x2 equals the
    single-device iteration; the head and its AdamW moments keep the documented shardings."""
    ref = reference()
    shared = rj.RLModels(policy=POLICY, value=None, reward=REWARD)
    head = {
        "score": {"kernel": 0.1 * jax.random.normal(jax.random.key(5), (POLICY.hidden_size, 1))}
    }
    frozen = rj.FrozenParams(ref=ref["policy"], reward=ref["reward"])
    key = multihost_worker.ppo_iteration_key(0)
    state0 = rj.jit_init_state(CONFIG, shared)(ref["policy"], head)
    want_state, want_metrics = rj.jit_iteration(CONFIG, shared)(
        state0, frozen, PROMPTS, PROMPT_MASK, key
    )
    mesh = sh.make_mesh(MESHES["2x2x2"])
    shardings = rj.rl_shardings(CONFIG, shared, mesh)
    state0 = rj.jit_init_state(CONFIG, shared, mesh)(
        jax.device_put(ref["policy"], shardings.state.policy_params),
        jax.device_put(head, shardings.state.value_params),
    )
    state, metrics = rj.jit_iteration(CONFIG, shared, mesh)(
        state0,
        jax.device_put(frozen, shardings.frozen),
        *sh.place_replicated((PROMPTS, PROMPT_MASK), mesh),
        key,
    )
    assert_f32_close(host(metrics), host(want_metrics), ulps=GRADIENT, floor=1.0, per_leaf=True)
    # AdamW's first step divides by |grad| + eps: a parameter whose gradient is near eps turns the
    # mesh's different summation order into a change of up to the learning rate.
    assert_f32_close(host(state), host(want_state), ulps=GRADIENT)
    assert float(want_metrics["val/values_mean"]) != 0.0
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings.state), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)


# Slow set: the critic-free trainer tests already run sharded (8x1x1) in the default set.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["8x1x1", "2x2x2"])
def test_grpo_iteration_matches_single_device(name):
    """A critic-free iteration (GRPO with a reward model and a KL term) on a mesh equals the
    single-device one. 4 prompts x 4 completions on 8 devices: the prompts are replicated and
    the 16 rows split after the group expansion, so num_prompts need not divide the mesh."""
    problem = multihost_worker.grpo_problem()
    config, cf_models = problem["config"], problem["cf_models"]
    ref = reference()
    prompts, mask = problem["prompts"], problem["prompt_mask"]
    key = jax.random.key(5)

    def run(mesh):
        frozen = rj.FrozenParams(ref=ref["policy"], reward=ref["reward"])
        state = rj.init_state(ref["policy"], config)
        if mesh is not None:
            s = rj.rl_shardings(config, cf_models, mesh)
            frozen, state = jax.device_put((frozen, state), (s.frozen, s.state))
        step = rj.jit_iteration(config, cf_models, mesh)
        return step(state, frozen, prompts, mask, key)

    want_state, want_metrics = run(None)
    mesh = sh.make_mesh(MESHES[name])
    got_state, got_metrics = run(mesh)
    # The state keeps the documented shardings (params and moments by the rules).
    want_sh = rj.rl_shardings(config, cf_models, mesh).state
    got_sh = jax.tree.map(lambda x: x.sharding, got_state)
    assert jax.tree.leaves(got_sh) == jax.tree.leaves(want_sh)
    if name == "2x2x2":
        kernel = got_state.policy_params["layers"]["mlp"]["up"]["kernel"]
        assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert_f32_close(host(got_state), host(want_state), ulps=GRADIENT)
    assert_f32_close(host(got_metrics), host(want_metrics), ulps=GRADIENT, floor=1.0, per_leaf=True)
    assert float(want_metrics["loss/policy_avg"]) != 0.0


def test_second_iteration_reuses_the_compiled_step():
    out, cache_size, state = two_iterations_on_2x2x2()
    assert cache_size == 1  # the returned state is a valid input: same shardings, no retrace
    assert int(state.iteration) == 2 and int(state.episode) == 2 * CONFIG.batch_size
    assert all(np.isfinite(v).all() for v in out.values())


def test_advantage_whitening_is_over_the_global_batch():
    """build_experience on a batch split over 8 devices whitens with global statistics."""
    rng = np.random.default_rng(0)
    b, t = 16, 6
    lengths = rng.integers(0, t, size=b).astype(np.int32)
    mask = np.arange(t)[None] <= lengths[:, None]
    gen = rj.Generation(
        tokens=rng.integers(3, 60, size=(b, t)).astype(np.int32),
        logprobs=np.where(mask, -rng.random((b, t)), 1.0).astype(np.float32),
        mask=mask,
        sequence_lengths=lengths,
        stopped=np.ones(b, bool),
    )
    # Rows differ in scale by shard, so per-shard whitening would give a different answer.
    row_scale = np.repeat(np.arange(1, 9, dtype=np.float32), 2)[:, None]
    roll = rj.Rollout(
        prompts=np.zeros((b, 3), np.int32),
        prompt_mask=np.ones((b, 3), bool),
        generation=gen,
        old_logprobs=gen.logprobs,
        ref_logprobs=np.where(mask, gen.logprobs - 0.1 * rng.random((b, t)), 1.0).astype(
            np.float32
        ),
        values=np.where(mask, row_scale * rng.standard_normal((b, t)), 0.0).astype(np.float32),
    )
    scores = (row_scale[:, 0] * rng.standard_normal(b)).astype(np.float32)
    build = functools.partial(rj.build_experience, config=CONFIG)
    want, _ = jax.jit(build)(roll, scores, jnp.float32(0.05))
    mesh = sh.make_mesh(MESHES["8x1x1"])
    placed = sh.place_batch((roll, scores), mesh)
    assert placed[0].values.sharding.spec == P(("data", "fsdp"), None)
    got, _ = jax.jit(build)(*placed, jnp.float32(0.05))
    assert_f32_close(np.asarray(got.advantages), np.asarray(want.advantages), ulps=REORDERED)
    adv = np.asarray(got.advantages)
    # Whitened over the whole batch: mean 0 and std 1 up to the rounding of unit-size terms.
    assert_f32_close(adv[mask].mean(), 0.0, ulps=REORDERED, scale=1.0)
    assert_f32_close(adv[mask].std(ddof=1), 1.0, ulps=REORDERED)
    shard_std = [adv[2 * i : 2 * i + 2][mask[2 * i : 2 * i + 2]].std() for i in range(8)]
    assert np.ptp(shard_std) > 0.5  # per-shard statistics differ: the whitening was global


def test_jit_ppo_iteration_rejects_rules_without_mesh():
    with pytest.raises(ValueError, match="without a mesh"):
        rj.jit_iteration(CONFIG, PPO_MODELS, rules=sh.DEFAULT_RULES)


def test_local_batch_slice():
    mesh = sh.make_mesh(MESHES["2x2x2"])
    assert sh.local_batch_slice(mesh, 16) == slice(0, 16)
    with pytest.raises(ValueError, match="data\\*fsdp=4"):
        sh.local_batch_slice(mesh, 6)


@pytest.mark.slow  # two fresh processes compile the critic-free iteration
def test_grpo_two_processes_match_one_process(tmp_path):
    """GRPO on a 2x2x2 mesh held by 2 processes x 4 devices (replicated prompts, rows split
    after the group expansion) gives the metrics and final policy of this process's 2x2x2 run."""
    workers = multihost_worker.launch(
        "grpo", tmp_path, num_processes=2, local_devices=multihost_worker.PPO_LOCAL_DEVICES
    )
    try:
        expected = multihost_worker.grpo_run(sh.make_mesh(MESHES["2x2x2"]))
    finally:
        results = multihost_worker.wait_or_fail(workers, timeout=600.0)
    got = results[0]
    assert results[1] is None and int(got["process_count"]) == 2
    assert float(expected["0/loss/policy_avg"]) != 0.0
    for key, want in expected.items():
        assert_f32_close(got[key], want, ulps=GRADIENT, floor=1.0, err_msg=key)


@pytest.mark.slow  # two fresh processes compile the PPO iteration
def test_shared_value_head_two_processes_match_one_process(tmp_path):
    """PPO with the value head on the policy trunk on a 2x2x2 mesh held by 2 processes x 4
    devices gives the metrics and final state of this process's 2x2x2 run (which equals one
    device: `test_shared_value_head_iteration_matches_single_device`)."""
    workers = multihost_worker.launch(
        "ppo_shared", tmp_path, num_processes=2, local_devices=multihost_worker.PPO_LOCAL_DEVICES
    )
    try:
        expected = multihost_worker.ppo_run(sh.make_mesh(MESHES["2x2x2"]), shared_value_head=True)
    finally:
        results = multihost_worker.wait_or_fail(workers, timeout=600.0)
    got = results[0]
    assert results[1] is None and int(got["process_count"]) == 2
    assert float(expected["0/val/values_mean"]) != 0.0 and float(expected["value_sq_sum"]) > 0
    assert list(got["local_rows"]) == [0, CONFIG.batch_size // 2]
    for key in ("prompts_spec", "q_spec"):
        assert str(got[key]) == str(expected[key])
    for key, want in expected.items():
        if key not in ("local_rows", "prompts_spec", "q_spec"):
            assert_f32_close(got[key], want, ulps=GRADIENT, floor=1.0, err_msg=key)


MULTIPROCESS_TEST = "test_two_processes_match_one_process"


@pytest.fixture(scope="module", autouse=True)
def ppo_workers(request, tmp_path_factory):
    """Start the 2-process PPO run when this module starts (if its test is selected): the
    workers compile on the second core while the single-process tests run."""
    selected = any(
        item.name == MULTIPROCESS_TEST and item.module.__name__ == __name__
        for item in request.session.items
    )
    if not selected:
        yield None
        return
    workers = multihost_worker.launch(
        "ppo",
        tmp_path_factory.mktemp("ppo_workers"),
        num_processes=2,
        local_devices=multihost_worker.PPO_LOCAL_DEVICES,
    )
    yield workers
    workers.kill()


def test_two_processes_match_one_process(ppo_workers):
    """2 processes x 4 CPU devices (gloo) on a 2x2x2 mesh, each feeding the whole (replicated)
    prompt batch (the rows are split over the mesh inside the iteration; `local_rows` are the
    rows this process's devices hold), run 2 PPO iterations; metrics and final state equal
    this process's 2x2x2 run (whose first iteration equals the single-device reference, tested
    above)."""
    try:
        expected, _, _ = two_iterations_on_2x2x2()
    finally:
        results = multihost_worker.wait_or_fail(ppo_workers, timeout=600.0)
    assert results[1] is None, "only process 0 writes its result"
    got = results[0]
    assert int(got["process_count"]) == 2 and int(got["global_devices"]) == 8
    assert list(got["local_rows"]) == [0, CONFIG.batch_size // 2]
    assert str(got["prompts_spec"]) == str(P())  # replicated: one convention for every algorithm
    assert str(got["q_spec"]) == str(P(None, "fsdp", "tensor"))
    assert len(expected) == multihost_worker.PPO_ITERATIONS * len(reference()["metrics"]) + 3
    for key, want in expected.items():
        assert_f32_close(got[key], want, ulps=GRADIENT, floor=1.0, err_msg=key)
