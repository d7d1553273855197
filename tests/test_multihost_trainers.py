"""The trainers' host paths across processes (issue #25 item 4): `rlhf-jax train ppo` with a host
reward function and the value model made from the policy, and `rlhf-jax train grpo` with a host
reward function, each run as two processes x 4 CPU devices with `fsdp=8` spanning both (gloo
collectives), write the metrics (and GRPO the exported policy) of the same run in one process on
8 devices, and a counting reward function shows every row scored exactly once: each process
scores its own half of the batch. Slow: two fresh processes compile each trainer."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizer_utils import save_tiny_models
from tolerances import GRADIENT, assert_f32_close

sys.path.insert(0, str(Path(__file__).parent))
import multihost_worker  # noqa: E402

from rlhf_jax import cli, logging  # noqa: E402

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "data"
REWARD = "models.reward_function=multihost_worker:counting_length_reward"
MESH = ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_trainers")
    paths = save_tiny_models(root / "models")
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": f"tell me a story about the {w} ."} for w in ("cat", "dog", "owl", "fox")]
    prompts.write_text("\n".join(json.dumps(r) for r in rows * 4))
    return root, paths, prompts


def scored(directory: Path) -> dict[int, list[int]]:
    """Rows per reward-function call, per process index."""
    return {
        int(f.stem.split("_")[1]): [int(n) for n in f.read_text().split()]
        for f in sorted(directory.glob("scored_*.txt"))
    }


def run_both(tmp_path, monkeypatch, argv):
    """`argv` (without run_dir) run by two processes and, meanwhile, by this one. Returns the two
    run directories (two processes, one) and the rows each process scored per call."""
    two, one = tmp_path / "two", tmp_path / "one"
    (tmp_path / "count_two").mkdir()
    (tmp_path / "count_one").mkdir()
    (tmp_path / "train_cli.json").write_text(json.dumps([*argv, f"run_dir={two}"]))
    monkeypatch.setenv("RLHF_COUNT_DIR", str(tmp_path / "count_two"))
    workers = multihost_worker.launch("train_cli", tmp_path, num_processes=2, local_devices=4)
    try:
        monkeypatch.setenv("RLHF_COUNT_DIR", str(tmp_path / "count_one"))
        assert cli.main([*argv, f"run_dir={one}"]) == 0
    finally:
        results = multihost_worker.wait_or_fail(workers, timeout=900.0)
    assert [int(r["rc"]) for r in results] == [0, 0]
    return two, one, scored(tmp_path / "count_two"), scored(tmp_path / "count_one")


def assert_same_records(two: Path, one: Path, n: int) -> None:
    got, want = (logging.read_jsonl(d / "metrics.jsonl") for d in (two, one))
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] == list(range(1, n + 1))
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for key in w:
            assert_f32_close(g[key], w[key], ulps=GRADIENT, floor=1.0, err_msg=key)


def test_ppo_with_a_reward_function_on_two_processes(tiny, tmp_path, monkeypatch):
    root, paths, prompts = tiny
    argv = [
        "train",
        "ppo",
        "--config",
        str(DATA / "tiny_ppo.yaml"),
        f"models.policy={paths['policy']}",
        "models.reward=null",
        REWARD,
        f"data.path={prompts}",
        "stop_after=2",
        "logging.sample_every=1",
        f"compilation_cache={root / 'jax_cache'}",
        *MESH,
    ]
    two, one, counts, reference = run_both(tmp_path, monkeypatch, argv)
    assert reference == {0: [8, 8]}  # ppo.batch_size 8, two iterations
    assert counts == {0: [4, 4], 1: [4, 4]}  # each process its own half, once
    assert_same_records(two, one, 2)
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()


def test_grpo_with_a_reward_function_on_two_processes(tiny, tmp_path, monkeypatch):
    root, paths, prompts = tiny
    argv = [
        "train",
        "grpo",
        f"models.policy={paths['policy']}",
        REWARD,
        f"data.path={prompts}",
        "data.max_prompt_length=12",
        "grpo.num_prompts=4",
        "grpo.num_generations=4",
        "grpo.response_length=6",
        "grpo.total_iterations=2",
        "grpo.learning_rate=0.001",
        "grpo.beta=0.04",
        "checkpoint.every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        f"compilation_cache={root / 'jax_cache'}",
        *MESH,
    ]
    two, one, counts, reference = run_both(tmp_path, monkeypatch, argv)
    assert reference == {0: [16, 16]}  # 4 prompts x 4 completions, two iterations
    assert counts == {0: [8, 8], 1: [8, 8]}
    assert_same_records(two, one, 2)
    got, want = (load_file(str(d / "policy" / "model.safetensors")) for d in (two, one))
    assert sorted(got) == sorted(want)
    for name in want:
        assert_f32_close(got[name], want[name], ulps=GRADIENT, floor=1.0, err_msg=name)
    assert np.any([np.any(got[n] != 0) for n in got])
