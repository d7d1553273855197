"""RLOO and GRPO against PPO on the same config: seconds per iteration, compile time, and memory
(XLA's compiled memory analysis of the one-jit iteration, and optionally the peak RSS of one
process per algorithm).

    python3 benchmarks/critic_free.py --config B --iters 5
    python3 benchmarks/critic_free.py --config B --separate-processes   # per-algorithm peak RSS
    # GRPO, k = 8, prompt 4x the response: one prefill per prompt against k (the old path)
    python3 benchmarks/critic_free.py --config A --batch 32 --group-size 8 --prompt-len 128 \
        --response-len 32 --algos grpo-beta0,grpo --repeat-prefill --iters 5

All algorithms sample the same number of completions per iteration (`--batch`): PPO one per prompt,
RLOO and GRPO `--group-size` per prompt for `batch / group-size` prompts. All run `--epochs`
passes over the batch in one minibatch, temperature 0.7, eos as the stop token, and score with the
same random reward model (PPO also trains a value model initialised from it). GRPO runs with
`beta=0.04` (reference forward + k3 KL loss) and as "grpo-beta0" with `beta=0` (no reference
forward). Iterations are timed interleaved (ppo, rloo, grpo, ..., ppo, ...) so machine load hits
them alike; figures are medians.

The critic-free rollout prefills each distinct prompt once and repeats its KV cache to the prompt's
`--group-size` completions (`RLConfig.shared_prefill`). `--repeat-prefill` adds, for each
critic-free algorithm, a variant "<algo>/repeat-prefill" that prefills the `batch` repeated prompts
instead (the path before; the same samples), timed in the same interleaved rounds, and prints the
ratio. `--rollout-only` times the rollouts alone (sampling and the forwards each algorithm runs on
the samples), where the prefill's share is not diluted by the update.

The memory figures are what XLA plans for the compiled iteration: arguments (parameters, optimiser
state, frozen models, prompts) plus temporaries, minus what the donated state aliases. The RLOO
blog reports 50-70% less memory and 2-3x speed at 1B-7B on GPUs with separate models on separate
devices; a tiny model on a CPU measures something else, so read these as what they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from rlhf_jax import core, models  # noqa: E402
from rlhf_jax.algorithms import GRPOConfig, PPOConfig, RLOOConfig  # noqa: E402

# name: (layers, hidden, intermediate, heads, vocab, batch, prompt, response), as ppo_iteration.py
CONFIGS = {
    "A": (4, 256, 1024, 4, 8192, 16, 32, 32),
    "B": (2, 128, 512, 4, 1024, 8, 16, 64),
    "C": (8, 512, 2048, 4, 32000, 32, 64, 64),
}
ALGOS = ("ppo", "rloo", "grpo", "grpo-beta0")
MIB = 2.0**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="B", choices=sorted(CONFIGS))
    for name in ("layers", "hidden", "intermediate", "heads", "vocab", "batch"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--response-len", type=int)
    p.add_argument("--group-size", type=int, default=2, help="completions per prompt (RLOO/GRPO)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per algorithm")
    p.add_argument("--algos", default=",".join(ALGOS), help=f"comma-separated from {ALGOS}")
    p.add_argument(
        "--repeat-prefill",
        action="store_true",
        help="also time each critic-free algorithm with the old repeated prefill (one prefill "
        "per completion, shared_prefill=False) as '<algo>/repeat-prefill'",
    )
    p.add_argument(
        "--rollout-only", action="store_true", help="time the rollouts alone (no update)"
    )
    p.add_argument(
        "--separate-processes",
        action="store_true",
        help="run each algorithm in its own process to compare peak RSS",
    )
    p.add_argument("--json", default=None, help="write results to this JSON file")
    args = p.parse_args(argv)
    names = ("layers", "hidden", "intermediate", "heads", "vocab", "batch")
    names += ("prompt_len", "response_len")
    for name, value in zip(names, CONFIGS[args.config], strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.algos = tuple(a for a in args.algos.split(",") if a)
    unknown = set(args.algos) - set(ALGOS)
    if unknown:
        p.error(f"unknown --algos {sorted(unknown)}; choose from {ALGOS}")
    if args.batch % args.group_size:
        p.error(f"--batch {args.batch} must be a multiple of --group-size {args.group_size}")
    return args


def model_configs(args: argparse.Namespace) -> tuple[models.ModelConfig, models.ModelConfig]:
    policy = common.tiny_llama(args)
    return policy, dataclasses.replace(policy, head="score", num_labels=1)


def left_padded(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, length))
    real = rng.integers(length // 2, length + 1, size=batch)
    mask = np.arange(length)[None, :] >= (length - real)[:, None]
    return np.where(mask, tokens, vocab).astype(np.int32), mask


def setups(args: argparse.Namespace) -> dict[str, tuple[Any, Any, Any, Any, Any, Any]]:
    """name -> (jitted iteration, state, frozen, prompts, mask, description)."""
    policy_cfg, reward_cfg = model_configs(args)
    policy = models.init_params(policy_cfg, jax.random.key(0))
    reward = models.init_params(reward_cfg, jax.random.key(1))
    common_kwargs = dict(
        response_length=args.response_len,
        temperature=0.7,
        stop_token_ids=(args.vocab + 1,),
        pad_token_id=args.vocab,
        missing_eos_penalty=1.0,
        learning_rate=3e-6,
        total_iterations=1000,
    )
    k, n_prompts = args.group_size, args.batch // args.group_size
    out = {}
    for algo in args.algos:
        if algo == "ppo":
            config = PPOConfig(
                batch_size=args.batch, kl_coef=0.05, num_ppo_epochs=args.epochs, **common_kwargs
            )
            rm = core.RLModels(policy=policy_cfg, value=reward_cfg, reward=reward_cfg)
            desc = f"PPO, {args.batch} prompts x 1, value model"
        elif algo == "rloo":
            config = RLOOConfig(
                num_prompts=n_prompts,
                rloo_k=k,
                num_ppo_epochs=args.epochs,
                kl_coef=0.05,
                **common_kwargs,
            )
        else:
            config = GRPOConfig(
                num_prompts=n_prompts,
                num_generations=k,
                num_iterations=args.epochs,
                beta=0.0 if algo == "grpo-beta0" else 0.04,
                **common_kwargs,
            )
        if algo != "ppo":
            rm = core.RLModels(policy=policy_cfg, reward=reward_cfg)
            desc = f"{algo}, {n_prompts} prompts x {k}, no value model"
            if not config.needs_ref:
                desc += ", no reference"
        frozen = core.FrozenParams(ref=policy if config.needs_ref else None, reward=reward)
        prompts, mask = left_padded(config.num_prompts, args.prompt_len, args.vocab, 0)
        variants = {algo: config}
        if args.repeat_prefill and algo != "ppo":
            variants[f"{algo}/repeat-prefill"] = dataclasses.replace(config, shared_prefill=False)
        for name, variant in variants.items():
            fn = iteration_fn(variant, rm, args.rollout_only)
            value = reward if variant.has_critic else None
            state = core.init_state(policy, variant, rm, value_params=value)
            if algo != "ppo":
                prefill = "one prefill per prompt" if variant.shared_prefill else "k prefills"
                desc_v = f"{desc}, {prefill}"
            else:
                desc_v = desc
            out[name] = (fn, state, frozen, prompts, mask, desc_v)
    return out


def rollout_only(rollout: Any) -> Any:
    """`(state, frozen, prompts, mask, key) -> (state, rollout)`: shaped like an iteration."""
    return lambda state, frozen, prompts, mask, key: (
        state,
        rollout(state, frozen, prompts, mask, key),
    )


def iteration_fn(config: Any, rm: core.RLModels, rollout: bool) -> Any:
    """The jitted iteration, or with `rollout` the jitted rollout alone."""
    if not rollout:
        return core.jit_iteration(config, rm)
    return jax.jit(rollout_only(functools.partial(core.rollout, config=config, rl_models=rm)))


def memory(compiled: Any) -> dict[str, float]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    args_b = m.argument_size_in_bytes
    temp_b = m.temp_size_in_bytes
    out_b = m.output_size_in_bytes
    alias_b = m.alias_size_in_bytes
    return {
        "arguments_mib": args_b / MIB,
        "temporaries_mib": temp_b / MIB,
        "outputs_mib": out_b / MIB,
        "aliased_mib": alias_b / MIB,
        "peak_estimate_mib": (args_b + out_b - alias_b + temp_b) / MIB,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    load = common.environment()["load_avg"]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; load average {load}")
    results: dict[str, Any] = {}
    runners = {}
    for algo, (fn, state, frozen, prompts, mask, desc) in setups(args).items():
        key = jax.random.key(0)
        t0 = time.perf_counter()
        compiled = fn.lower(state, frozen, prompts, mask, key).compile()
        compile_s = time.perf_counter() - t0
        results[algo] = {"description": desc, "compile_s": compile_s, **memory(compiled)}
        box = {"state": state, "i": 0}

        def step(box=box, compiled=compiled, frozen=frozen, prompts=prompts, mask=mask):
            box["i"] += 1
            box["state"], metrics = compiled(
                box["state"], frozen, prompts, mask, jax.random.key(box["i"])
            )
            return metrics

        runners[algo] = step
        print(f"compiled {algo} in {compile_s:.1f}s", flush=True)
    times = common.time_interleaved(runners, repeats=args.iters, warmup=1)
    for algo, ts in times.items():
        results[algo]["s_per_iter"] = common.median(ts)
        results[algo]["s_per_iter_all"] = ts
    results["peak_rss_mib"] = common.peak_rss_mb()
    return results


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    algos = [a for a in results if a != "peak_rss_mib"]
    base = results.get("ppo")
    what = "rollouts" if args.rollout_only else "iterations"
    print(
        f"\nconfig {args.config}: {args.layers} layers, hidden {args.hidden}, vocab "
        f"{args.vocab + 2}, {args.batch} completions x {args.response_len} tokens, prompt "
        f"{args.prompt_len}, {args.epochs} epochs; medians of {args.iters} interleaved {what}"
    )
    width = max(11, *(len(a) for a in algos))
    header = f"{'algo':{width}s} {'s/iter':>8s} {'vs PPO':>7s} {'compile':>8s} {'args MiB':>9s} "
    header += f"{'temp MiB':>9s} {'peak MiB':>9s} {'vs PPO':>7s}"
    if any("process_peak_rss_mib" in results[a] for a in algos):
        header += f" {'RSS MiB':>8s} {'vs PPO':>7s}"
    print(header)
    for algo in algos:
        r = results[algo]
        mem = r.get("peak_estimate_mib", float("nan"))

        def ratio(value: float | None) -> str:  # "-" without PPO in the run
            return f"{value:6.2f}x" if value is not None else f"{'-':>7s}"

        speed = base["s_per_iter"] / r["s_per_iter"] if base else None
        has_mem = base is not None and "peak_estimate_mib" in base
        mem_ratio = mem / base["peak_estimate_mib"] if has_mem else None
        line = (
            f"{algo:{width}s} {r['s_per_iter']:8.3f} {ratio(speed)} {r['compile_s']:7.1f}s "
            f"{r.get('arguments_mib', 0):9.1f} {r.get('temporaries_mib', 0):9.1f} {mem:9.1f} "
            f"{ratio(mem_ratio)}"
        )
        if "process_peak_rss_mib" in r:
            rss = r["process_peak_rss_mib"] / base["process_peak_rss_mib"] if base else None
            line += f" {r['process_peak_rss_mib']:8.0f} {ratio(rss)}"
        print(line + f"   {r['description']}")
    print("'vs PPO': speed = PPO time / this time; memory = this / PPO (lower is less memory)")
    for algo in algos:
        old = results.get(f"{algo}/repeat-prefill")
        if old is not None:
            new, speed = results[algo], old["s_per_iter"] / results[algo]["s_per_iter"]
            print(
                f"{algo}: shared prefill {new['s_per_iter']:.3f} s, repeated prefill "
                f"{old['s_per_iter']:.3f} s: speedup {speed:.2f}x; peak memory "
                f"{new.get('peak_estimate_mib', 0):.1f} against "
                f"{old.get('peak_estimate_mib', 0):.1f} MiB"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.separate_processes:
        results: dict[str, Any] = {}
        for algo in args.algos:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                sub = [a for a in (argv if argv is not None else sys.argv[1:])]
                sub = [a for a in sub if a != "--separate-processes"]
                cmd = [sys.executable, __file__, *sub, "--algos", algo, "--json", tmp.name]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                record = json.loads(Path(tmp.name).read_text())["results"]
            for name in (algo, f"{algo}/repeat-prefill"):
                if name in record:
                    results[name] = record[name]
                    results[name]["process_peak_rss_mib"] = record["peak_rss_mib"]
            print(f"{algo}: peak RSS {record['peak_rss_mib']:.0f} MiB", flush=True)
    else:
        results = run(args)
        print(f"peak RSS of this process (all algorithms): {results['peak_rss_mib']:.0f} MiB")
    print_table(results, args)
    if args.json:
        common.write_json(args.json, "critic_free", vars(args), results)
    return results


if __name__ == "__main__":
    main()
