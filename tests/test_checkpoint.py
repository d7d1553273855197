"""Checkpoints: sharded async save/restore with keep-last-K, unfinished saves ignored, model
configs through JSON, and `rlhf-jax export` to HF checkpoints that transformers loads with the
same logits (and `rlhf-jax generate` reading a checkpoint directly)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tokenizer_utils import save_tiny_models, save_tiny_tokenizer
from tolerances import MODEL, assert_f32_close

from rlhf_jax import checkpoint, cli, models, sharding
from rlhf_jax.sampling import prompt_positions


def _tree(mesh):
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("fsdp", None)))
    params = {"w": w, "b": jax.device_put(jnp.ones(3, jnp.bfloat16), sharding.replicated(mesh))}
    return {
        "params": params,
        "opt": optax.adam(1e-3).init(params),
        "count": jnp.int32(7),
        "rng": jax.random.key_data(jax.random.key(3)),
    }


def test_sharded_async_save_restore_and_keep(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    tree = _tree(mesh)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, async_save=True)
    for step in range(1, 5):
        bumped = jax.tree.map(lambda x, s=step: x + s if x.dtype != jnp.uint32 else x, tree)
        ckpt.save(step, {"state": bumped}, {"data_position": [0, step], "note": "x"})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    abstract = checkpoint.abstract_like(tree)
    restored, meta = ckpt.restore(4, {"state": abstract})
    assert meta == {"data_position": [0, 4], "note": "x", "iteration": 4}
    want = jax.tree.map(lambda x: x + 4 if x.dtype != jnp.uint32 else x, tree)
    jax.tree.map(np.testing.assert_array_equal, restored["state"], want)
    assert restored["state"]["params"]["w"].sharding == tree["params"]["w"].sharding
    assert restored["state"]["params"]["b"].dtype == jnp.bfloat16
    # Restoring onto another layout (replicated) gives the same values.
    rep = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
        abstract,
    )
    other, _ = ckpt.restore(3, {"state": rep})
    np.testing.assert_array_equal(other["state"]["params"]["w"], np.arange(64.0).reshape(8, 8) + 3)
    assert other["state"]["params"]["w"].sharding.is_fully_replicated
    ckpt.close()


def test_unfinished_save_is_ignored_and_removed(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3, async_save=False)
    ckpt.save(1, {"state": _tree(mesh)}, {})
    ckpt.close()
    unfinished = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "junk").write_text("half written")
    reopened = checkpoint.Checkpointer(tmp_path)
    assert reopened.latest_step() == 1
    reopened.save(2, {"state": _tree(mesh)}, {})  # cleans up before saving
    reopened.wait()
    assert reopened.all_steps() == [1, 2] and not unfinished.exists()
    assert checkpoint.resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "2"
    reopened.close()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        checkpoint.resolve_checkpoint(tmp_path / "nothing")


def test_model_config_json_round_trip():
    config = models.ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        eos_token_id=(2, 5),
        dtype="bfloat16",
    )
    as_json = json.loads(json.dumps(checkpoint.model_config_to_dict(config)))
    assert checkpoint.model_config_from_dict(as_json) == config


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """A hand-made run: perturbed tiny policy and value params saved as iteration 7."""
    root = tmp_path_factory.mktemp("export")
    paths = save_tiny_models(root / "models")
    policy, policy_cfg = models.load(paths["policy"])
    value, value_cfg = models.load(paths["reward"])
    noise = lambda tree, seed: jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed), x.shape, x.dtype), tree
    )
    policy, value = noise(policy, 1), noise(value, 2)
    run = root / "run"
    ckpt = checkpoint.Checkpointer(run)
    meta = {
        "models": {
            "policy": checkpoint.model_config_to_dict(policy_cfg),
            "value": checkpoint.model_config_to_dict(value_cfg),
        },
        "sources": {"reward": str(paths["reward"])},
    }
    ckpt.save(7, {"policy": policy, "value": value}, meta)
    ckpt.close()
    save_tiny_tokenizer(run / checkpoint.TOKENIZER_DIR)
    return run, (policy, policy_cfg), (value, value_cfg)


def _ours(params, config, tokens, mask):
    hidden, _ = models.forward(params, config, tokens, prompt_positions(mask), mask)
    if config.head == "score":
        return models.score(params, config, hidden)
    return models.lm_logits(params, config, hidden)


def test_export_loads_in_transformers_with_the_same_logits(run_checkpoint, tmp_path, capsys):
    run, (policy, policy_cfg), (value, value_cfg) = run_checkpoint
    out = tmp_path / "hf"
    assert cli.main(["export", str(run / "checkpoints" / "7"), str(out)]) == 0
    assert f"policy: {out}" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 56, size=(3, 7))
    mask = np.ones_like(tokens, bool)
    mask[0, :2] = False  # left padding
    tokens[0, :2] = 0
    lm = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    score = transformers.AutoModelForSequenceClassification.from_pretrained(out / "value").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 56 and tokenizer.pad_token_id == 0
    positions = np.array(prompt_positions(mask))
    with torch.no_grad():
        kwargs = dict(
            input_ids=torch.as_tensor(tokens),
            attention_mask=torch.as_tensor(mask.astype(np.int64)),
            position_ids=torch.as_tensor(positions),
        )
        want_lm = lm(**kwargs).logits.numpy()
        want_score = score.model(**kwargs).last_hidden_state @ score.score.weight.T
    forward = jax.jit(_ours, static_argnums=1)
    got_lm = np.asarray(forward(policy, policy_cfg, tokens, mask))
    got_score = np.asarray(forward(value, value_cfg, tokens, mask))
    assert_f32_close(got_lm[mask], want_lm[mask], ulps=MODEL)
    assert_f32_close(got_score[mask], want_score.numpy()[mask], ulps=MODEL)
    # The run directory stands for its newest checkpoint; --no-value skips the value model.
    assert cli.main(["export", str(run), str(tmp_path / "p"), "--no-value"]) == 0
    assert (tmp_path / "p" / "model.safetensors").exists() and not (
        tmp_path / "p" / "value"
    ).exists()
    assert cli.main(["export", str(tmp_path), str(tmp_path / "q")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    # --reward copies the run's frozen reward model.
    assert cli.main(["export", str(run), str(tmp_path / "r"), "--no-value", "--reward"]) == 0
    source = run.parent / "models" / "reward"
    for name in ("model.safetensors",):
        from safetensors.numpy import load_file

        want, got = load_file(source / name), load_file(tmp_path / "r" / "reward" / name)
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_generate_reads_a_checkpoint_like_its_export(run_checkpoint, tmp_path, capsys):
    run, (policy, policy_cfg), _ = run_checkpoint
    out = tmp_path / "hf"
    checkpoint.export(run, out, value=False)
    args = ["--prompt", "tell me a story", "--prompt", "the cat", "--greedy", "--json"]
    args += ["--max-new-tokens", "5"]
    assert cli.main(["generate", "--model", str(run / "checkpoints" / "7"), *args]) == 0
    from_checkpoint = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert cli.main(["generate", "--model", str(out), *args]) == 0
    from_export = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert from_checkpoint == from_export and len(from_export) == 2
    assert dataclasses.replace(policy_cfg) == checkpoint.restore_params(run)[1]
