"""A 1B-class PPO iteration on the accelerators of this host, against the hardware's roofline.

    python3 benchmarks/accelerator.py                       # Llama-3.2-1B shapes, random weights
    python3 benchmarks/accelerator.py --batch 64 --prompt-len 512 --response-len 512
    python3 benchmarks/accelerator.py --lora-rank 16        # the LoRA variant

Runs the trainer's own programs (`core.iteration_programs`: rollout, score, finish) on every
local device (mesh data=1 x fsdp=N), bf16 compute and bf16 frozen models, random weights from the
shapes in `configs/models/` (nothing is downloaded), after one compiling iteration:

- per-phase medians (seconds) of `generate` alone, the rollout program (generate + reference and
  value forwards), the reward score and the update (`finish`);
- MFU: the iteration's model FLOPs (`rlhf_jax.plan.iteration_flops`) over its time, against
  the devices' peak dense bf16 FLOP/s;
- decode tokens/s against the HBM-bandwidth roofline (every decode step reads the policy's
  weights and the KV cache once);
- peak device memory (`memory_stats()["peak_bytes_in_use"]`) next to the compiler's plan for the
  same programs (`memory_analysis()`, what `rlhf-jax plan` reports).

Meant for a GPU or TPU host (under 5 minutes on one H100/H200 with the defaults); on a CPU it
runs too (the tests run it at toy sizes) but its peaks and roofline are unknown there.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from rlhf_jax import config as cfg  # noqa: E402
from rlhf_jax import core, models, plan, run_setup, sampling, sharding  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3

# device_kind prefix -> (peak dense bf16 FLOP/s, HBM bytes/s), from the vendors' data sheets
# (NVIDIA A100/H100/H200 SXM; Google Cloud TPU system-architecture pages).
DEVICES = {
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA H100": (989e12, 3.35e12),
    "NVIDIA A100": (312e12, 2.0e12),
    "TPU v6": (918e12, 1.64e12),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v5 lite": (197e12, 0.819e12),
    "TPU v5e": (197e12, 0.819e12),
    "TPU v4": (275e12, 1.2e12),
}


def device_rates(kind: str) -> tuple[float, float] | None:
    for prefix, rates in DEVICES.items():
        if kind.startswith(prefix):
            return rates
    return None


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policy", default=str(ROOT / "configs/models/llama-3.2-1b"))
    p.add_argument("--reward", default=str(ROOT / "configs/models/llama-3.2-1b-rm"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--accumulation", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full parameters)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations after the first")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    args = p.parse_args(argv)

    devices = jax.devices()
    kind = devices[0].device_kind
    overrides = [
        "run_dir=unused",
        f"models.policy={args.policy}",
        f"models.reward={args.reward}",
        f"models.dtype={args.dtype}",
        f"models.frozen_dtype={args.dtype}",
        "data.path=unused.jsonl",
        f"data.max_prompt_length={args.prompt_len}",
        f"ppo.batch_size={args.batch}",
        f"ppo.response_length={args.response_len}",
        f"ppo.num_ppo_epochs={args.epochs}",
        f"ppo.gradient_accumulation_steps={args.accumulation}",
        "ppo.stop_token_ids=[]",  # every row decodes the whole response: a fixed workload
        "ppo.missing_eos_penalty=null",
        "mesh.data=1",
        f"mesh.fsdp={len(devices)}",
    ]
    if args.lora_rank:
        overrides += [f"models.lora.rank={args.lora_rank}", f"models.lora.alpha={args.lora_rank}"]
    run = cfg.load_config(cfg.PPORunConfig, values=None, overrides=overrides)
    pm, _ = run_setup.resolve_models(run)
    pc, prompt_len = run.algorithm(), run.data.max_prompt_length
    run_setup.check_mesh(run, devices)
    mesh = sharding.make_mesh(run.mesh, devices)
    programs = core.iteration_programs(pc, pm, mesh)
    frozen = jnp.dtype(args.dtype)

    with sharding.with_rules(mesh):
        keys = jax.random.split(jax.random.key(0), 4)
        policy = models.sharded_init_params(pm.policy, keys[0], mesh)
        reward = models.sharded_init_params(pm.reward, keys[1], mesh)
        if pm.policy.lora is not None:  # bases in the frozen dtype; adapters and heads float32
            cast = lambda tree, lora_config: jax.tree.map(  # noqa: E731
                lambda x: x.astype(frozen), models.lora.split(tree, lora_config)[1]
            )
            trained = models.lora.split(policy, pm.policy.lora)[0]
            policy = models.lora.join(trained, cast(policy, pm.policy.lora))
            value = run_setup.with_adapters(
                jax.tree.map(lambda x: x.astype(frozen), reward), pm.value, mesh, keys[2]
            )
        else:
            value = reward
        state = programs.init(policy, value)
        ref = None if pm.policy.lora is not None else run_setup.frozen_params(policy, args.dtype)
        reward = run_setup.frozen_params(reward, args.dtype)
        if pm.value_shares_reward_base:
            reward = {"score": reward["score"]}
        del policy, value
        rng = np.random.default_rng(0)
        vocab = pm.policy.vocab_size
        prompts = rng.integers(3, vocab, (pc.batch_size, prompt_len)).astype(np.int32)
        prompts, mask = sharding.place_replicated((prompts, np.ones_like(prompts, bool)), mesh)
        frozen_params = core.FrozenParams(ref=ref, reward=reward)
        generate = sampling.jit_generate(pm.policy, pc.sampling_config(), mesh)
        width = pc.response_length

        times: dict[str, list[float]] = {
            k: [] for k in ("generate", "rollout", "score", "finish", "iteration")
        }
        compile_seconds = 0.0
        for i in range(args.iters + 1):
            key = jax.random.key(i)
            start = time.perf_counter()
            _, t_gen = _timed(generate, state.policy_params, prompts, mask, key)
            roll, t_roll = _timed(programs.rollout, state, frozen_params, prompts, mask, key)
            scores, t_score = _timed(programs.score, state, frozen_params, roll, width=width)
            (state, _), t_finish = _timed(programs.finish, state, roll, scores, key, width=width)
            total = time.perf_counter() - start - t_gen
            if i == 0:
                compile_seconds = total + t_gen
                continue
            for name, t in zip(times, (t_gen, t_roll, t_score, t_finish, total), strict=True):
                times[name].append(t)
        med = {k: common.median(v) for k, v in times.items()}
        planned = {}
        for name, fn, fargs, fkw in (
            ("rollout", programs.rollout, (state, frozen_params, prompts, mask, key), {}),
            ("score", programs.score, (state, frozen_params, roll), {"width": width}),
            ("finish", programs.finish, (state, roll, scores, key), {"width": width}),
        ):
            m = fn.lower(*fargs, **fkw).compile().memory_analysis()
            planned[name] = (
                m.argument_size_in_bytes
                + m.output_size_in_bytes
                - m.alias_size_in_bytes
                + m.temp_size_in_bytes
            )
    stats = devices[0].memory_stats() or {}
    peak_measured = stats.get("peak_bytes_in_use")

    flops = plan.iteration_flops(pc, pm, prompt_len)
    total_flops = sum(flops.values())
    rates = device_rates(kind)
    n_params = sum(
        x.size for x in jax.tree.leaves(models.lora.base(jax.eval_shape(
            models.init_params, dataclasses.replace(pm.policy, lora=None), jax.random.key(0)
        )))
    )  # fmt: skip
    kv_bytes = (
        2 * pm.policy.num_layers * pm.policy.num_kv_heads * pm.policy.head_dim
        * (prompt_len + width / 2) * pc.batch_size * jnp.dtype(args.dtype).itemsize
    )  # fmt: skip
    step_bytes = (n_params * jnp.dtype(args.dtype).itemsize + kv_bytes) / len(devices)
    decode_tps = pc.batch_size * width / med["generate"]
    print(
        f"{len(devices)} x {kind}; {pm.policy.num_layers}-layer policy ({n_params / 1e9:.2f}B), "
        f"batch {pc.batch_size}, prompt {prompt_len}, response {width}, {args.dtype}, "
        + (f"LoRA rank {args.lora_rank}" if args.lora_rank else "full parameters")
        + f"; first iteration (compiling) {compile_seconds:.1f} s"
    )
    for name, seconds in med.items():
        print(f"  {name:10s} {seconds:8.3f} s  (runs: {[round(t, 3) for t in times[name]]})")
    result = {
        "device_kind": kind,
        "devices": len(devices),
        "median_seconds": med,
        "compile_seconds": compile_seconds,
        "model_flops": flops,
        "decode_tokens_per_second": decode_tps,
        "planned_bytes": planned,
        "peak_bytes_in_use": peak_measured,
    }
    if rates is not None:
        peak_flops, bandwidth = rates
        mfu = total_flops / med["iteration"] / (peak_flops * len(devices))
        roofline = pc.batch_size * bandwidth / step_bytes
        result |= {"mfu": mfu, "decode_roofline_tokens_per_second": roofline}
        print(
            f"  MFU {mfu:.1%} of {len(devices)} x {peak_flops / 1e12:.0f} TFLOP/s bf16 "
            f"({total_flops:.3g} model FLOPs per iteration); decode {decode_tps:,.0f} tokens/s = "
            f"{decode_tps / roofline:.1%} of the HBM roofline ({roofline:,.0f} tokens/s at "
            f"{bandwidth / 1e12:.2f} TB/s, {step_bytes / GiB:.2f} GiB read per step per device)"
        )
    else:
        print(f"  no peak rates known for {kind!r}: MFU and roofline not computed")
    measured = f"{peak_measured / GiB:.2f} GiB" if peak_measured else "not reported"
    print(
        "  memory per device: planned (compiler) "
        + ", ".join(f"{k} {v / GiB:.2f}" for k, v in planned.items())
        + f" GiB; measured peak_bytes_in_use {measured}"
    )
    if args.json:
        common.write_json(args.json, "accelerator", vars(args), result)
    return result


if __name__ == "__main__":
    main()
