"""`rlhf-jax plan`: topology names, the chip table, the fits verdict, FLOP counts, and the
trainer's programs compiled for CPU devices (the GPU estimate); libtpu's TPU compile in the slow
set."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import rlhf_jax as rj
from rlhf_jax import config, models, plan, run_setup, trainer

ROOT = Path(__file__).resolve().parent.parent
GiB = plan.GiB


@pytest.mark.parametrize(
    "name, topology, chips",
    [
        ("v5e-16", "v5e:4x4", 16),
        ("v5e-4", "v5e:2x2", 4),
        ("v6e-64", "v6e:8x8", 64),
        ("v5p-64", "v5p:2x4x4", 32),  # v5p names TensorCores, two per chip
        ("v5p-256", "v5p:4x4x8", 128),
        ("v4-32", "v4:2x2x4", 16),
        ("v5p:4x4x4", "v5p:4x4x4", 64),
    ],
)
def test_topology_names(name, topology, chips):
    t = plan.parse_topology(name)
    assert (t.topology, t.chips) == (topology, chips)
    assert t.chip is plan.CHIPS[re.split("[-:]", name)[0]]


@pytest.mark.parametrize(
    "name, message",
    [
        ("v7-8", "unknown topology 'v7-8'"),
        ("v5e-3", "no standard v5e slice of that size"),
        ("v5p-63", "no standard v5p slice"),
        ("v5x:2x2", "unknown TPU generation 'v5x'"),
        ("v5e:2xa", "expected e.g. v5p:2x4x4"),
    ],
)
def test_bad_topology_names(name, message):
    with pytest.raises(ValueError, match=message):
        plan.parse_topology(name)


def test_chip_table():
    assert plan.CHIPS["v5e"].hbm == 16 * GiB and plan.CHIPS["v5p"].hbm == 95 * GiB
    assert plan.CHIPS["v6e"].peak_bf16 > plan.CHIPS["v5p"].peak_bf16 > plan.CHIPS["v5e"].peak_bf16
    with pytest.raises(ValueError, match="unknown GPU type 'b300'"):
        plan.gpu_topology(8, "b300")


def _memory(name, **kw):
    fields = dict(arguments=0, outputs=0, aliased=0, temporaries=0, code=0, resident=0)
    return plan.ProgramMemory(name=name, compile_seconds=1.0, **{**fields, **kw})


def test_peak_and_verdict():
    t = plan.parse_topology("v5e-4")
    rollout = _memory("rollout", arguments=4 * GiB, outputs=1 * GiB, temporaries=2 * GiB)
    # donated arguments that the outputs overwrite are not counted twice
    finish = _memory("finish", arguments=6 * GiB, outputs=6 * GiB, aliased=6 * GiB, resident=GiB)
    p = plan.Plan(t, {"data": 1, "fsdp": 4, "tensor": 1}, [rollout, finish], {"update": 1e15})
    assert (rollout.peak, finish.peak, p.peak) == (7 * GiB, 7 * GiB, 7 * GiB)
    assert p.fits and "fits: peak 7.00 of 16 GiB" in plan.format_plan(p)
    # 1e15 FLOPs on 4 chips of 197 TFLOP/s at 40%
    assert abs(p.seconds_at(0.4) - 1e15 / (4 * 197e12 * 0.4)) < 1e-9
    big = dataclass_replace(finish, temporaries=20 * GiB)
    p = plan.Plan(t, {"data": 1, "fsdp": 4, "tensor": 1}, [rollout, big], {"update": 1e15})
    text = plan.format_plan(p)
    assert not p.fits and "does not fit (need 27.00 GiB, have 16)" in text
    assert "finish's temporaries dominate" in text
    # v4's topology has one device per TensorCore: half a chip's HBM each
    v4 = plan.parse_topology("v4-8")
    assert plan.Plan(v4, {}, [rollout], {}, devices_per_chip=2).device_hbm == 16 * GiB


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_flops_against_a_hand_count():
    c = models.ModelConfig(
        family="llama",
        vocab_size=100,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        intermediate_size=16,
        max_position_embeddings=64,
    )
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 3 x 8x16 = 64+32+32+64+384 = 576
    # head 8x100 = 800; 2 FLOPs per weight; attention 4 * layers * (heads * head_dim) * context
    want = 2 * (2 * 576 + 800) + 4 * 2 * 8 * 10
    assert plan.forward_flops_per_token(c, 10) == want
    rm = models.ModelConfig(**{**c.__dict__, "head": "score", "num_labels": 1})
    pm = rj.RLModels(policy=c, value=rm, reward=rm)
    pc = rj.PPOConfig(batch_size=4, response_length=6, num_ppo_epochs=2)
    flops = plan.iteration_flops(pc, pm, prompt_len=10)
    policy = plan.forward_flops_per_token(c, 8)  # mean context of 16 tokens
    value = plan.forward_flops_per_token(rm, 8)
    assert flops["reference"] == 4 * 16 * policy
    assert flops["update"] == 3 * 2 * 4 * 16 * (policy + value)
    assert flops["generate"] == 4 * 10 * plan.forward_flops_per_token(
        c, 5
    ) + 4 * 6 * plan.forward_flops_per_token(c, 13)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """config.json files only (a plan reads no weights)."""
    root = tmp_path_factory.mktemp("shapes")
    base = json.loads((ROOT / "configs/models/llama-3.2-1b/config.json").read_text())
    base.update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=128,
    )  # fmt: skip
    rm = {**base, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}
    for name, conf in (("policy", base), ("rm", rm)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(conf))
    return root


def _run_config(tiny_models, *extra):
    text = (
        f"run_dir: {tiny_models / 'run'}\nmodels:\n  policy: {tiny_models / 'policy'}\n"
        f"  reward: {tiny_models / 'rm'}\n  dtype: bfloat16\n  frozen_dtype: bfloat16\n"
        "data:\n  path: unused.jsonl\n  max_prompt_length: 8\n"
        "ppo:\n  batch_size: 8\n  response_length: 8\n  gradient_accumulation_steps: 2\n"
    )
    path = tiny_models / "plan.yaml"
    path.write_text(text)
    return config.load_config(config.PPORunConfig, path, list(extra)), path


def test_plan_compiles_the_trainers_programs_on_cpu_devices(tiny_models):
    """The GPU estimate path: the trainer's programs compiled for 4 CPU devices with fsdp=4;
    every figure positive, the donated state aliased in `finish`, and the frozen models in
    bfloat16 take half the bytes of float32 ones."""
    run, _ = _run_config(tiny_models, "mesh.data=1", "mesh.fsdp=4")
    topology = plan.gpu_topology(4, "h100")
    result = plan.plan_run(run, jax.devices()[:4], topology, one_jit=False, log=lambda _: None)
    names = [p.name for p in result.programs]
    assert names == ["rollout", "score", "finish"]
    for p in result.programs:
        assert p.arguments > 0 and p.outputs > 0 and p.peak > 0, p
    finish = result.programs[2]
    assert finish.aliased > 0  # the donated state
    assert result.fits and result.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
    assert "an estimate of the GPU's" in plan.format_plan(result)
    pm, _ = trainer.resolve_models(run)
    pc = run.algorithm()
    f32 = plan.per_chip_bytes(
        plan._with_shardings(
            plan._abstract_params(pm.reward),
            rj.rl_shardings(
                pc, pm, plan.sharding.make_mesh(run.mesh, jax.devices()[:4])
            ).frozen.reward,
        )
    )
    assert result.programs[1].arguments < f32  # the bfloat16 reward model is the score's input


def test_bad_input_is_an_error_before_any_compile(tiny_models, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before checking the input")

    monkeypatch.setattr(plan, "_compile", no_compile)
    run, _ = _run_config(tiny_models, "mesh.data=1", "mesh.fsdp=3")
    topology = plan.gpu_topology(4, "h100")
    with pytest.raises(run_setup.SetupError, match="mesh"):
        plan.plan_run(run, jax.devices()[:4], topology)
    run, _ = _run_config(tiny_models, "mesh.data=1", "mesh.fsdp=4", "ppo.batch_size=6")
    with pytest.raises((run_setup.SetupError, ValueError), match="batch_size=6"):
        plan.plan_run(run, jax.devices()[:4], topology)


def test_cli_errors(tiny_models, capsys):
    from rlhf_jax import cli

    _, path = _run_config(tiny_models)
    assert cli.main(["plan", "--config", str(path), "--topology", "v9-8"]) == 2
    assert "unknown topology 'v9-8'" in capsys.readouterr().err
    assert cli.main(["plan", "--config", str(path)]) == 2
    assert "exactly one of --topology" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu is not installed (pip install "jax[tpu]==<jax version>" or .[tpu-plan])',
)
def test_tpu_compile_of_a_tiny_run(tiny_models):
    """The real TPU compiler (libtpu on this CPU machine) compiles a tiny PPO run for v5e:2x2."""
    _, path = _run_config(tiny_models)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    result = tiny_models / "tpu_plan.json"
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "plan", "--config", str(path)]
        + ["--topology", "v5e-4", "--json", str(result), "mesh.data=1", "mesh.fsdp=4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "v5e:2x2" in out.stdout and "fits: peak" in out.stdout
    figures = json.loads(result.read_text())
    assert figures["fits"] and figures["device_hbm"] == 16 * GiB
    assert [p["name"] for p in figures["programs"]][:3] == ["rollout", "score", "finish"]
    for p in figures["programs"]:
        assert p["arguments"] > 0 and p["outputs"] > 0 and p["peak"] > 0, p


def test_lora_plan_saves_more_than_two_base_models(tiny_models):
    """A LoRA PPO iteration (adapters on the policy and on a value model that shares the reward
    model's base; the reference is the policy's base) needs less memory than the full-parameter
    iteration by more than two float32 base models: no reference copy, no second reward base,
    no gradients or AdamW moments for the bases."""
    topology = plan.gpu_topology(4, "h100")
    peaks = {}
    for name, extra in (("full", ()), ("lora", ("models.lora.rank=4",))):
        run, _ = _run_config(tiny_models, "mesh.data=1", "mesh.fsdp=4", *extra)
        result = plan.plan_run(run, jax.devices()[:4], topology, log=lambda _: None)
        peaks[name] = {p.name: p.peak for p in result.programs}
        assert result.lora == (name == "lora")
    pm, _ = trainer.resolve_models(run)
    assert pm.value_shares_reward_base and pm.policy.lora.rank == 4
    base = plan.per_chip_bytes(
        plan._with_shardings(
            plan._abstract_params(dataclasses.replace(pm.policy, lora=None)),
            models.param_shardings(
                dataclasses.replace(pm.policy, lora=None),
                plan.sharding.make_mesh(run.mesh, jax.devices()[:4]),
            ),
        )
    )
    for program in ("finish", "iteration (one jit)"):
        assert peaks["full"][program] - peaks["lora"][program] > 2 * base, (program, peaks, base)


def test_critic_free_plan_compiles_the_grpo_trainers_programs(tiny_models, capsys):
    """`rlhf-jax plan --algorithm grpo`: the trainer's rollout and update (a reward function);
    with a reward model also its score phase and the one-jit iteration; compiled for 4 CPU
    devices."""
    text = (
        f"run_dir: {tiny_models / 'run'}\nmodels:\n  policy: {tiny_models / 'policy'}\n"
        "  reward_function: rlhf_jax.reward_functions:length_reward\n  dtype: bfloat16\n"
        "data:\n  path: unused.jsonl\n  max_prompt_length: 8\n"
        "grpo:\n  num_prompts: 2\n  num_generations: 4\n  response_length: 8\n  beta: 0.04\n"
        "mesh:\n  data: 1\n  fsdp: 4\n"
    )
    path = tiny_models / "grpo.yaml"
    path.write_text(text)
    run = config.load_config(config.algorithms()["grpo"].config_class(), path)
    topology = plan.gpu_topology(4, "h100")
    result = plan.plan_run(run, jax.devices()[:4], topology, log=lambda _: None)
    assert [p.name for p in result.programs] == ["rollout", "finish"]
    assert all(p.arguments > 0 and p.peak > 0 for p in result.programs)
    assert result.programs[1].aliased > 0 and result.fits  # the donated state
    flops = result.flops
    assert flops["reference"] > 0 and flops["update"] == 3.0 * flops["reference"]
    lora = plan.plan_run(
        config.load_config(type(run), path, ["models.lora.rank=4"]),
        jax.devices()[:4],
        topology,
        log=lambda _: None,
    )
    # LoRA: the base is the reference (still one forward); no weight gradients for the base
    assert lora.lora and lora.flops["update"] == 2.0 * lora.flops["reference"]
    assert lora.programs[1].peak < result.programs[1].peak
    with_rm = config.load_config(
        type(run),
        path,
        ["models.reward_function=null", f"models.reward={tiny_models / 'rm'}"],
    )
    one = plan.plan_run(with_rm, jax.devices()[:4], topology, log=lambda _: None)
    # Every algorithm now compiles the phased programs too (a score phase with a reward model).
    assert [p.name for p in one.programs] == ["rollout", "score", "finish", "iteration (one jit)"]
    assert one.flops["reward"] > 0


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "plan").glob("*.yaml")), ids=str)
def test_shipped_plan_configs_resolve(path, monkeypatch):
    """Every config of the README's pod table loads with its algorithm and resolves its model
    shapes from `configs/models/` (nothing compiled here)."""
    monkeypatch.chdir(ROOT)  # the configs name the model directories relative to the checkout
    algorithm = "grpo" if path.name.startswith("grpo") else "ppo"
    run = config.load_config(config.algorithms()[algorithm].config_class(), path)
    if algorithm == "ppo":
        pm, _ = trainer.resolve_models(run)
        pc, prompt_len = run.algorithm(), run.data.max_prompt_length
        assert (
            pm.policy.num_layers >= 16
            and sum(plan.iteration_flops(pc, pm, prompt_len).values()) > 0
        )
    else:
        assert run.algorithm().batch_size == 512
