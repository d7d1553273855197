"""The benchmark scripts run end to end at toy sizes and write their JSON, so they cannot rot
unnoticed between the sessions that measure with them (slow set: each is a separate process that
compiles everything; no peer, no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--layers", "1", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--batch", "4"]


def run(script: str, args: list[str], tmp_path: Path) -> tuple[dict, str]:
    """Runs `benchmarks/<script> args --json out`; returns (its JSON results, its stdout)."""
    out = tmp_path / f"{script}.json"
    # The scripts configure their own devices; only LLVM's -O0 is passed (compile-bound here).
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["args"] and record["environment"]
    return record["results"], proc.stdout


def test_ppo_iteration_on_a_two_device_mesh(tmp_path):
    results, stdout = run(
        "ppo_iteration.py",
        [*TOY, "--vocab", "64", "--prompt-len", "4", "--response-len", "4"]
        + ["--epochs", "1", "--iters", "2", "--mesh", "2,1,1"],
        tmp_path,
    )
    phases = ("generation", "ref_forward", "value_forward", "reward_forward", "update", "iteration")
    assert all(results["seconds"][p] > 0 for p in phases), results["seconds"]
    assert results["flops"]["total"] > 0 and results["first_ratio_std"] < 1e-5
    assert "ppo_iteration (1 jit)" in stdout


def test_generate_without_transformers(tmp_path):
    results, stdout = run(
        "generate.py",
        [*TOY, "--kv-heads", "2", "--vocab", "64", "--prompt-len", "4", "--new-tokens", "4"]
        + ["--repeats", "1", "--no-torch"],
        tmp_path,
    )
    ours = results["rows"]["ours"]
    assert ours["decode_tok_s"] > 0 and ours["prefill_tok_s"] > 0
    assert results["linearity"]["ratio"] > 0
    assert "linearity: time(2N=8) / time(N=4)" in stdout


def test_critic_free_algorithms(tmp_path):
    results, _ = run(
        "critic_free.py",
        [*TOY, "--vocab", "64", "--prompt-len", "4", "--response-len", "4"]
        + ["--group-size", "2", "--epochs", "1", "--iters", "1", "--algos", "ppo,rloo,grpo"]
        + ["--repeat-prefill"],
        tmp_path,
    )
    assert {"ppo", "rloo", "grpo", "grpo/repeat-prefill"} <= set(results)


def test_memory_report(tmp_path):
    results, stdout = run(
        "memory.py",
        ["--layers", "1", "--hidden", "32", "--intermediate", "64", "--heads", "2"]
        + ["--kv-heads", "2", "--vocab", "64", "--real-layers", "1", "--real-hidden", "32"],
        tmp_path,
    )
    assert results["real"] and "total" in stdout


def test_lora_decode(tmp_path):
    results, stdout = run(
        "lora_decode.py",
        ["--layers", "1", "--hidden", "32", "--heads", "2", "--batch", "2", "--vocab", "64"]
        + ["--prompt-len", "4", "--new-tokens", "4", "--rank", "4", "--repeats", "1"],
        tmp_path,
    )
    assert all(results["median_seconds"][k] > 0 for k in ("base", "unmerged", "merged"))
    assert results["same_tokens"] > 0.5 and "unmerged / base" in stdout


def test_accelerator_script_runs_full_and_lora_on_cpu(tmp_path):
    """`accelerator.py` is for GPU/TPU hosts; at toy sizes it runs here too (no rates known for
    a CPU: no MFU or roofline, planned bytes still reported)."""
    base = json.loads((ROOT / "configs/models/llama-3.2-1b/config.json").read_text())
    base.update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=128, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    rm = {**base, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}
    for name, conf in (("policy", base), ("rm", rm)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(conf))
    toy = ["--policy", str(tmp_path / "policy"), "--reward", str(tmp_path / "rm"), "--batch", "4"]
    toy += ["--prompt-len", "8", "--response-len", "8", "--iters", "1", "--accumulation", "2"]
    for extra in ([], ["--lora-rank", "4"]):
        results, stdout = run("accelerator.py", toy + extra, tmp_path)
        assert all(v > 0 for v in results["median_seconds"].values()), results
        assert all(v > 0 for v in results["planned_bytes"].values()) and "planned" in stdout
