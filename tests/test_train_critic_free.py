"""`rlhf-jax train grpo | rloo | reinforce++` through the CLI on tiny local models and prompts:
a Python reward function or a reward model, checkpoints with exact resume, the exported policy."""

import json
import shutil

import pytest
import transformers
from tokenizer_utils import save_tiny_models

from rlhf_jax import cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic_free")
    paths = save_tiny_models(root / "models")
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": f"tell me a story about the {w} .", "answer": "yes"} for w in ("cat", "dog")]
    prompts.write_text("\n".join(json.dumps(r) for r in rows * 8))
    return root, paths, prompts


def args(run_dir, paths, prompts, algo, *extra):
    return [
        f"run_dir={run_dir}",
        f"models.policy={paths['policy']}",
        f"data.path={prompts}",
        "data.max_prompt_length=12",
        f"{algo}.num_prompts=4",
        f"{algo}.response_length=6",
        f"{algo}.total_iterations=4",
        f"{algo}.learning_rate=0.001",
        "checkpoint.every=2",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        *extra,
    ]


def iterations(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_grpo_with_a_reward_function_resumes_exactly(tiny):
    root, paths, prompts = tiny
    extra = ["models.reward_function=rlhf_jax.reward_functions:length_reward", "grpo.beta=0.04"]
    straight, split = root / "grpo_straight", root / "grpo_split"
    assert cli.main(["train", "grpo", *args(straight, paths, prompts, "grpo", *extra)]) == 0
    assert cli.main(["train", "grpo", *args(split, paths, prompts, "grpo", *extra)]) == 0
    # Drop the last checkpoint (as if the run died after iteration 2's save), then resume.
    shutil.rmtree(split / "checkpoints" / "4")
    assert (
        cli.main(["train", "grpo", "--resume", *args(split, paths, prompts, "grpo", *extra)]) == 0
    )
    assert iterations(split) == iterations(straight)
    assert [r["iteration"] for r in iterations(straight)] == [1, 2, 3, 4]
    policy = transformers.AutoModelForCausalLM.from_pretrained(straight / "policy")
    assert policy.config.vocab_size == 64


@pytest.mark.parametrize("algo, key", [("rloo", "rloo"), ("reinforce++", "reinforce")])
def test_reward_model_algorithms_run(tiny, algo, key):
    root, paths, prompts = tiny
    run_dir = root / algo
    extra = [f"models.reward={paths['reward']}", f"{key}.total_iterations=2"]
    assert cli.main(["train", algo, *args(run_dir, paths, prompts, key, *extra)]) == 0
    records = iterations(run_dir)
    assert [r["iteration"] for r in records] == [1, 2], records


def test_mesh_is_checked_before_loading(tiny, capsys):
    """The critic-free runs take the same `mesh` section as `train ppo` (default: all devices on
    data); an impossible mesh is a setup error, exit status 2."""
    root, paths, prompts = tiny
    reward = "models.reward_function=rlhf_jax.reward_functions:length_reward"
    run = args(root / "bad_mesh", paths, prompts, "rloo", reward, "mesh.data=3")
    assert cli.main(["train", "rloo", *run]) == 2
    assert "mesh: MeshConfig" in capsys.readouterr().err
    assert not (root / "bad_mesh" / "checkpoints").exists()
