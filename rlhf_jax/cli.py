"""Command-line entry point `rlhf-jax`.

    rlhf-jax train ppo --config configs/x.yaml [--resume] [key.sub=value ...]
    rlhf-jax export RUN/checkpoints/N OUT [--no-value] [--reward] [--lora merged|adapter]
    rlhf-jax generate --model PATH --prompt TEXT [--prompt TEXT ...] [--greedy] [--json]
    rlhf-jax plot RUN
    rlhf-jax demo [--out DIR] [--seed N]

`train` has one subcommand per registered algorithm (`rlhf_jax.config.register_algorithm`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _error(message: str, code: int = 2) -> int:
    print(f"rlhf-jax: error: {message}", file=sys.stderr)
    return code


def _known_errors() -> tuple[type[BaseException], ...]:
    """Input errors whose message is the whole story (printed without a traceback, status 2)."""
    from rlhf_jax.checkpoint import CheckpointError
    from rlhf_jax.config import ConfigError
    from rlhf_jax.data import DataError
    from rlhf_jax.run_setup import SetupError

    return (ConfigError, SetupError, DataError, CheckpointError)


def _run_errors() -> tuple[type[BaseException], ...]:
    """Failures during training (status 1): NaN/inf, a failing reward function."""
    from rlhf_jax.core import NonFiniteError
    from rlhf_jax.reward_functions import RewardFunctionError

    return (NonFiniteError, RewardFunctionError)


# ------------------------------------------------------------------------------------ commands


def _train(args: argparse.Namespace) -> int:
    from rlhf_jax import config, sharding

    sharding.initialize_distributed()
    algorithm = config.algorithms()[args.algorithm]
    try:
        run_config = config.load_config(algorithm.config_class(), args.config, args.overrides)
    except config.ConfigError as err:
        return _error(str(err))
    if sharding.is_main_process():
        print(f"# resolved config ({args.algorithm})\n{config.to_yaml(run_config)}", flush=True)
    if args.print_config:
        return 0
    try:
        result = algorithm.run_fn()(run_config, resume=args.resume)
    except _run_errors() as err:  # RewardFunctionError is a ValueError: check it first
        return _error(str(err), code=1)
    except _known_errors() as err:
        return _error(str(err))
    if sharding.is_main_process() and result is not None:
        iteration = getattr(result, "iteration", None)
        status = getattr(result, "status", "done")
        print(
            f"{args.algorithm}: {status} at iteration {iteration}; run directory "
            f"{getattr(result, 'run_dir', '?')}",
            flush=True,
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlhf_jax import checkpoint

    try:
        written = checkpoint.export(
            args.checkpoint,
            args.out,
            value=not args.no_value,
            reward=args.reward,
            lora_mode=args.lora,
        )
    except _known_errors() as err:
        return _error(str(err))
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from rlhf_jax import generation

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        return _error("give at least one --prompt (or --prompts-file)")
    try:
        params, config, tokenizer = generation.load_policy(args.model, dtype=args.dtype)
        results = generation.generate_completions(
            params,
            config,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            greedy=args.greedy,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            chat=args.chat,
        )
    except (*_known_errors(), ValueError) as err:
        return _error(str(err))
    for result in results:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"### {result['prompt']}\n{result['completion']}\n", flush=True)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from rlhf_jax.logging import plot_run

    try:
        written = plot_run(args.run)
    except FileNotFoundError as err:
        return _error(str(err))
    for path in written:
        print(path)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from rlhf_jax import plan

    try:
        return plan.main(
            args.config,
            args.topology,
            args.overrides,
            one_jit=not args.no_one_jit,
            gpus=args.gpus,
            gpu_type=args.gpu_type,
            json_path=args.json,
            algorithm=args.algorithm,
        )
    except (ValueError, RuntimeError, *_known_errors()) as err:
        return _error(str(err))


def _demo(args: argparse.Namespace) -> int:
    from rlhf_jax.demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed)
    return 0


# -------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from rlhf_jax.config import algorithms

    parser = argparse.ArgumentParser(
        prog="rlhf-jax",
        description="RLHF (PPO, RLOO, GRPO, REINFORCE++) in JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with a registered algorithm")
    algos = train.add_subparsers(dest="algorithm", required=True, metavar="ALGORITHM")
    for name, algorithm in sorted(algorithms().items()):
        p = algos.add_parser(name, help=algorithm.help, description=algorithm.help)
        p.add_argument("--config", help="YAML config file")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        p.add_argument(
            "--print-config", action="store_true", help="print the resolved config and exit"
        )
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.set_defaults(func=_train)

    export = sub.add_parser("export", help="write a checkpoint in Hugging Face format")
    export.add_argument("checkpoint", help="RUN/checkpoints/<iteration> (or RUN: the newest)")
    export.add_argument("out", help="output directory (policy; the value model in OUT/value)")
    export.add_argument("--no-value", action="store_true", help="skip the value model")
    export.add_argument(
        "--lora",
        choices=("merged", "adapter"),
        default="merged",
        help="LoRA runs: full HF checkpoints with the adapters merged (default) or peft adapter "
        "directories for the base model",
    )
    export.add_argument(
        "--reward", action="store_true", help="also write the run's reward model to OUT/reward"
    )
    export.set_defaults(func=_export)

    gen = sub.add_parser("generate", help="complete prompts with a policy")
    gen.add_argument("--model", required=True, help="HF model directory or one of our checkpoints")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--greedy", action="store_true", help="argmax decoding")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    gen.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.set_defaults(func=_generate)

    plot = sub.add_parser("plot", help="write PNG training curves of a run")
    plot.add_argument("run", help="run directory")
    plot.set_defaults(func=_plot)

    plan = sub.add_parser(
        "plan",
        help="compile a PPO run for a TPU slice (needs libtpu, no TPU) or N GPUs and say "
        "whether it fits",
    )
    plan.add_argument("--config", required=True, help="the run's YAML config (as for train ppo)")
    plan.add_argument("--topology", help="a TPU slice: v5e-16, v5p-64, v6e-64, v4-32, v5p:2x4x4")
    plan.add_argument(
        "--gpus", type=int, help="N GPUs instead (compiled for N CPU devices: an estimate)"
    )
    plan.add_argument("--gpu-type", default="h100", help="a100 | h100 | h200")
    plan.add_argument("--json", help="also write the figures to this JSON file")
    plan.add_argument(
        "--algorithm",
        default="ppo",
        help="the config's algorithm, as for train: ppo (default), grpo, rloo, reinforce++",
    )
    plan.add_argument(
        "--no-one-jit", action="store_true", help="skip the one-jit ppo_iteration program"
    )
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    plan.set_defaults(func=_plan)

    demo = sub.add_parser("demo", help="run the built-in end-to-end demo (no downloads)")
    demo.add_argument("--out", default="demo_out", help="output directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
