"""One PPO iteration (TRL PPOTrainer semantics) on random weights and random prompts: per-phase
times, tokens/s, model FLOPs and achieved FLOP/s against the machine's `jnp.dot` rate, compile
time, peak memory, and optionally TRL 0.17's PPOTrainer on the same config, alternated with ours
in the same session.

    python3 benchmarks/ppo_iteration.py --config A --iters 5
    python3 benchmarks/ppo_iteration.py --config A --peer-python /tmp/trl017/bin/python --rounds 3
    python3 benchmarks/ppo_iteration.py --layers 2 --hidden 128 --intermediate 512 --heads 4 \\
        --vocab 1024 --batch 8 --prompt-len 16 --response-len 64 --mesh 1,1,1 --json out.json

`--vocab N` means what it means in the peer script (/work/shared/peer-bench/trl_ppo_bench.py): N
ordinary tokens plus pad (id N) and eos (id N + 1), so the models' vocabulary is N + 2. The four
models are separate random Llamas (policy, and reference = a copy of it; reward, and value = a copy
of it), 4 PPO epochs, 1 minibatch, temperature 0.7, eos as the stop token and a missing-eos penalty
of 1.0, like the peer script.

Phases are jitted separately (generation, reference / value / reward forwards, advantages,
update) and timed next to the one-jit `ppo_iteration` total; every figure is a median over
`--iters` iterations after the compile call.
"""

from __future__ import annotations

import os
import sys

# Virtual CPU devices for `--mesh` must be configured before JAX starts.
if __name__ == "__main__":
    for _i, _a in enumerate(sys.argv):
        if _a.startswith("--mesh"):
            _spec = _a.split("=", 1)[1] if "=" in _a else sys.argv[_i + 1]
            _n = 1
            for _s in _spec.split(","):
                _n *= max(int(_s), 1)
            if _n > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
                "XLA_FLAGS", ""
            ):
                os.environ["XLA_FLAGS"] = (
                    os.environ.get("XLA_FLAGS", "")
                    + f" --xla_force_host_platform_device_count={_n}"
                ).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from rlhf_jax import core, models, run_setup, sharding  # noqa: E402
from rlhf_jax.algorithms import PPOConfig  # noqa: E402
from rlhf_jax.host import release_host_memory  # noqa: E402
from rlhf_jax.sampling import generate  # noqa: E402

PEER_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "peer-bench" / "trl_ppo_bench.py"

# name: (layers, hidden, intermediate, heads, vocab, batch, prompt, response)
CONFIGS = {
    "A": (4, 256, 1024, 4, 8192, 16, 32, 32),
    "B": (2, 128, 512, 4, 1024, 8, 16, 64),
    "C": (8, 512, 2048, 4, 32000, 32, 64, 64),
}
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), help="preset sizes (flags below override)")
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="default: --heads")
    p.add_argument("--vocab", type=int, help="ordinary tokens; the model has vocab + 2")
    p.add_argument("--batch", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--response-len", type=int)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="timed iterations (after the compile)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--frozen-dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="storage of the reference and reward models (models.frozen_dtype; default float32); "
        "trained params and AdamW moments are float32",
    )
    p.add_argument("--recompute-old-logprobs", action="store_true")
    p.add_argument("--logprob-chunk", type=int, default=None, help="PPOConfig.logprob_chunk_size")
    p.add_argument(
        "--remat",
        default="dots",
        choices=("none", "dots", "full"),
        help="what the backward recomputes of each layer (models.remat)",
    )
    p.add_argument(
        "--shared-value-head",
        action="store_true",
        help="value head on the policy trunk instead of a value model (not the peer's setup)",
    )
    p.add_argument(
        "--scan-layers",
        default="auto",
        choices=("auto", "true", "false"),
        help="ModelConfig.scan_layers (auto: unrolled up to 4 layers)",
    )
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor mesh sizes (-1: the rest)")
    p.add_argument("--no-phases", action="store_true", help="time only the one-jit iteration")
    p.add_argument(
        "--buckets",
        type=int,
        default=None,
        help="time the phased iteration the trainer runs (rollout, then scoring and update on "
        "the smallest of this many response-length buckets) instead of the one-jit iteration",
    )
    p.add_argument(
        "--uniform-policy",
        action="store_true",
        help="zero the final norm of policy and reference: tokens sampled uniformly, a row stops "
        "with probability 1/(vocab+2) per step (the peer's early-stop workload; passed to it)",
    )
    p.add_argument("--cost-analysis", action="store_true", help="print XLA's FLOP estimates")
    p.add_argument("--profile", default=None, help="write a jax.profiler trace to this dir")
    p.add_argument("--peer-python", default=None, help="python of a TRL 0.17 venv: run the peer")
    p.add_argument("--peer-script", default=str(PEER_SCRIPT))
    p.add_argument("--peer-threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="alternations ours/peer (with a peer)")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    args = p.parse_args(argv)
    names = ("layers", "hidden", "intermediate", "heads", "vocab", "batch")
    names += ("prompt_len", "response_len")
    preset = CONFIGS[args.config or "A"]
    for name, value in zip(names, preset):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.kv_heads = args.kv_heads or args.heads
    args.frozen_dtype = args.frozen_dtype or "float32"
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    return args


# -------------------------------------------------------------------------------------- setup


def model_configs(args: argparse.Namespace) -> core.RLModels:
    policy = common.tiny_llama(
        args,
        family=args.arch,
        num_kv_heads=args.kv_heads,
        attn_bias=args.arch == "qwen2",
        qk_norm=args.arch == "qwen3",
        dtype=args.dtype,
        param_dtype="float32",
        remat=args.remat,
        scan_layers={"auto": None, "true": True, "false": False}[args.scan_layers],
    )
    score = dataclasses.replace(policy, head="score", num_labels=1)
    value = None if args.shared_value_head else score
    return core.RLModels(policy=policy, value=value, reward=score)


def ppo_config(args: argparse.Namespace) -> PPOConfig:
    """TRL 0.17 PPOConfig defaults as the peer script sets them."""
    return PPOConfig(
        batch_size=args.batch,
        response_length=args.response_len,
        temperature=0.7,
        stop_token_ids=(args.vocab + 1,),
        pad_token_id=args.vocab,
        missing_eos_penalty=1.0,
        kl_coef=0.05,
        num_ppo_epochs=args.epochs,
        num_mini_batches=args.minibatches,
        learning_rate=3e-6,
        total_iterations=max(args.iters + 2, 10),
        recompute_old_logprobs=args.recompute_old_logprobs,
        logprob_chunk_size=args.logprob_chunk,
    )


def parse_mesh(spec: str) -> sharding.MeshConfig:
    parts = [int(s) for s in spec.split(",")]
    if len(parts) != 3:
        raise SystemExit(f"--mesh wants data,fsdp,tensor (three integers), got {spec!r}")
    return sharding.MeshConfig(data=parts[0], fsdp=parts[1], tensor=parts[2])


# -------------------------------------------------------------------------------------- FLOPs


def _forward_flops(
    c: models.ModelConfig,
    batch: int,
    positions: int,
    context_before: int,
    head_positions: int,
    outputs: tuple[int, int] | None = None,
) -> float:
    """Model FLOPs of a forward over `positions` tokens per row whose first token already has
    `context_before` tokens before it: 2 * matmul params per token in the layers, causal attention
    (each query reads the keys at and before it: 4 * heads * head_dim FLOPs per (query, key) pair
    per layer) and the head (2 * hidden * outputs) on `head_positions` positions per row.
    `outputs=(start, length)`: a full pass asked for those positions only (`forward(...,
    outputs=...)`: PPO's response states, the reward model's possible score positions); with
    unrolled layers its last layer computes queries, attention output and MLP only there."""
    d, f, h, n, k = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    mlp = (3 if c.mlp == "gated" else 2) * d * f
    per_layer = d * h * k + 2 * d * n * k + h * k * d + mlp
    body = 2 * c.num_layers * per_layer * positions
    keys = positions * context_before + positions * (positions + 1) / 2
    attn = 4 * h * k * c.num_layers * keys
    if outputs is not None and not c.use_scan:
        start, length = outputs
        body -= 2 * (d * h * k + h * k * d + mlp) * (positions - length)
        last_layer_keys = length * (context_before + start) + length * (length + 1) / 2
        attn -= 4 * h * k * (keys - last_layer_keys)
    outputs = c.vocab_size if c.head == "lm" else c.num_labels
    return batch * (body + attn + 2 * d * outputs * head_positions)


def count_flops(pm: core.RLModels, config: PPOConfig, prompt: int) -> dict[str, float]:
    """Model FLOPs of one iteration by phase (backward = 2 x forward)."""
    b, t = config.batch_size, config.response_length
    s = prompt + t
    pol, val, rew = pm.policy, pm.value_head, pm.reward
    # generation: prefill of the prompt (logits at its last token), then T - 1 decode steps
    gen = _forward_flops(pol, b, prompt, 0, 1) + _forward_flops(pol, b, t - 1, prompt, t - 1)
    # training-style forwards run the whole prompt + response; LM logits only on the T responses
    policy_fwd = _forward_flops(pol, b, s, 0, t, outputs=(prompt - 1, t))
    value_fwd = _forward_flops(val, b, s, 0, t, outputs=(prompt - 1, t))
    # the reward model's last layer: the positions where a score can sit (P - 1 ..)
    reward_fwd = _forward_flops(rew, b, s, 0, 1, outputs=(prompt - 1, t + 1))
    flops = {
        "generation": gen,
        "ref_forward": policy_fwd,
        "value_forward": value_fwd,
        "reward_forward": reward_fwd,
        "old_logprob_forward": policy_fwd if config.recompute_old_logprobs else 0.0,
        # a shared value head adds only its head to the policy's forward and backward
        "update": config.num_ppo_epochs
        * 3
        * (policy_fwd + (2 * pol.hidden_size * b * t if pm.shared_value_head else value_fwd)),
    }
    flops["total"] = sum(flops.values())
    return flops


# ---------------------------------------------------------------------------------- the peer


def run_peer(args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """Runs TRL 0.17's PPOTrainer script (iters + 1 iterations; the first is its warm-up)."""
    cmd = [
        args.peer_python,
        args.peer_script,
        out_dir,
        "--batch",
        str(args.batch),
        "--resp",
        str(args.response_len),
        "--prompt",
        str(args.prompt_len),
        "--iters",
        str(args.iters + 1),
        "--vocab",
        str(args.vocab),
        "--layers",
        str(args.layers),
        "--hidden",
        str(args.hidden),
        "--threads",
        str(args.peer_threads),
    ]
    if args.uniform_policy:
        cmd.append("--uniform-policy")
    if args.intermediate != 4 * args.hidden or args.heads != 4 or args.epochs != 4:
        raise SystemExit(
            "the peer script fixes intermediate = 4 x hidden, 4 heads and 4 epochs; "
            "pick sizes it can run or drop --peer-python"
        )
    if args.minibatches != 1 or args.dtype != "float32":
        raise SystemExit("the peer script runs 1 minibatch in float32 only")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"peer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


# ------------------------------------------------------------------------------------- timing


def phased_iteration(n_buckets, config, pm, frozen, prompts, prompt_mask, state):
    """The trainer's phased iteration with length buckets (see
    `rlhf_jax.core.iteration_programs`): `step(state, key) -> (state, metrics)`, with the update
    compiled for every bucket up front (so no timed iteration compiles). Returns `(step, state)`."""
    config = dataclasses.replace(config, length_buckets=n_buckets)
    programs = core.iteration_programs(config, pm)

    def finish(state, roll, key, *, width):
        scores = programs.score(state, frozen, roll, width=width)
        return programs.finish(state, roll, scores, key, width=width)

    def step(state, key):
        rollout_key, update_key = jax.random.split(key)
        roll = programs.rollout(state, frozen, prompts, prompt_mask, rollout_key)
        width = config.bucket_width(np.asarray(roll.generation.sequence_lengths))
        state, metrics = finish(state, roll, update_key, width=width)
        return state, {**metrics, "perf/response_bucket": jnp.float32(width)}

    start = time.perf_counter()
    for width in config.response_buckets():
        copy = jax.tree.map(jnp.copy, state)
        roll = programs.rollout(copy, frozen, prompts, prompt_mask, jax.random.key(0))
        jax.block_until_ready(finish(copy, roll, jax.random.key(0), width=width))
    print(f"phased iteration: {n_buckets} buckets compiled in {time.perf_counter() - start:.1f}s")
    return step, state


def compile_timed(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def flops_of(compiled) -> float | None:
    """XLA's own FLOP estimate of a compiled function (loop bodies counted once by XLA:CPU)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    return float(analysis.get("flops", 0.0)) if analysis else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pm = model_configs(args)
    config = ppo_config(args)
    b, p, t = args.batch, args.prompt_len, args.response_len
    print(
        f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"load avg {os.getloadavg()}"
    )
    print(
        f"model: {args.arch}, {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.heads} heads, vocab {args.vocab}+2, {args.dtype} "
        f"(frozen models {args.frozen_dtype}); batch {b}, prompt {p}, response {t}, epochs "
        f"{args.epochs}, minibatches {args.minibatches}, recompute_old_logprobs "
        f"{args.recompute_old_logprobs}, mesh {args.mesh}"
    )

    mesh = sharding.make_mesh(parse_mesh(args.mesh))
    multi = mesh.size > 1

    def jit(fn, **kw):
        return sharding.jit_with_rules(fn, mesh if multi else None, **kw)

    start = time.perf_counter()
    init = jax.jit(models.init_params, static_argnums=0)
    policy = init(pm.policy, jax.random.key(0))
    reward = init(pm.reward, jax.random.key(1))
    if args.uniform_policy:  # logits 0: uniform sampling, so rows stop early at random
        policy["final_norm"]["scale"] = jnp.zeros_like(policy["final_norm"]["scale"])
    if multi:
        shardings = core.rl_shardings(config, pm, mesh)
        policy = jax.device_put(policy, shardings.frozen.ref)
        reward = jax.device_put(reward, shardings.frozen.reward)
    value = models.value_head_init(pm.policy) if pm.shared_value_head else reward
    if multi:
        value = jax.device_put(value, shardings.state.value_params)
    state = core.jit_init_state(config, pm, mesh if multi else None)(policy, value)
    frozen = core.FrozenParams(*run_setup.frozen_params((policy, reward), args.frozen_dtype))
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(0, args.vocab, size=(b, p)), jnp.int32)
    prompt_mask = jnp.ones((b, p), bool)
    if multi:
        prompts, prompt_mask = sharding.place_replicated((prompts, prompt_mask), mesh)
    jax.block_until_ready((state, frozen))
    setup_s = time.perf_counter() - start

    kw = dict(config=config, rl_models=pm)
    iteration = core.jit_iteration(config, pm, mesh if multi else None)
    keys = jax.random.split(jax.random.key(42), args.iters + 1)
    compiled = {}
    compile_s = {}
    compiled["iteration"], compile_s["iteration"] = compile_timed(
        iteration, state, frozen, prompts, prompt_mask, keys[0], None
    )

    # The pieces, jitted separately (same functions the iteration composes).
    phases = not args.no_phases
    if phases:
        lp_kw = dict(temperature=config.temperature, chunk_size=config.logprob_chunk_size)

        def gen_fn(params, prompts, mask, key):
            return generate(params, pm.policy, prompts, mask, key, config.sampling_config())

        def ref_fn(params, prompts, mask, gen):
            return core.policy_logprobs(
                params, pm.policy, prompts, mask, gen.tokens, gen.mask, **lp_kw
            )[0]

        def value_fn(params, prompts, mask, gen):
            vmask = config.value_mask(gen.sequence_lengths, t)
            policy_params, value_params = params
            return core.state_values(
                policy_params, value_params, pm, prompts, mask, gen.tokens, gen.mask, vmask
            )

        def reward_fn(params, prompts, mask, gen):
            return core.reward_scores(params, pm.reward, prompts, mask, gen.tokens, gen.mask)

        def advantages_fn(roll, scores, kl_coef):
            return core.build_experience(roll, scores, kl_coef, config=config)

        def update_fn(state, exp, key):
            return core.update(state, exp, key, **kw)

        pieces = {
            "generation": jit(gen_fn),
            "ref_forward": jit(ref_fn),
            "value_forward": jit(value_fn),
            "reward_forward": jit(reward_fn),
            "advantages": jit(advantages_fn),
            "update": jit(update_fn),
            "rollout": jit(functools.partial(core.rollout, **kw)),
            "make_experience": jit(functools.partial(core.make_experience, **kw)),
        }
        if config.recompute_old_logprobs:
            pieces["old_logprob_forward"] = pieces["ref_forward"]
        # Inputs of the pieces, from one experience of (a copy of) the initial state: the
        # iteration donates `state`.
        state0 = jax.tree.map(jnp.copy, state)

        def compiled_call(name, *fn_args):
            compiled[name], compile_s[name] = compile_timed(pieces[name], *fn_args)
            return compiled[name](*fn_args)

        gen0 = compiled_call("generation", state0.policy_params, prompts, prompt_mask, keys[0])
        roll0 = compiled_call("rollout", state0, frozen, prompts, prompt_mask, keys[0])
        scores0 = compiled_call("reward_forward", reward, prompts, prompt_mask, gen0)
        exp0, _ = compiled_call("advantages", roll0, scores0, state0.kl.kl_coef)
        piece_args = {
            "generation": (state0.policy_params, prompts, prompt_mask, keys[0]),
            "ref_forward": (policy, prompts, prompt_mask, gen0),
            "old_logprob_forward": (state0.policy_params, prompts, prompt_mask, gen0),
            "value_forward": (
                (state0.policy_params, state0.value_params),
                prompts,
                prompt_mask,
                gen0,
            ),
            "reward_forward": (reward, prompts, prompt_mask, gen0),
            "advantages": (roll0, scores0, state0.kl.kl_coef),
            "update": (state0, exp0, keys[0]),
            "rollout": (state0, frozen, prompts, prompt_mask, keys[0]),
            "make_experience": (state0, frozen, prompts, prompt_mask, keys[0]),
        }
        for name in pieces:
            if name not in compiled and name != "old_logprob_forward":
                compiled_call(name, *piece_args[name])
        compiled["old_logprob_forward"] = compiled.get("ref_forward")

    compile_total = sum(compile_s.values())
    print(
        f"setup {setup_s:.1f}s; compile: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in compile_s.items())
    )

    flops = count_flops(pm, config, p)
    hlo_flops = {}
    if args.cost_analysis:
        hlo_flops = {k: flops_of(v) for k, v in compiled.items() if v is not None}
        print("XLA cost_analysis FLOPs (loop bodies counted once):")
        for k, v in hlo_flops.items():
            print(f"  {k:<22}{(v or 0) / 1e9:10.2f} GFLOP")

    # Compiled: give the compiler's freed heap back to the OS before anything runs, so the peak RSS
    # is max(compile, run) rather than their sum (see rlhf_jax.host.release_host_memory).
    release_host_memory()

    # ---------------------------------------------------------------- timed iterations
    times: dict[str, list[float]] = {"iteration": []}
    metrics_log: list[dict[str, float]] = []
    peer_results: list[dict[str, Any]] = []
    peer_dir = f"/tmp/ppo_iteration_peer_{os.getpid()}"

    def our_round(n_iters: int, key_offset: int) -> None:
        nonlocal state
        for i in range(n_iters):
            key = jax.random.fold_in(keys[1 + i % args.iters], key_offset)
            start = time.perf_counter()
            state, metrics = compiled["iteration"](state, frozen, prompts, prompt_mask, key, None)
            jax.block_until_ready((state, metrics))
            times["iteration"].append(time.perf_counter() - start)
            metrics_log.append({k: float(v) for k, v in metrics.items()})
            if not phases:
                continue
            for name in pieces:
                fn, fn_args = compiled[name], piece_args[name]
                start = time.perf_counter()
                jax.block_until_ready(fn(*fn_args))
                times.setdefault(name, []).append(time.perf_counter() - start)

    if args.buckets:
        phased, state = phased_iteration(
            args.buckets, config, pm, frozen, prompts, prompt_mask, state
        )
        compiled["iteration"] = lambda state, frozen, prompts, prompt_mask, key, ptx: phased(
            state, key
        )

    # one untimed warm-up call of everything (first runs allocate)
    state, _ = compiled["iteration"](state, frozen, prompts, prompt_mask, keys[0], None)
    if phases:
        for name in pieces:
            jax.block_until_ready(compiled[name](*piece_args[name]))
    if args.profile:
        jax.profiler.start_trace(args.profile)
    loads = [os.getloadavg()[0]]
    rounds = args.rounds if args.peer_python else 1
    for r in range(rounds):
        our_round(args.iters, r)
        loads.append(os.getloadavg()[0])
        if args.peer_python:
            res = run_peer(args, peer_dir)
            peer_results.append(res)
            loads.append(os.getloadavg()[0])
            print(
                f"round {r}: ours {common.median(times['iteration'][-args.iters :]):.3f}s, "
                f"TRL {res['median_after_first_s']:.3f}s (median after its first iteration)"
            )
    if args.profile:
        jax.profiler.stop_trace()

    # ---------------------------------------------------------------- report
    med = {k: common.median(v) for k, v in times.items()}
    matmul_rate = common.measure_matmul_flops("float32")
    total = med["iteration"]
    tokens = b * t
    print(
        f"\nmedians over {len(times['iteration'])} iterations (after compile); "
        f"jnp.dot float32 rate {matmul_rate / 1e9:.1f} GFLOP/s; load avg during runs "
        f"{min(loads):.2f}-{max(loads):.2f}"
    )
    print(f"{'phase':<22}{'seconds':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'% matmul':>10}")

    def row(name: str, seconds: float, fl: float | None) -> None:
        if fl:
            rate = fl / seconds
            print(
                f"{name:<22}{seconds:>9.4f}{fl / 1e9:>9.2f}{rate / 1e9:>9.1f}"
                f"{100 * rate / matmul_rate:>9.1f}%"
            )
        else:
            print(f"{name:<22}{seconds:>9.4f}")

    if phases:
        for name in (
            "generation",
            "old_logprob_forward",
            "ref_forward",
            "value_forward",
            "reward_forward",
            "advantages",
            "update",
        ):
            if name in med:
                row(name, med[name], flops.get(name))
        row("  rollout (1 jit)", med["rollout"], None)
        row("  make_experience", med["make_experience"], None)
        row(
            "  sum of phases",
            sum(
                med[n]
                for n in med
                if n not in ("iteration", "rollout", "make_experience", "old_logprob_forward")
            )
            + (med["ref_forward"] if config.recompute_old_logprobs else 0.0),
            None,
        )
    label = f"phased, {args.buckets} buckets" if args.buckets else "ppo_iteration (1 jit)"
    row(label, total, None if args.buckets else flops["total"])
    if args.buckets:
        widths = [m["perf/response_bucket"] for m in metrics_log]
        steps = [m["perf/decode_steps"] for m in metrics_log]
        used = sorted(set(widths))
        print(f"response buckets used {used}; median decode steps {common.median(steps)}")
    print(f"response tokens/s {tokens / total:.1f}; compile total {compile_total:.1f}s")

    first_ratio_std = common.median([m["policy/first_ratio_std"] for m in metrics_log])
    first_kl = common.median([m["policy/first_approxkl"] for m in metrics_log])
    print(
        f"policy/first_ratio_std {first_ratio_std:.3g}, policy/first_approxkl {first_kl:.3g} "
        f"(median over iterations)"
    )
    results: dict[str, Any] = {
        "seconds": med,
        "times": times,
        "compile_s": compile_s,
        "setup_s": setup_s,
        "flops": flops,
        "hlo_flops": hlo_flops,
        "matmul_flops": matmul_rate,
        "achieved_flops": None if args.buckets else flops["total"] / total,
        "fraction_of_matmul": None if args.buckets else flops["total"] / total / matmul_rate,
        "response_tokens_per_s": tokens / total,
        "first_ratio_std": first_ratio_std,
        "first_approxkl": first_kl,
        "load_avg": loads,
        "metrics_last": metrics_log[-1],
    }
    if peer_results:
        peer_med = common.median([r["median_after_first_s"] for r in peer_results])
        ours_by_round = [
            common.median(times["iteration"][i * args.iters : (i + 1) * args.iters])
            for i in range(rounds)
        ]
        paired = [
            r["median_after_first_s"] / o for r, o in zip(peer_results, ours_by_round, strict=True)
        ]
        results["peer"] = {
            "runs": peer_results,
            "median_s": peer_med,
            "speedup": peer_med / total,
            "paired_speedups": paired,
        }
        print(
            f"TRL 0.17 PPOTrainer: {peer_med:.3f} s/iter (median of {rounds} runs); ours "
            f"{total:.3f} s/iter: speedup {peer_med / total:.2f}x (per round: "
            + ", ".join(f"{s:.2f}x" for s in paired)
            + ")"
        )
    results["peak_rss_mb"] = common.peak_rss_mb()
    print(f"peak RSS of this process {results['peak_rss_mb']:.0f} MiB")
    if args.json:
        common.write_json(args.json, "ppo_iteration", vars(args), results)
    return results


if __name__ == "__main__":
    main()
