"""The PPO trainer end to end on tiny random models (8 virtual CPU devices):

- a run writes its config, tokenizer, metrics.jsonl, samples, TensorBoard events, plots and
  checkpoints; 2 iterations + resume + 2 give a metrics.jsonl identical to 4 straight;
- a process killed with SIGKILL inside a save resumes from the last complete checkpoint and
  reproduces the uninterrupted run; SIGTERM saves a checkpoint and exits with status 0;
- a host reward function drives the rollout -> score -> update path; a NaN reward stops the run
  naming the iteration and leaves the last good checkpoint, from which the run resumes;
- bad paths, heads, vocabularies and meshes fail before any compilation.

All runs share one config, so the compiled step is reused (and the subprocesses load it from a
persistent compilation cache).
"""

import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from tokenizer_utils import save_tiny_models

from rlhf_jax import checkpoint, cli, config, data, logging, trainer

DATA = Path(__file__).parent / "data"
CONFIG = DATA / "tiny_ppo.yaml"
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("jax_cache")
    yield path
    # The trainer pointed this process's persistent compilation cache here; switch it off again.
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def overrides(inputs, run_dir, cache_dir, *extra):
    return [
        f"run_dir={run_dir}",
        f"models.policy={inputs['policy']}",
        f"models.reward={inputs['reward']}",
        f"data.path={DATA / 'prompts.jsonl'}",
        f"compilation_cache={cache_dir}",
        *extra,
    ]


def load(inputs, run_dir, cache_dir, *extra):
    return config.load_config(
        config.PPORunConfig, CONFIG, overrides(inputs, run_dir, cache_dir, *extra)
    )


@pytest.fixture(scope="module")
def straight(inputs, cache_dir, tmp_path_factory):
    """Four uninterrupted iterations (the reference for the resume tests)."""
    run_dir = tmp_path_factory.mktemp("straight")
    cfg = load(inputs, run_dir, cache_dir, "stop_after=4", "logging.plot=true")
    result = trainer.train(cfg)
    return cfg, result


def test_run_writes_everything_and_resume_is_bit_identical(
    straight, inputs, cache_dir, tmp_path, capsys
):
    cfg, result = straight
    run_dir = Path(cfg.run_dir).absolute()
    assert (result.status, result.iteration) == ("stopped", 4)
    assert result.checkpoint == run_dir / "checkpoints" / "4"
    assert config.load_config(config.PPORunConfig, run_dir / "config.yaml") == cfg
    assert (run_dir / "tokenizer" / "tokenizer.json").exists()
    assert checkpoint.Checkpointer(run_dir).all_steps() == [1, 2, 3, 4]
    records = logging.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert [r["episode"] for r in records] == [8.0, 16.0, 24.0, 32.0]
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "policy/clipfrac_avg"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert result.metrics == {k: v for k, v in records[-1].items() if k != "iteration"}
    samples = logging.read_jsonl(run_dir / "samples.jsonl")
    assert [s["iteration"] for s in samples] == [2, 4] and len(samples[0]["samples"]) == 2
    prompts = [json.loads(line)["prompt"] for line in (DATA / "prompts.jsonl").open()]
    for row in samples[0]["samples"]:
        assert isinstance(row["completion"], str) and math.isfinite(row["score"])
        assert any(p.endswith(row["prompt"].split()[-1]) for p in prompts)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("score", "kl", "entropy", "losses", "clipfrac", "summary"):
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    # 2 iterations, a crash after a third one was logged but not saved, resume, 2 more.
    split = tmp_path / "split"
    first = trainer.train(load(inputs, split, cache_dir, "stop_after=2"))
    assert (first.status, first.iteration) == ("stopped", 2)
    with (split / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"iteration": 3, "objective/scores": 123.0}) + "\n")
    with pytest.raises(trainer.SetupError, match="already has checkpoints.*--resume"):
        trainer.train(load(inputs, split, cache_dir, "stop_after=4"))
    second = trainer.train(load(inputs, split, cache_dir, "stop_after=4"), resume=True)
    assert (second.status, second.iteration) == ("stopped", 4)
    assert (split / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
    for item in ("policy", "value"):
        want, _ = checkpoint.restore_params(run_dir, item)
        got, _ = checkpoint.restore_params(split, item)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    assert "warning" not in capsys.readouterr().err
    # Resuming a run that already reached stop_after does nothing; a changed config is reported.
    changed = load(inputs, split, cache_dir, "stop_after=4", "seed=5", "ppo.kl_coef=0.1")
    again = trainer.train(changed, resume=True)
    assert (again.status, again.iteration, again.metrics) == ("stopped", 4, {})
    assert "differs from the run's in ppo.kl_coef, seed;" in capsys.readouterr().err


def test_non_finite_scores_stop_before_saving(inputs, cache_dir, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    poisoned = tmp_path / "poisoned_reward"
    shutil.copytree(inputs["reward"], poisoned)
    tensors = load_file(poisoned / "model.safetensors")
    tensors["score.weight"][0, :] = np.nan
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    run_dir = tmp_path / "nan"
    argv = ["train", "ppo", "--config", str(CONFIG), *overrides(inputs, run_dir, cache_dir)]
    assert cli.main([*argv, f"models.reward={poisoned}"]) == 1
    err = capsys.readouterr().err
    assert "iteration 1: non-finite values (" in err and "nonfinite/scores=8," in err
    assert checkpoint.Checkpointer(run_dir).all_steps() == []
    assert not (run_dir / "metrics.jsonl").read_text()


# ------------------------------------------------------------------------- kill -9 and SIGTERM


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _start(args, env, log: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_jax.cli", *args],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stderr, lines), daemon=True).start()
    return proc, lines


def _drain(lines: queue.Queue) -> list[str]:
    out = []
    while (line := lines.get(timeout=30)) is not None:
        out.append(line)
    return out


def _wait_for(proc, lines: queue.Queue, pattern: str, timeout: float = 240.0) -> list[str]:
    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"timed out waiting for {pattern!r}:\n{''.join(seen)}") from None
        if line is None:
            raise AssertionError(f"process ended before {pattern!r}:\n{''.join(seen)}")
        seen.append(line)
        if re.search(pattern, line):
            return seen


@pytest.mark.slow  # two fresh processes importing jax, transformers and torch
def test_sigkill_inside_a_save_then_resume_then_sigterm(straight, inputs, cache_dir, tmp_path):
    cfg, _ = straight
    run_dir = tmp_path / "killed"
    args = ["train", "ppo", "--config", str(CONFIG), *overrides(inputs, run_dir, cache_dir)]
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])

    # 1. Killed with SIGKILL while the save of iteration 2 is in progress.
    proc, lines = _start(args, dict(env, RLHF_JAX_HANG_IN_SAVE="2"), tmp_path / "1.out")
    _wait_for(proc, lines, "hanging inside the save of 2")
    proc.kill()
    proc.wait(timeout=30)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "1" in names and "2" not in names and any(n.startswith("2.") for n in names), names
    assert checkpoint.Checkpointer(run_dir).latest_step() == 1

    # 2. Resumed from iteration 1; SIGTERM once it has redone iteration 2.
    proc, lines = _start([*args, "--resume"], env, tmp_path / "2.out")
    seen = _wait_for(proc, lines, r"^it 2/1000 ")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    output = "".join(seen + _drain(lines))
    assert proc.returncode == 0, output
    assert "resumed at iteration 1" in output
    stopped_at = int(re.search(r"SIGTERM: saved a checkpoint at iteration (\d+)", output)[1])
    assert stopped_at >= 2
    steps = checkpoint.Checkpointer(run_dir).all_steps()
    assert steps[-1] == stopped_at and not any(
        ".orbax" in p.name for p in (run_dir / "checkpoints").iterdir()
    )
    lines_killed = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines_straight = (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines_killed] == list(range(1, stopped_at + 1))
    n = min(stopped_at, len(lines_straight))
    assert lines_killed[:n] == lines_straight[:n]


# ------------------------------------------------------------------------- reward functions

CALLS: list[dict] = []


def word_count_reward(prompts, completions, prompt_ids, completion_ids, answer, **unused):
    """Rewards completions that repeat the prompt's answer word; NaN on the third call when
    `CALLS` asks for it."""
    CALLS.append(
        dict(prompts=prompts, completions=completions, prompt_ids=prompt_ids, answer=answer)
    )
    scores = [float(c.split().count(a)) for c, a in zip(completions, answer)]
    if len(CALLS) == 3 and os.environ.get("TINY_REWARD_NAN") == "1":
        scores[0] = float("nan")
    return scores


def test_reward_function_path_nan_stops_and_resume(inputs, cache_dir, tmp_path, monkeypatch):
    from rlhf_jax.reward_functions import RewardFunctionError

    extra = (
        "models.reward=null",
        "models.reward_function=test_trainer:word_count_reward",
        "data.reward_columns=[answer]",
        "logging.sample_every=0",
        "stop_after=4",
    )
    run_dir = tmp_path / "fn"
    CALLS.clear()
    monkeypatch.setenv("TINY_REWARD_NAN", "1")
    with pytest.raises(RewardFunctionError, match=r"iteration 3: .*returned nan .*must be finite"):
        trainer.train(load(inputs, run_dir, cache_dir, *extra))
    assert checkpoint.Checkpointer(run_dir).all_steps() == [1, 2]
    records = logging.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2]
    # The value model starts from the policy with a zero head: the first values are exactly 0.
    assert records[0]["val/values_mean"] == 0.0
    assert (
        records[0]["rewards/test_trainer:word_count_reward/mean"]
        == records[0]["objective/raw_scores"]
    )
    tok = data.load_tokenizer(config.TokenizerConfig(), str(inputs["policy"]))
    call = CALLS[0]
    assert len(call["prompts"]) == 8 and len(call["answer"]) == 8
    for prompt, ids in zip(call["prompts"], call["prompt_ids"]):
        assert tok.decode(ids) == tok.decode(tok(prompt)["input_ids"][-8:])

    monkeypatch.setenv("TINY_REWARD_NAN", "0")
    result = trainer.train(load(inputs, run_dir, cache_dir, *extra), resume=True)
    assert (result.status, result.iteration) == ("stopped", 4)
    assert [r["iteration"] for r in logging.read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_metrics_are_fetched_once_after_the_next_rollout_is_dispatched(
    straight, inputs, cache_dir, tmp_path, monkeypatch
):
    """An iteration's metrics are fetched in one transfer (`fetch_metrics`), after the next
    iteration's rollout has been dispatched (the device generates while the host logs, writes
    samples and checkpoints); the last iteration is still logged, and every iteration's record
    holds exactly the fetched values, the same as the straight run's."""
    events, fetched = [], []
    programs = trainer.iteration_programs
    fetch_metrics = trainer.fetch_metrics

    def counting_programs(*args):
        real = programs(*args)

        def rollout(*a, **k):
            events.append("rollout")
            return real.rollout(*a, **k)

        return real._replace(rollout=rollout)

    def counting_fetch(device_metrics):
        events.append("fetch")
        fetched.append(fetch_metrics(device_metrics))
        return fetched[-1]

    monkeypatch.setattr(trainer, "iteration_programs", counting_programs)
    monkeypatch.setattr(trainer, "fetch_metrics", counting_fetch)
    run_dir = tmp_path / "pipelined"
    result = trainer.train(load(inputs, run_dir, cache_dir, "stop_after=3"))
    assert (result.status, result.iteration) == ("stopped", 3)
    assert events == ["rollout", "rollout", "fetch", "rollout", "fetch", "fetch"]
    records = logging.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for record, values in zip(records, fetched, strict=True):
        assert {k: record[k] for k in values} == values
    cfg, _ = straight
    assert records == logging.read_jsonl(Path(cfg.run_dir).absolute() / "metrics.jsonl")[:3]
    assert checkpoint.Checkpointer(run_dir).all_steps() == [1, 2, 3]
    assert [s["iteration"] for s in logging.read_jsonl(run_dir / "samples.jsonl")] == [2, 3]


# ----------------------------------------------------------------------- errors before compute


PTX = ("ppo.ptx_coef=0.5", f"ptx_data.path={DATA / 'pretrain.jsonl'}", "ptx_data.max_length=12")
# ... with the reference and reward models stored in bfloat16 (the trained ones stay float32)
PTX += ("models.frozen_dtype=bfloat16",)


@pytest.mark.slow  # suite time (CI runs the slow set too)
def test_ppo_ptx_run_adds_the_lm_loss_and_resumes_identically(inputs, cache_dir, tmp_path, capsys):
    """PPO-ptx through the trainer: every iteration reports a finite LM loss on the pretraining
    texts, and 1 iteration + resume + 2 gives the metrics of 3 straight (the ptx data position is
    checkpointed)."""
    straight = trainer.train(load(inputs, tmp_path / "a", cache_dir, "stop_after=3", *PTX))
    assert (straight.status, straight.iteration) == ("stopped", 3)
    records = logging.read_jsonl(tmp_path / "a" / "metrics.jsonl")
    ptx = [r["loss/ptx_avg"] for r in records]
    assert len(ptx) == 3 and all(math.isfinite(v) and v > 0 for v in ptx)
    # 12 texts: one of a single token is dropped, three are cut to 12 tokens.
    err = capsys.readouterr().err
    assert "PPO-ptx: 11 texts" in err and "8 per iteration (3 cut to max_length)" in err
    split = tmp_path / "b"
    trainer.train(load(inputs, split, cache_dir, "stop_after=1", *PTX))
    trainer.train(load(inputs, split, cache_dir, "stop_after=3", *PTX), resume=True)
    assert (split / "metrics.jsonl").read_text() == (tmp_path / "a" / "metrics.jsonl").read_text()
    # Resuming with different pretraining data is refused.
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "the cat sat on the mat"}\n')
    with pytest.raises(trainer.SetupError, match="2? ?PPO-ptx texts but ptx_data now has 1"):
        trainer.train(
            load(inputs, split, cache_dir, "stop_after=4", *PTX, f"ptx_data.path={other}"),
            resume=True,
        )


@pytest.mark.slow  # suite time (CI runs the slow set too)
def test_shared_value_head_run_resumes_and_exports_a_value_model(inputs, cache_dir, tmp_path):
    """`models.shared_value_head`: the head starts at zero and is trained, a resumed run equals a
    straight one, and `export` writes a value model of the policy's trunk and that
    head (a Hugging Face sequence classifier)."""
    import torch
    import transformers

    shared = "models.shared_value_head=true"
    a, b = tmp_path / "a", tmp_path / "b"
    trainer.train(load(inputs, a, cache_dir, "stop_after=3", shared))
    trainer.train(load(inputs, b, cache_dir, "stop_after=1", shared))
    trainer.train(load(inputs, b, cache_dir, "stop_after=3", shared), resume=True)
    assert (b / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()
    records = logging.read_jsonl(a / "metrics.jsonl")
    assert records[0]["val/values_mean"] == 0.0 and records[-1]["val/values_mean"] != 0.0

    out = tmp_path / "export"
    assert cli.main(["export", str(a), str(out)]) == 0
    policy, _ = checkpoint.restore_params(a, "policy")
    value, value_config = checkpoint.restore_params(a, "value")
    assert value_config.head == "score" and "lm_head" not in value
    np.testing.assert_array_equal(value["embed"]["embedding"], policy["embed"]["embedding"])
    hf_value = transformers.AutoModelForSequenceClassification.from_pretrained(out / "value")
    np.testing.assert_array_equal(
        hf_value.score.weight.detach().numpy(), np.asarray(value["score"]["kernel"]).T
    )
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(out)
    for (name, got), want in zip(
        hf_value.model.named_parameters(), hf_policy.model.parameters(), strict=True
    ):
        assert torch.equal(got, want), name

    with pytest.raises(config.ConfigError, match="shared_value_head=true .* unset models.value"):
        load(inputs, a, cache_dir, shared, f"models.value={inputs['reward']}")


def test_setup_errors_come_before_any_compilation(inputs, cache_dir, tmp_path, monkeypatch):
    from hf_utils import tiny_hf_model

    def no_compute(*args, **kwargs):
        raise AssertionError("compiled before the setup error")

    monkeypatch.setattr(trainer, "iteration_programs", no_compute)
    small_vocab = tmp_path / "small_vocab"
    tiny_hf_model("llama", vocab_size=32, hidden_size=32, intermediate_size=64).save_pretrained(
        small_vocab
    )
    cases = [
        (
            ["models.policy=/nonexistent/policy"],
            "models.policy='/nonexistent/policy' does not exist",
        ),
        ([f"models.policy={tmp_path}"], "is not a Hugging Face model directory"),
        ([f"models.reward={inputs['policy']}"], "must be a sequence classifier with one label"),
        (
            [f"models.policy={small_vocab}", f"tokenizer.path={inputs['policy']}"],
            "the tokenizer has 56 tokens but models.policy's vocabulary has 32",
        ),
        (
            ["ppo.batch_size=12", "ppo.num_mini_batches=1"],
            "not divisible by the mesh's data x fsdp = 8",
        ),
        (["mesh.data=3"], "mesh: MeshConfig.* needs 3 devices but 8 are available"),
        (["ppo.pad_token_id=5"], "differs from the tokenizer's pad token id 0"),
        (["data.column=text"], "no column 'text'; available columns: \\['answer', 'prompt'\\]"),
        (["tokenizer.extra_stop_tokens=[zebra]"], "'zebra' is not a single token"),
        (
            ["tokenizer.stop_at_eos=false", "ppo.missing_eos_penalty=1.0"],
            "missing_eos_penalty=1.0 is set but stop_token_ids is empty",
        ),
        (["ppo.ptx_coef=0.5"], "ppo.ptx_coef=0.5 needs pretraining text: set ptx_data.path"),
        ([PTX[1]], "ptx_data is set but ppo.ptx_coef=0"),
        ([*PTX, "ptx_data.batch_size=4"], "ptx_data.batch_size=4 .* not divisible by the mesh"),
        ([*PTX, "ptx_data.batch_size=9"], "ptx_data.batch_size=9 .* num_mini_batches x grad"),
        ([*PTX, "ptx_data.column=body"], "no column 'body'; available columns: \\['text'\\]"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            trainer.train(load(inputs, tmp_path / "run", cache_dir, *extra))
