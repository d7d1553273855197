"""The `rlhf-jax` CLI: the example configs load and fit their meshes, overrides and errors name
the key, the algorithm registry dispatches `train NAME`, `generate` matches transformers' greedy
decoding, `plot` writes PNGs, and `demo` still calls `run_demo`."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from tokenizer_utils import save_tiny_models, tiny_tokenizer

from rlhf_jax import cli, config
from rlhf_jax.logging import PLOT_GROUPS

REPO = Path(__file__).parent.parent
TINY = REPO / "tests" / "data" / "tiny_ppo.yaml"
REQUIRED = ["run_dir=r", "models.policy=p", "models.reward=m", "data.path=d"]


@pytest.mark.parametrize(
    "name", ["ppo_tldr_pythia1b", "ppo_chat_qwen2.5_0.5b", "ppo_chat_qwen2.5_1.5b"]
)
def test_example_configs_load_and_fit_their_meshes(name):
    cfg = config.load_config(config.PPORunConfig, REPO / "configs" / f"{name}.yaml")
    data_size, fsdp, _ = cfg.mesh.resolve(8)  # each states an 8-accelerator mesh
    assert cfg.ppo.batch_size % (data_size * fsdp) == 0
    assert cfg.ppo.micro_batch_size % (data_size * fsdp) == 0
    assert cfg.models.reward and cfg.models.value is None  # value model from the reward model
    reloaded = config.load_config(config.PPORunConfig, values=yaml.safe_load(config.to_yaml(cfg)))
    assert reloaded == cfg  # what `train --print-config` prints and config.yaml holds
    if name == "ppo_tldr_pythia1b":  # TRL's reference setup
        ppo = cfg.ppo
        assert (ppo.response_length, ppo.temperature, ppo.missing_eos_penalty) == (53, 0.7, 1.0)
        assert (ppo.learning_rate, ppo.batch_size, ppo.num_ppo_epochs) == (3e-6, 512, 4)
        assert ppo.micro_batch_size == 128 and cfg.tokenizer.stop_at_eos
        assert cfg.models.policy == "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"
        tok = tiny_tokenizer(chat_template=cfg.tokenizer.chat_template)
        messages = [{"role": "user", "content": "POST"}, {"role": "assistant", "content": "x"}]
        rendered = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        assert rendered == "User: POST\n\nAssistant:"
    else:
        assert cfg.data.chat and cfg.models.dtype == "bfloat16"


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ppo.bogus=1"], "override 'ppo.bogus=1': ppo.bogus: unknown key; PPOConfig has"),
        (["bogus.x=1"], "bogus: unknown key; PPORunConfig has checkpoint, compilation_cache"),
        (["ppo.batch_size=abc"], "ppo.batch_size expects int, got 'abc'"),
        (["ppo.batch_size=8.5"], "ppo.batch_size expects int, got 8.5"),
        (["ppo.kl_estimator=k9"], "ppo.kl_estimator expects one of 'k1', 'k2', 'k3', got 'k9'"),
        (["data.truncation=middle"], "data.truncation expects one of 'left', 'drop'"),
        (["ppo.num_mini_batches=3"], "ppo: batch_size=8 must be a positive multiple"),
        (["models.reward_function=m:f"], "models: set exactly one of models.reward"),
        (["checkpoint.keep=0"], "checkpoint: need every >= 0 and keep >= 1"),
        (["mesh.tensor=true"], "mesh.tensor expects int, got True"),
        (["models.value=[1]"], "models.value expects str or null, got [1]"),
        (["models.param_dtype=bfloat16"], "models: models.param_dtype=bfloat16 would store"),
        (["models.frozen_dtype=int8"], "models.frozen_dtype expects one of 'float32'"),
        (["seed"], "override 'seed' must look like key.sub=value"),
        # Valid YAML (a list holding a mapping) that does not fit the field's type ...
        (["tokenizer.extra_stop_tokens=[?]"], "tokenizer.extra_stop_tokens expects a list of str"),
        # ... and YAML that does not parse.
        (["tokenizer.extra_stop_tokens=[1, 2"], "the value is not valid YAML"),
    ],
)
def test_config_errors_name_the_key(argv, message, capsys):
    code, _, err = _run(["train", "ppo", "--config", str(TINY), *REQUIRED, *argv], capsys)
    assert code == 2 and message in err, err


def test_config_file_errors_name_the_key(tmp_path, capsys):
    """A YAML file's unknown keys and mistyped values name the file, the key and the type."""
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("ppo:\n  batch_size: abc\n", "bad.yaml: ppo.batch_size expects int, got 'abc'"),
        ("ppo:\n  bogus: 1\n", "bad.yaml: ppo.bogus: unknown key; PPOConfig has"),
        ("ppo: [1, 2\n", "cannot parse"),
        ("tokenizer:\n  extra_stop_tokens: [?]\n", "tokenizer.extra_stop_tokens expects a list"),
    ]:
        bad.write_text(text)
        code, _, err = _run(["train", "ppo", "--config", str(bad), *REQUIRED], capsys)
        assert code == 2 and message in err, (text, err)


def test_missing_values_and_files(capsys):
    code, _, err = _run(["train", "ppo", "ppo.batch_size=8"], capsys)
    assert code == 2
    assert "missing required value(s): data.path, models.policy, run_dir" in err
    code, _, err = _run(["train", "ppo", "run_dir=r", "models.policy=p", "data.path=d"], capsys)
    assert "ppo.batch_size" in err
    code, _, err = _run(["train", "ppo", "--config", "nope.yaml"], capsys)
    assert code == 2 and "config file 'nope.yaml' does not exist" in err


def test_print_config_round_trips(capsys):
    extra = ["ppo.stop_token_ids=[5,7]", "models.value=null", "tokenizer.extra_stop_tokens=['?']"]
    code, out, _ = _run(
        ["train", "ppo", "--config", str(TINY), *REQUIRED, *extra, "--print-config"], capsys
    )
    assert code == 0 and out.startswith("# resolved config (ppo)")
    printed = config.load_config(config.PPORunConfig, values=yaml.safe_load(out))
    direct = config.load_config(config.PPORunConfig, TINY, REQUIRED + extra)
    assert printed == direct and direct.ppo.stop_token_ids == (5, 7)
    assert direct.tokenizer.extra_stop_tokens == ("?",) and direct.ppo.total_iterations == 1000
    assert config.diff_configs(direct, dataclasses.replace(direct, seed=3)) == ["seed"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EchoConfig:
    run_dir: str
    steps: int = 1


def test_registry_dispatches_train_subcommands(capsys, monkeypatch):
    calls = []

    def run(cfg, *, resume):
        calls.append((cfg, resume))

    monkeypatch.setattr(config, "_ALGORITHMS", dict(config._ALGORITHMS))
    config.register_algorithm("echo", config=EchoConfig, run=run, help="test algorithm")
    with pytest.raises(ValueError, match="already registered"):
        config.register_algorithm("echo", config=EchoConfig, run=run)
    code, out, _ = _run(["train", "echo", "run_dir=x", "steps=3", "--resume"], capsys)
    assert code == 0 and calls == [(EchoConfig(run_dir="x", steps=3), True)]
    assert "steps: 3" in out
    lazy = config.Algorithm("lazy", "test_cli:EchoConfig", "test_cli:EchoConfig")
    assert lazy.config_class() is EchoConfig
    assert set(config.algorithms()) >= {"ppo", "echo"}
    with pytest.raises(SystemExit):
        cli.main(["train", "nonexistent"])
    # A broken plugin is reported and skipped; the other commands keep working.
    import importlib.metadata

    broken = importlib.metadata.EntryPoint("broken", "no_such_module:X", config.ENTRY_POINT_GROUP)
    monkeypatch.setattr(config, "_BROKEN", {})
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken])
    assert "broken" not in config.algorithms()
    assert "algorithm 'broken' (no_such_module:X) is unavailable" in capsys.readouterr().err


def test_demo_subcommand_calls_run_demo(monkeypatch):
    import rlhf_jax.demo

    calls = []
    monkeypatch.setattr(rlhf_jax.demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    assert cli.main(["demo", "--out", "somewhere", "--seed", "3"]) == 0
    assert calls == [{"out_dir": "somewhere", "seed": 3}]


def test_generate_matches_transformers_greedy(tmp_path, capsys):
    paths = save_tiny_models(tmp_path)
    prompts = ["tell me a story", "the cat"]  # as in test_checkpoint: the compilation is shared
    argv = ["generate", "--model", str(paths["policy"]), "--greedy", "--max-new-tokens", "5"]
    argv += [a for p in prompts for a in ("--prompt", p)]
    code, out, _ = _run([*argv, "--json"], capsys)
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["policy"]).eval()
    tok = tiny_tokenizer()
    for prompt, result in zip(prompts, results):
        ids = tok(prompt)["input_ids"]
        assert result["prompt"] == prompt and result["prompt_token_ids"] == ids
        with torch.no_grad():
            want = model.generate(
                torch.tensor([ids]),
                max_new_tokens=5,
                do_sample=False,
                eos_token_id=2,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        if 2 in want:
            want = want[: want.index(2) + 1]
        assert result["token_ids"] == want
        assert result["stopped"] == (2 in want)
        assert result["completion"] == tok.decode(want, skip_special_tokens=True)
    code, out, _ = _run(argv, capsys)
    assert code == 0 and out.startswith(f"### {prompts[0]}\n{results[0]['completion']}\n")
    assert f"### {prompts[1]}\n{results[1]['completion']}\n" in out
    code, _, err = _run(["generate", "--model", str(tmp_path / "none"), "--prompt", "a"], capsys)
    assert code == 2 and "does not exist" in err


def test_plot_command(tmp_path, capsys):
    rng = np.random.default_rng(0)
    keys = sorted({k for _, _, group in PLOT_GROUPS for k in group})
    with (tmp_path / "metrics.jsonl").open("w") as f:
        for it in range(1, 6):
            f.write(json.dumps({"iteration": it, **{k: float(rng.normal()) for k in keys}}) + "\n")
    code, out, _ = _run(["plot", str(tmp_path)], capsys)
    assert code == 0
    files = [Path(line) for line in out.splitlines()]
    assert {f.stem for f in files} == {g[0] for g in PLOT_GROUPS} | {"summary"}
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)
    code, _, err = _run(["plot", str(tmp_path / "empty")], capsys)
    assert code == 2 and "nothing to plot" in err


def test_run_logger_files_lines_and_resume_truncation(tmp_path, capsys, monkeypatch):
    from rlhf_jax.config import LoggingConfig
    from rlhf_jax.logging import RunLogger, read_jsonl

    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # "not installed"
    cfg = LoggingConfig(log_every=2, wandb=True, progress_bar=True)
    logger = RunLogger(tmp_path, cfg, total_iterations=4, run_config={"seed": 0})
    for it in (1, 2, 3):
        logger.log(
            it,
            {"objective/scores": it / 10, "objective/kl": 0.5},
            timings={"iteration_seconds": 0.25},
        )
        logger.samples(it, [{"prompt": "p" * 100 + " end", "completion": "c " * 50, "score": 1.5}])
    logger.close()
    err = capsys.readouterr().err
    assert "wandb is not installed" in err
    assert "it 2/4 | score 0.2 | kl 0.5 | 0.25s/it" in err and "it 1/4" not in err
    assert re.search(r"\n…p{35} end \| (c ){29}c… \| 1\.5", err) and "samples at iteration 3" in err
    assert [r["iteration"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert "perf/iteration_seconds" not in (tmp_path / "metrics.jsonl").read_text()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    resumed = RunLogger(tmp_path, LoggingConfig(), total_iterations=4, start_iteration=2)
    resumed.close()
    assert [r["iteration"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [r["iteration"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1, 2]
    quiet = RunLogger(tmp_path / "other", cfg, total_iterations=4, enabled=False)
    quiet.log(1, {"objective/scores": 1.0})
    quiet.close()
    assert not (tmp_path / "other").exists()


def test_iteration_clock_reports_compilation_apart(tmp_path, capsys, monkeypatch):
    import jax
    import jax.numpy as jnp

    from rlhf_jax import logging as run_logging
    from rlhf_jax.config import LoggingConfig

    logger = run_logging.RunLogger(tmp_path, LoggingConfig(progress_bar=False), total_iterations=3)
    step = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 3.0))  # a program this process has not made
    timings = []
    for it, n in ((1, 1000), (2, 1000), (3, 999)):  # iteration 3: a new shape, so a new program
        clock = run_logging.IterationClock()
        step(jnp.ones(n)).block_until_ready()
        timings.append(clock.timings(tokens=100.0))
        if it == 3:
            monkeypatch.setattr(run_logging, "RECOMPILE_REPORT_SECONDS", 0.0)
        logger.log(it, {"objective/scores": 0.0}, timings=timings[-1])
    logger.close()
    first, second, third = timings
    assert 0 < first["compile_seconds"] < first["iteration_seconds"]
    # throughput over the time not spent compiling
    want = 100.0 / (first["iteration_seconds"] - first["compile_seconds"])
    assert first["tokens_per_second"] == pytest.approx(want)
    assert "compile_seconds" not in second
    assert second["tokens_per_second"] == pytest.approx(100.0 / second["iteration_seconds"])
    assert third["compile_seconds"] > 0
    err = capsys.readouterr().err
    assert re.search(r"iteration 1: \d+\.\d s of its \d+\.\d s went to compiling", err)
    assert "iteration 2:" not in err
    assert "iteration 3: " in err and "compiling new programs" in err
