"""Tests for rlhf_jax.sharding on 8 virtual CPU devices (set in conftest.py)."""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import GRADIENT, MODEL, REORDERED, assert_f32_close

from rlhf_jax import sharding as sh

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))

import multihost_worker  # noqa: E402

MESHES = {
    "8x1x1": sh.MeshConfig(data=8, fsdp=1, tensor=1),
    "1x8x1": sh.MeshConfig(data=1, fsdp=8, tensor=1),
    "2x2x2": sh.MeshConfig(data=2, fsdp=2, tensor=2),
    "1x2x4": sh.MeshConfig(data=1, fsdp=2, tensor=4),
}


def test_eight_devices():
    assert jax.device_count() == 8


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_shapes(name):
    mesh = sh.make_mesh(MESHES[name])
    expected = tuple(int(s) for s in name.split("x"))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == expected
    assert mesh.devices.size == 8


@pytest.mark.parametrize(
    "config, expected",
    [
        (sh.MeshConfig(), (8, 1, 1)),
        (sh.MeshConfig(data=-1, fsdp=2), (4, 2, 1)),
        (sh.MeshConfig(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
        (sh.MeshConfig(data=1, fsdp=2, tensor=-1), (1, 2, 4)),
    ],
)
def test_mesh_minus_one_resolution(config, expected):
    assert tuple(sh.make_mesh(config).shape.values()) == expected


def test_mesh_on_device_subset():
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2), devices=jax.devices()[:4])
    assert tuple(mesh.shape.values()) == (2, 2, 1)


def test_mesh_bad_sizes():
    with pytest.raises(ValueError, match=r"needs 12 devices but 8 are available.*-1"):
        sh.make_mesh(sh.MeshConfig(data=3, fsdp=2, tensor=2))
    with pytest.raises(ValueError, match=r"cannot use 8 devices.*multiple of 3"):
        sh.make_mesh(sh.MeshConfig(data=-1, fsdp=3))
    with pytest.raises(ValueError, match="At most one"):
        sh.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=">= 1 or -1"):
        sh.MeshConfig(data=0)
    with pytest.raises(TypeError):
        sh.MeshConfig(data=2.0)
    with pytest.raises(TypeError):
        sh.MeshConfig(2, 2, 2)  # keyword-only


def test_mesh_config_hashable():
    assert hash(sh.MeshConfig(data=2)) == hash(sh.MeshConfig(data=2))


# --------------------------------------------------------------------------------------------
# Rules and spec translation
# --------------------------------------------------------------------------------------------


def test_default_rules_cover_model_names():
    names = dict(sh.DEFAULT_RULES)
    assert names["batch"] == ("data", "fsdp")
    assert names["embed"] == "fsdp"
    for n in ("heads", "kv_heads", "mlp", "vocab", "act_heads", "act_kv_heads", "act_mlp"):
        assert names[n] == "tensor"
    assert names["act_vocab"] == "tensor"
    for n in ("layers", "head_dim", "norm", "length", "act_embed", "cache_length"):
        assert names[n] is None


def test_make_rules_overrides():
    rules = sh.make_rules({"embed": None, "act_embed": "tensor", "experts": "data"})
    d = dict(rules)
    assert d["embed"] is None and d["act_embed"] == "tensor" and d["experts"] == "data"
    assert [n for n, _ in rules][: len(sh.DEFAULT_RULES)] == [n for n, _ in sh.DEFAULT_RULES]
    assert dict(sh.DEFAULT_RULES)["embed"] == "fsdp"  # base untouched
    with pytest.raises(TypeError):
        sh.make_rules({"embed": ["fsdp"]})


def test_logical_to_mesh_spec_fallbacks():
    mesh = sh.make_mesh(MESHES["1x2x4"])
    spec = lambda logical, shape, rules=None: sh.logical_to_mesh_spec(logical, shape, mesh, rules)
    assert spec(P("embed", "mlp"), (16, 32)) == P("fsdp", "tensor")
    # kv_heads=2 is not divisible by tensor=4: that dim alone is replicated.
    assert spec(P("embed", "kv_heads", "head_dim"), (16, 2, 4)) == P("fsdp")
    # tiny vocab
    assert spec(P("vocab", "embed"), (6, 16)) == P(None, "fsdp")
    # odd embed dim
    assert spec(P("embed", "mlp"), (15, 32)) == P(None, "tensor")
    # scalars and None
    assert spec(None, (3, 4)) == P()
    assert spec(P(), ()) == P()
    # batch over (data, fsdp); unknown names and unsharded names replicate
    assert spec(P("batch", "length", "act_embed"), (4, 8, 16)) == P(("data", "fsdp"))
    assert spec(P("whatever", "layers"), (4, 8)) == P()
    # mesh axis names can be used directly
    assert spec(P("tensor"), (8,)) == P("tensor")
    # a mesh axis is never used twice: the second dim falls back to replicated
    rules = sh.make_rules({"act_embed": "fsdp"})
    assert spec(P("batch", "act_embed"), (4, 16), rules) == P(("data", "fsdp"))
    assert spec(P("heads", "mlp"), (4, 32)) == P("tensor")
    # partial fallback: longest prefix of the mesh axes that divides the dimension
    mesh2 = sh.make_mesh(MESHES["2x2x2"])
    assert sh.logical_to_mesh_spec(P("batch"), (2,), mesh2) == P("data")
    assert sh.logical_to_mesh_spec(P("batch"), (3,), mesh2) == P()
    # tuple entries combine the axes of several logical names
    assert sh.logical_to_mesh_spec(P(("embed", "mlp")), (8,), mesh2) == P(("fsdp", "tensor"))
    with pytest.raises(ValueError, match="entries"):
        spec(P("embed", "mlp"), (16,))


def test_rules_with_axes_missing_from_mesh():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert sh.logical_to_mesh_spec(P("batch", "embed"), (8, 16), mesh) == P("data")


# --------------------------------------------------------------------------------------------
# A toy transformer block annotated with the logical names
# --------------------------------------------------------------------------------------------


def wave_init(key, shape, dtype=jnp.float32):
    """Deterministic, cheap-to-compile initializer (random inits dominate CPU compile time)."""
    del key
    n = int(np.prod(shape))
    return (0.3 * jnp.sin(jnp.arange(n, dtype=dtype) * 0.37 + n)).reshape(shape)


class ToyBlock(nn.Module):
    """Embedding, GQA attention, MLP and a tied unembedding, with logical annotations."""

    vocab: int = 24
    embed: int = 16
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 4
    mlp: int = 32

    def param_(self, name, names, shape, initializer=wave_init):
        return self.param(name, nn.with_logical_partitioning(initializer, names), shape)

    @nn.compact
    def __call__(self, tokens_BT):
        c = nn.with_logical_constraint
        # One random init: sharded init must reproduce it (partitionable threefry).
        normal = nn.initializers.normal(0.2)
        emb_VD = self.param_("embedding", ("vocab", "embed"), (self.vocab, self.embed), normal)
        x_BTD = c(emb_VD[tokens_BT], ("batch", "length", "act_embed"))
        scale_D = self.param_("norm", ("norm",), (self.embed,), nn.initializers.ones)
        h_BTD = x_BTD * jax.lax.rsqrt(jnp.mean(x_BTD**2, -1, keepdims=True) + 1e-6) * scale_D
        wq = self.param_(
            "wq", ("embed", "heads", "head_dim"), (self.embed, self.heads, self.head_dim)
        )
        kv_shape = (self.embed, self.kv_heads, self.head_dim)
        wk = self.param_("wk", ("embed", "kv_heads", "head_dim"), kv_shape)
        wv = self.param_("wv", ("embed", "kv_heads", "head_dim"), kv_shape)
        wo = self.param_(
            "wo", ("heads", "head_dim", "embed"), (self.heads, self.head_dim, self.embed)
        )
        q_BTNH = c(jnp.einsum("btd,dnh->btnh", h_BTD, wq), ("batch", "length", "act_heads", None))
        k_BTKH = c(
            jnp.einsum("btd,dkh->btkh", h_BTD, wk), ("batch", "length", "act_kv_heads", None)
        )
        v_BTKH = c(
            jnp.einsum("btd,dkh->btkh", h_BTD, wv), ("batch", "length", "act_kv_heads", None)
        )
        rep = self.heads // self.kv_heads
        k_BTNH, v_BTNH = jnp.repeat(k_BTKH, rep, axis=2), jnp.repeat(v_BTKH, rep, axis=2)
        T = tokens_BT.shape[1]
        s_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH) / np.sqrt(self.head_dim)
        s_BNTS = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s_BNTS, -1e9)
        a_BTNH = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s_BNTS, -1), v_BTNH)
        x_BTD = x_BTD + jnp.einsum("btnh,nhd->btd", a_BTNH, wo)
        wi = self.param_("wi", ("embed", "mlp"), (self.embed, self.mlp))
        wo2 = self.param_("wo_mlp", ("mlp", "embed"), (self.mlp, self.embed))
        m_BTF = c(jax.nn.gelu(x_BTD @ wi), ("batch", "length", "act_mlp"))
        x_BTD = c(x_BTD + m_BTF @ wo2, ("batch", "length", "act_embed"))
        return c(x_BTD @ emb_VD.T, ("batch", "length", "act_vocab"))


TOKENS_BT = np.random.default_rng(1).integers(0, 6, size=(8, 5)).astype(np.int32)


def expected_param_specs(mesh_name):
    """Exact mesh specs of ToyBlock(vocab=24, kv_heads=2) params on each test mesh."""
    kv = P("fsdp") if mesh_name == "1x2x4" else P("fsdp", "tensor")  # kv_heads=2 vs tensor=4
    return {
        "embedding": P("tensor", "fsdp"),
        "norm": P(),
        "wq": P("fsdp", "tensor"),
        "wk": kv,
        "wv": kv,
        "wo": P("tensor", None, "fsdp"),
        "wi": P("fsdp", "tensor"),
        "wo_mlp": P("tensor", "fsdp"),
    }


@pytest.fixture(scope="module")
def reference():
    model = ToyBlock()
    key = jax.random.key(0)
    params = nn.unbox(jax.jit(model.init)(key, TOKENS_BT))
    logits = jax.jit(model.apply)(params, TOKENS_BT)
    return model, key, params, np.asarray(logits)


@pytest.fixture(scope="module")
def sharded_params(reference):
    """``mesh_name -> (mesh, params)`` from ``sharded_init``, compiled once per mesh."""
    model, key, _, _ = reference
    cache = {}

    def get(mesh_name):
        if mesh_name not in cache:
            mesh = sh.make_mesh(MESHES[mesh_name])
            params = sh.sharded_init(model.init, None, mesh, sh.DEFAULT_RULES, key, TOKENS_BT)
            cache[mesh_name] = (mesh, params)
        return cache[mesh_name]

    return get


def specs_of(tree):
    return jax.tree.map(lambda x: x.sharding.spec, tree)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_init_and_forward(reference, sharded_params, mesh_name):
    model, _, ref_params, ref_logits = reference
    mesh, params = sharded_params(mesh_name)
    assert specs_of(params) == {"params": expected_param_specs(mesh_name)}
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(params))
    # Same values as the unsharded init (partitionable threefry).
    assert_f32_close(params, ref_params, ulps=REORDERED)

    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    tokens = sh.place_batch(TOKENS_BT, mesh)
    assert tokens.sharding.spec == P(("data", "fsdp"), None)
    logits_sharding = sh.logical_to_sharding(
        P("batch", "length", "act_vocab"), ref_logits, mesh, sh.DEFAULT_RULES
    )
    with sh.with_rules(mesh, sh.DEFAULT_RULES):
        fwd = jax.jit(
            model.apply,
            in_shardings=(param_shardings, sh.batch_sharding(mesh, 2)),
            out_shardings=logits_sharding,
        )
        logits = fwd(params, tokens)
    assert logits.sharding.spec == logits_sharding.spec
    assert_f32_close(np.asarray(logits), ref_logits, ulps=MODEL)


def test_with_rules_makes_constraints_effective(reference):
    model, _, params, _ = reference
    mesh = sh.make_mesh(MESHES["2x2x2"])
    count = lambda text: text.count("sdy.sharding_constraint") + text.count("@Sharding")
    plain = jax.jit(model.apply).lower(params, TOKENS_BT).as_text()
    with sh.with_rules(mesh, sh.DEFAULT_RULES):
        constrained = jax.jit(model.apply).lower(params, TOKENS_BT).as_text()
    assert count(plain) == 0
    assert count(constrained) == 7  # every nn.with_logical_constraint in ToyBlock
    assert "tensor" in constrained and "fsdp" in constrained


def test_jit_with_rules_binds_arguments_like_the_function():
    """Positional defaults are passed (so per-parameter in_shardings cover them); keyword-only
    parameters, like the keywords a `functools.partial` binds, stay with the function: a
    non-array config bound that way is not traced."""

    @dataclasses.dataclass(frozen=True)
    class Scale:
        factor: float

    def fn(x, y=1.0, *, config):
        return x * config.factor + y

    mesh = sh.make_mesh(MESHES["2x2x2"])
    x = jnp.arange(8.0)
    jitted = sh.jit_with_rules(functools.partial(fn, config=Scale(2.0)), mesh)
    np.testing.assert_allclose(jitted(x), 2 * np.arange(8.0) + 1)
    np.testing.assert_allclose(jitted(x, 3.0), 2 * np.arange(8.0) + 3)
    assert jitted.lower(x).compile() is not None
    replicated = NamedSharding(mesh, P())
    ones = jnp.ones(8)
    with_shardings = sh.jit_with_rules(
        lambda x, y=ones: x + y, mesh, in_shardings=(replicated, replicated)
    )
    np.testing.assert_allclose(with_shardings(x), np.arange(8.0) + 1)


def test_sharded_init_with_explicit_specs_and_fn():
    mesh = sh.make_mesh(MESHES["2x2x2"])
    init_fn = lambda scale: {"w": jnp.full((16, 32), scale), "b": jnp.zeros((32,)), "n": scale}
    logical = {"w": P("embed", "mlp"), "b": P("mlp"), "n": None}
    a = sh.sharded_init(init_fn, logical, mesh, None, 2.0)
    b = sh.sharded_init(init_fn, lambda abstract: logical, mesh, sh.DEFAULT_RULES, 2.0)
    expected = {"w": P("fsdp", "tensor"), "b": P("tensor"), "n": P()}
    assert specs_of(a) == specs_of(b) == expected
    np.testing.assert_array_equal(np.asarray(a["w"]), np.full((16, 32), 2.0))


def test_non_divisible_dims_fall_back_to_replication():
    # On 1x2x4: vocab=6 and kv_heads=2 do not divide tensor=4. On 1x4x2: embed=6 vs fsdp=4.
    model = ToyBlock(vocab=6, embed=6, heads=4, kv_heads=2, mlp=8)
    key = jax.random.key(3)
    abstract = jax.eval_shape(model.init, key, TOKENS_BT)
    mesh = sh.make_mesh(sh.MeshConfig(data=1, fsdp=2, tensor=4))
    shardings = sh.logical_to_sharding(nn.get_partition_spec(abstract), abstract, mesh, None)
    specs = jax.tree.map(lambda s: s.spec, shardings)["params"]
    assert specs["embedding"] == P(None, "fsdp")
    assert specs["wk"] == P("fsdp")
    assert specs["wq"] == P("fsdp", "tensor")

    mesh4 = sh.make_mesh(sh.MeshConfig(data=1, fsdp=4, tensor=2))
    params4 = sh.sharded_init(model.init, None, mesh4, None, key, TOKENS_BT)
    specs4 = specs_of(params4)["params"]
    assert specs4["embedding"] == P("tensor")  # embed=6 not divisible by fsdp=4
    assert specs4["wi"] == P(None, "tensor")
    assert specs4["wk"] == P(None, "tensor")
    ref = jax.jit(model.apply)(nn.unbox(jax.jit(model.init)(key, TOKENS_BT)), TOKENS_BT)
    with sh.with_rules(mesh4):
        out = jax.jit(model.apply)(params4, sh.place_batch(TOKENS_BT, mesh4))
    assert_f32_close(np.asarray(out), np.asarray(ref), ulps=MODEL)


# --------------------------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------------------------


def test_optimizer_state_shardings_mirror_params(reference, sharded_params):
    model, _, _, _ = reference
    mesh, params = sharded_params("2x2x2")
    params = jax.tree.map(lambda x: x.copy(), params)  # the step below donates them
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    tx = optax.adamw(1e-2)
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_shardings = sh.optimizer_state_shardings(opt_shapes, param_shardings, mesh)
    adam_state = opt_shardings[0]
    expected = {"params": expected_param_specs("2x2x2")}
    assert jax.tree.map(lambda s: s.spec, adam_state.mu) == expected
    assert jax.tree.map(lambda s: s.spec, adam_state.nu) == expected
    assert adam_state.count.spec == P()

    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    assert jax.tree.map(lambda x: x.sharding.spec, opt_state[0].mu) == expected

    def step(params, opt_state, tokens):
        loss_fn = lambda p: jnp.mean(model.apply(p, tokens) ** 2)
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    with sh.with_rules(mesh):
        new_params, new_state = jax.jit(
            step,
            in_shardings=(param_shardings, opt_shardings, sh.batch_sharding(mesh, 2)),
            out_shardings=(param_shardings, opt_shardings),
            donate_argnums=(0, 1),
        )(params, opt_state, sh.place_batch(TOKENS_BT, mesh))
    assert specs_of(new_params) == expected and specs_of(new_state[0].nu) == expected
    assert int(new_state[0].count) == 1


def test_optimizer_state_shardings_masked_and_factored():
    mesh = sh.make_mesh(MESHES["1x2x4"])
    params = {"w": jnp.zeros((16, 32)), "b": jnp.zeros((32,))}
    param_shardings = {
        "w": NamedSharding(mesh, P("fsdp", "tensor")),
        "b": NamedSharding(mesh, P("tensor")),
    }
    tx = optax.chain(
        optax.masked(optax.adam(1e-3), {"w": True, "b": False}),
        optax.adafactor(1e-3, min_dim_size_to_factor=8),
    )
    shapes = jax.eval_shape(tx.init, params)
    shardings = sh.optimizer_state_shardings(shapes, param_shardings, mesh)
    masked_adam = shardings[0].inner_state[0]
    assert masked_adam.mu["w"].spec == P("fsdp", "tensor")
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    for path, s in flat:
        key = jax.tree_util.keystr(path)
        if "v_row" in key or "v_col" in key or "count" in key:
            assert s.spec == P(), key  # factored statistics do not mirror the param's shape
    jax.jit(tx.init, out_shardings=shardings)(params)  # the shardings are valid


# --------------------------------------------------------------------------------------------
# Placing existing arrays
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_name", ["2x2x2", "1x2x4"])
def test_shard_params_from_numpy(reference, mesh_name):
    model, key, ref_params, _ = reference
    mesh = sh.make_mesh(MESHES[mesh_name])
    host = jax.tree.map(np.asarray, ref_params)
    logical = nn.get_partition_spec(jax.eval_shape(model.init, key, TOKENS_BT))
    placed = sh.shard_params(host, logical, mesh, sh.DEFAULT_RULES)
    assert specs_of(placed) == {"params": expected_param_specs(mesh_name)}
    for x, h in zip(jax.tree.leaves(placed), jax.tree.leaves(host), strict=True):
        assert isinstance(x, jax.Array) and x.dtype == h.dtype
        np.testing.assert_array_equal(np.asarray(x), h)
        for shard in x.addressable_shards:  # every device holds only its slice
            assert shard.data.shape == x.sharding.shard_shape(x.shape)
            np.testing.assert_array_equal(np.asarray(shard.data), h[shard.index])


def test_shard_params_reads_only_slices_and_casts():
    mesh = sh.make_mesh(MESHES["1x2x4"])
    seen = []

    class Recorder(np.ndarray):
        def __getitem__(self, index):
            seen.append(index)
            return np.asarray(super().__getitem__(index))

    w = (np.arange(16 * 32, dtype=np.float32).reshape(16, 32) % 97).view(Recorder)
    out = sh.shard_params({"w": w}, {"w": P("embed", "mlp")}, mesh, dtype=jnp.bfloat16)["w"]
    assert out.dtype == jnp.bfloat16 and out.sharding.spec == P("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(w))
    assert seen and all(np.asarray(w)[i].shape == (8, 8) for i in seen)


def test_batch_helpers():
    mesh = sh.make_mesh(MESHES["2x2x2"])
    assert sh.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    assert sh.batch_sharding(mesh, 0).spec == P()
    assert sh.replicated(mesh).spec == P()
    batch = {"tokens": np.zeros((8, 5), np.int32), "step": np.int32(3)}
    placed = sh.place_batch(batch, mesh)
    assert placed["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert placed["step"].sharding.spec == P()
    with pytest.raises(ValueError, match="divisible by data\\*fsdp=4"):
        sh.place_batch(np.zeros((6, 2)), mesh)


def test_initialize_distributed_single_process_is_noop(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    for var in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    monkeypatch.delenv("MEGASCALE_NUM_SLICES", raising=False)
    assert sh.initialize_distributed() is False
    assert sh.initialize_distributed(num_processes=1) is False
    assert not jax.distributed.is_initialized()
    assert sh.is_main_process()


# --------------------------------------------------------------------------------------------
# Multi-process: 2 processes x 2 CPU devices on localhost, gloo collectives
# --------------------------------------------------------------------------------------------


def run_workers(task: str, tmp_path: Path, num_processes: int = 2, timeout: float = 120.0):
    """Run ``num_processes`` copies of tests/multihost_worker.py; return their results."""
    workers = multihost_worker.launch(task, tmp_path, num_processes)
    return multihost_worker.wait_or_fail(workers, timeout)


def test_multiprocess_place_batch_and_reduce(tmp_path):
    results = run_workers("reduce", tmp_path)
    # Single-process reference on 4 of this process's 8 devices, same mesh shape.
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=-1), devices=jax.devices()[:4])
    batch, w_DO = multihost_worker.reduce_shard_inputs(mesh)
    expected = multihost_worker.reduce_compute(mesh, batch, w_DO)
    inputs = multihost_worker.reduce_inputs()
    assert_f32_close(expected["y_BO"], inputs["x_BD"] @ inputs["w_DO"], ulps=REORDERED)
    for pid, res in enumerate(results):
        assert int(res["process_count"]) == 2 and int(res["global_devices"]) == 4
        assert str(res["batch_spec"]) == str(P(("data", "fsdp"), None))
        assert str(res["w_spec"]) == str(P("fsdp", "tensor"))
        assert list(res["local_rows"]) == [4 * pid, 4 * pid + 4]
        for k in ("y_BO", "masked_mean", "col_mean_O"):
            assert_f32_close(res[k], expected[k], ulps=REORDERED, err_msg=k)


# --------------------------------------------------------------------------------------------
# Real models: HF checkpoints loaded shard by shard
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_load_on_mesh_matches_load(tmp_path, dtype):
    from hf_utils import tiny_hf_model

    from rlhf_jax import models

    tiny_hf_model("llama", seed=3).save_pretrained(tmp_path)  # kv_heads=2, vocab 128
    mesh = sh.make_mesh(MESHES["1x2x4"])
    params, config = models.load(tmp_path, dtype=dtype, mesh=mesh)
    want, want_config = models.load(tmp_path, dtype=dtype)
    assert config == want_config
    shardings = models.param_shardings(config, mesh)
    for x, w, s in zip(
        jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(shardings), strict=True
    ):
        assert x.dtype == w.dtype and x.sharding == s
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(w, np.float32))
        assert {sh_.data.shape for sh_ in x.addressable_shards} == {s.shard_shape(x.shape)}
    attn = params["layers"]["attn"]
    assert attn["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert attn["k"]["kernel"].sharding.spec == P(None, "fsdp")  # kv_heads=2 vs tensor=4
    with pytest.raises(ValueError, match="no config.json"):
        models.load(tmp_path / "missing", mesh=mesh)


def test_multiprocess_load_reads_only_own_layers(tmp_path):
    """2 processes x 2 devices, the layer axis sharded over fsdp=4: each process reads only the
    layers its devices hold (and the non-layer tensors), and places exactly the eager values."""
    from hf_utils import tiny_hf_model

    tiny_hf_model("llama", seed=4, num_hidden_layers=4).save_pretrained(
        tmp_path / multihost_worker.LOAD_CHECKPOINT, max_shard_size="100KB"
    )
    results = run_workers("load", tmp_path)
    held = [set(res["held_layers"].tolist()) for res in results]
    assert held[0] | held[1] == {0, 1, 2, 3} and not held[0] & held[1]
    for res, layers in zip(results, held, strict=True):
        assert bool(res["equal"])
        read = {str(name) for name in res["read"]}
        per_layer = {n for n in read if ".layers." in n}
        assert {int(n.split(".layers.")[1].split(".")[0]) for n in per_layer} == layers
        assert read - per_layer == {
            "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
        }  # fmt: skip
        assert len(res["read"]) == len(read)  # each tensor read once


def test_embedding_lookup_without_full_rematerialization(capfd):
    """The token-embedding gather on a mesh with all three axes > 1: same logits and gradients
    as one device, and XLA's SPMD partitioner finds an efficient plan (it logs "Involuntary full
    rematerialization" when the table split along `embed` over `fsdp` meets rows split over the
    batch axes)."""
    from rlhf_jax import models

    # A shape no other test compiles, so the partitioner runs (and logs) in this test.
    config = models.ModelConfig(
        family="llama", vocab_size=40, hidden_size=24, num_layers=2, num_heads=2,
        num_kv_heads=2, head_dim=12, intermediate_size=48, max_position_embeddings=32,
    )  # fmt: skip
    mesh = sh.make_mesh(MESHES["2x2x2"])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (8, 6)), jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    positions = jnp.cumsum(mask, -1) - 1

    def loss(params, tokens):
        hidden, _ = models.forward(params, config, tokens, positions, mask)
        return jnp.sum(models.lm_logits(params, config, hidden) ** 2)

    params = models.init_params(config, jax.random.key(0))
    want_loss, want_grads = jax.jit(jax.value_and_grad(loss))(params, tokens)
    capfd.readouterr()
    sharded = models.sharded_init_params(config, jax.random.key(0), mesh)
    with sh.with_rules(mesh):
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(
            sharded, sh.place_batch(tokens, mesh)
        )
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    assert_f32_close(got_loss, want_loss, ulps=MODEL)
    assert_f32_close(got_grads, want_grads, ulps=GRADIENT)
