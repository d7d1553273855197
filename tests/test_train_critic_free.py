"""`rlhf-jax train grpo | rloo | reinforce++` through the CLI on tiny local models and prompts:
a Python reward function or a reward model, checkpoints with exact resume (after a lost
checkpoint, `stop_after` and SIGTERM), the exported policy."""

import json
import os
import shutil
import signal

import jax
import pytest
import transformers
from tokenizer_utils import save_tiny_models

from rlhf_jax import cli
from rlhf_jax.reward_functions import length_reward

GRPO_REWARD = ["models.reward_function=rlhf_jax.reward_functions:length_reward", "grpo.beta=0.04"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic_free")
    paths = save_tiny_models(root / "models")
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": f"tell me a story about the {w} .", "answer": "yes"} for w in ("cat", "dog")]
    prompts.write_text("\n".join(json.dumps(r) for r in rows * 8))
    yield root, paths, prompts
    # The runs pointed this process's persistent compilation cache at `root`; switch it off.
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


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
        # Runs of one algorithm compile the same programs: later runs load them from here.
        f"compilation_cache={run_dir.parent / 'jax_cache'}",
        *extra,
    ]


def iterations(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def grpo_straight(tiny):
    """Four uninterrupted GRPO iterations with a Python reward (the reference for resumes)."""
    root, paths, prompts = tiny
    run_dir = root / "grpo_straight"
    assert cli.main(["train", "grpo", *args(run_dir, paths, prompts, "grpo", *GRPO_REWARD)]) == 0
    return run_dir


def test_grpo_with_a_reward_function_resumes_exactly(tiny, grpo_straight):
    root, paths, prompts = tiny
    split = root / "grpo_split"
    assert cli.main(["train", "grpo", *args(split, paths, prompts, "grpo", *GRPO_REWARD)]) == 0
    # Drop the last checkpoint (as if the run died after iteration 2's save), then resume.
    shutil.rmtree(split / "checkpoints" / "4")
    resume = ["train", "grpo", "--resume", *args(split, paths, prompts, "grpo", *GRPO_REWARD)]
    assert cli.main(resume) == 0
    assert iterations(split) == iterations(grpo_straight)
    assert [r["iteration"] for r in iterations(grpo_straight)] == [1, 2, 3, 4]
    policy = transformers.AutoModelForCausalLM.from_pretrained(grpo_straight / "policy")
    assert policy.config.vocab_size == 64


def test_metrics_are_fetched_once_after_the_next_iteration_is_dispatched(
    tiny, grpo_straight, monkeypatch
):
    """An iteration's metrics are fetched in one transfer (`fetch_metrics`), after the next
    iteration's rollout has been dispatched (the one training loop of every algorithm; the
    checkpoint every 2 iterations is written when its iteration is logged, before the next
    update donates the state). Every iteration is logged with exactly the fetched values, those
    of the straight run."""
    from rlhf_jax import trainer

    root, paths, prompts = tiny
    events, fetched = [], []
    programs = trainer.iteration_programs
    fetch_metrics = trainer.fetch_metrics

    def counting_programs(*args):
        real = programs(*args)

        def rollout(*a, **k):
            events.append("rollout")
            return real.rollout(*a, **k)

        return real._replace(rollout=rollout)

    def counting_fetch(metrics):
        events.append("fetch")
        fetched.append(fetch_metrics(metrics))
        return fetched[-1]

    monkeypatch.setattr(trainer, "iteration_programs", counting_programs)
    monkeypatch.setattr(trainer, "fetch_metrics", counting_fetch)
    run_dir = root / "grpo_pipelined"
    assert cli.main(["train", "grpo", *args(run_dir, paths, prompts, "grpo", *GRPO_REWARD)]) == 0
    assert events == [
        "rollout",
        "rollout",
        "fetch",
        "rollout",
        "fetch",
        "rollout",
        "fetch",
        "fetch",
    ]
    records = iterations(run_dir)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for record, values in zip(records, fetched, strict=True):
        assert {k: record[k] for k in values} == values
    assert records == iterations(grpo_straight)


_signalled = []


def length_reward_then_sigterm(prompts, completions, **kwargs):
    """`length_reward` that sends this process SIGTERM on its first call (mid-iteration)."""
    if not _signalled:
        _signalled.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
    return length_reward(prompts, completions, **kwargs)


def test_stop_after_and_sigterm_save_and_resume_exactly(tiny, grpo_straight, capsys):
    """`stop_after=1` stops with a checkpoint and no export; a SIGTERM during iteration 2 finishes
    that iteration, saves it and exits with status 0; resuming twice gives the straight run."""
    root, paths, prompts = tiny
    run_dir = root / "grpo_stopped"
    run = args(run_dir, paths, prompts, "grpo", *GRPO_REWARD, "checkpoint.every=0")
    assert cli.main(["train", "grpo", *run, "stop_after=1"]) == 0
    assert "grpo: stopped at iteration 1" in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1"]
    assert not (run_dir / "policy").exists()

    sigterm = f"models.reward_function={__name__}:length_reward_then_sigterm"
    assert cli.main(["train", "grpo", "--resume", *run, sigterm]) == 0
    out = "".join(capsys.readouterr())
    assert "SIGTERM: saved a checkpoint at iteration 2" in out
    assert "grpo: interrupted at iteration 2" in out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is uninstalled
    assert (run_dir / "checkpoints" / "2").exists()
    assert not (run_dir / "policy").exists()

    assert cli.main(["train", "grpo", "--resume", *run]) == 0

    def renamed(records):  # iteration 2's reward term is named after the signalling function
        return [
            {
                k.replace(sigterm.split("=")[1], GRPO_REWARD[0].split("=")[1]): v
                for k, v in r.items()
            }
            for r in records
        ]

    assert renamed(iterations(run_dir)) == iterations(grpo_straight)
    assert (run_dir / "policy" / "config.json").exists()


@pytest.mark.parametrize(
    "algo, key",
    [("rloo", "rloo"), pytest.param("reinforce++", "reinforce", marks=pytest.mark.slow)],
)
def test_reward_model_algorithms_run(tiny, algo, key):
    root, paths, prompts = tiny
    run_dir = root / algo
    extra = [f"models.reward={paths['reward']}", f"{key}.total_iterations=2"]
    extra += ["models.frozen_dtype=bfloat16"]  # bfloat16 reference and reward, float32 policy
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
