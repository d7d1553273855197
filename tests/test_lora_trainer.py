"""LoRA runs through the CLI on the tiny local models: `rlhf-jax train ppo|grpo` with
`models.lora`, checkpoints holding adapters only with exact resume, `rlhf-jax export --lora
merged|adapter` loading in transformers / peft, a peft adapter as the starting point, and bad
input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers
from tokenizer_utils import save_tiny_models
from tolerances import MODEL, assert_f32_close

from rlhf_jax import checkpoint, cli, config, run_setup, sharding, trainer
from rlhf_jax.models import lora

DATA = Path(__file__).parent / "data"
LORA = ["models.lora.rank=4", "models.lora.alpha=8", "models.frozen_dtype=bfloat16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_runs")
    paths = save_tiny_models(root / "models")
    yield root, paths
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def ppo_args(root, paths, run_dir, *extra):
    return [
        f"run_dir={run_dir}",
        f"models.policy={paths['policy']}",
        f"models.reward={paths['reward']}",
        f"data.path={DATA / 'prompts.jsonl'}",
        f"compilation_cache={root / 'jax_cache'}",
        "logging.tensorboard=false",
        *LORA,
        *extra,
    ]


def _metrics(run_dir):
    return (run_dir / "metrics.jsonl").read_text()


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens)).logits.float().numpy()


def test_lora_ppo_resumes_exactly_saves_adapters_only_and_exports(tiny, tmp_path):
    root, paths = tiny
    yaml = str(DATA / "tiny_ppo.yaml")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert (
        cli.main(
            ["train", "ppo", "--config", yaml, *ppo_args(root, paths, straight, "stop_after=3")]
        )
        == 0
    )
    assert (
        cli.main(["train", "ppo", "--config", yaml, *ppo_args(root, paths, split, "stop_after=2")])
        == 0
    )
    resume = [
        "train",
        "ppo",
        "--resume",
        "--config",
        yaml,
        *ppo_args(root, paths, split, "stop_after=3"),
    ]
    assert cli.main(resume) == 0
    assert _metrics(split) == _metrics(straight)
    records = [json.loads(line) for line in _metrics(straight).splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss/policy_avg"]) for r in records)

    # The checkpoint holds the adapters (and the value model's trained head), not the bases.
    ckpt_dir = straight / "checkpoints" / "3"
    with ocp.StandardCheckpointer() as reader:
        policy_tree = reader.metadata(ckpt_dir / "policy").item_metadata.tree
        value_tree = reader.metadata(ckpt_dir / "value").item_metadata.tree
    assert set(policy_tree) == {"layers"} and set(value_tree) == {"layers", "score"}
    leaves = jax.tree_util.tree_flatten_with_path(policy_tree)[0]
    assert {str(path[-1].key) for path, _ in leaves} == {"lora_a", "lora_b"}
    for item in ("policy", "value"):
        want, _ = checkpoint.restore_params(straight, item)
        got, _ = checkpoint.restore_params(split, item)
        jax.tree.map(np.testing.assert_array_equal, got, want)

    # Export: merged HF checkpoints, and peft adapters for the base models, agree.
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert cli.main(["export", str(straight), str(merged)]) == 0
    assert cli.main(["export", str(straight), str(adapter), "--lora", "adapter"]) == 0
    assert (adapter / "adapter_config.json").exists() and (adapter / "value").is_dir()
    tokens = np.array([[5, 9, 13, 17, 21, 25]])
    full = transformers.AutoModelForCausalLM.from_pretrained(merged)
    base = transformers.AutoModelForCausalLM.from_pretrained(paths["policy"])
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    want = _logits(full, tokens)
    assert_f32_close(_logits(with_adapter, tokens), want, ulps=MODEL)
    params, model_config = checkpoint.restore_params(straight, "policy")
    base_logits = _logits(
        transformers.AutoModelForCausalLM.from_pretrained(paths["policy"]), tokens
    )
    assert np.abs(want - base_logits).max() > 1e-4  # the adapters trained
    value_full = transformers.AutoModelForSequenceClassification.from_pretrained(merged / "value")
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(paths["reward"])
    value_peft = peft.PeftModel.from_pretrained(reward, adapter / "value").eval()
    assert_f32_close(_logits(value_peft, tokens), _logits(value_full, tokens), ulps=MODEL)

    # The exported adapter is a starting point: the run's first policy is base + adapter.
    overrides = [a for a in ppo_args(root, paths, tmp_path / "next") if "models.lora." not in a]
    overrides.append(f"models.lora_adapter={adapter}")
    cfg = config.load_config(config.PPORunConfig, DATA / "tiny_ppo.yaml", overrides)
    assert cfg.models.lora is None
    setup = trainer.prepare(cfg)
    assert setup.rl_models.policy.lora == model_config.lora
    assert setup.rl_models.value.lora.train_modules == ("score",)
    assert setup.rl_models.value_shares_reward_base  # one copy of the reward base
    mesh = sharding.make_mesh(None, jax.devices()[:1])
    policy = run_setup.with_adapters(
        lora.base(params), setup.rl_models.policy, mesh, jax.random.key(0), str(adapter)
    )
    jax.tree.map(np.testing.assert_array_equal, policy, params)  # the adapter read back exactly


def test_lora_grpo_run_exports_a_merged_policy_and_a_peft_adapter(tiny, tmp_path):
    root, paths = tiny
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"tell me a story about the {w} ."} for w in ("cat", "dog")]
    prompts.write_text("\n".join(json.dumps(r) for r in rows * 4))
    run_dir = tmp_path / "grpo"
    args = [
        f"run_dir={run_dir}",
        f"models.policy={paths['policy']}",
        "models.reward_function=rlhf_jax.reward_functions:length_reward",
        f"data.path={prompts}",
        "data.max_prompt_length=12",
        "grpo.num_prompts=2",
        "grpo.num_generations=4",
        "grpo.response_length=6",
        "grpo.total_iterations=2",
        "grpo.beta=0.04",  # a KL to the reference: the base, adapters off
        "checkpoint.every=1",
        "logging.tensorboard=false",
        "logging.plot=false",
        f"compilation_cache={root / 'jax_cache'}",
        *LORA[:2],  # a float32 base, so the merged export and base + peft adapter are equal
    ]
    assert cli.main(["train", "grpo", *args]) == 0
    records = [json.loads(line) for line in _metrics(run_dir).splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    # Stopped after one iteration and resumed from its adapters-only checkpoint: the same run.
    split = [a.replace(str(run_dir), str(tmp_path / "grpo_split")) for a in args]
    assert cli.main(["train", "grpo", *split, "stop_after=1"]) == 0
    assert cli.main(["train", "grpo", "--resume", *split]) == 0
    assert _metrics(tmp_path / "grpo_split") == _metrics(run_dir)
    with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(run_dir / "checkpoints" / "1" / "policy").item_metadata.tree
    leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
    assert {str(path[-1].key) for path, _ in leaves} == {"lora_a", "lora_b"}
    assert all(np.isfinite(r["loss/kl_avg"]) for r in records)
    tokens = np.array([[5, 9, 13, 17, 21, 25]])
    merged = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    base = transformers.AutoModelForCausalLM.from_pretrained(paths["policy"])
    adapter = peft.PeftModel.from_pretrained(base, run_dir / "policy_adapter").eval()
    assert_f32_close(_logits(adapter, tokens), _logits(merged, tokens), ulps=MODEL)


def test_bad_lora_setups_are_clear_errors_before_any_compile(tiny, tmp_path, capsys):
    root, paths = tiny
    yaml = str(DATA / "tiny_ppo.yaml")
    run = tmp_path / "bad"
    assert (
        cli.main(
            ["train", "ppo", "--config", yaml, *ppo_args(root, paths, run, "models.lora.rank=0")]
        )
        == 2
    )
    assert "lora.rank must be a positive integer" in capsys.readouterr().err
    bad_target = ppo_args(root, paths, run, "models.lora.targets=[qkv]")
    assert cli.main(["train", "ppo", "--config", yaml, *bad_target]) == 2
    assert "unknown module 'qkv'" in capsys.readouterr().err
    both = ppo_args(root, paths, run, f"models.lora_adapter={tmp_path}")
    assert cli.main(["train", "ppo", "--config", yaml, *both]) == 2
    assert "not both" in capsys.readouterr().err
    no_adapter = [a for a in ppo_args(root, paths, run) if not a.startswith("models.lora.")]
    no_adapter.append(f"models.lora_adapter={tmp_path}")
    assert cli.main(["train", "ppo", "--config", yaml, *no_adapter]) == 2
    assert "not a peft adapter directory" in capsys.readouterr().err
    assert not run.exists()
