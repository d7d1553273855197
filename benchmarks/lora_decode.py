"""LoRA during the rollout: decode with the adapters unmerged (the default) or merged first.

    python3 benchmarks/lora_decode.py --repeats 7

Three jitted `generate` programs on the same prompts and key, timed interleaved (medians):

- `base`: the model without adapters (the floor);
- `unmerged`: `x W + (alpha / r) (x A) B` in every targeted projection at every decode step;
- `merged`: `lora.merge` inside the program (one `W + s A B` per projection per rollout, a
  third copy of the policy's projection weights while it decodes), then the base model's decode.

Prints the median seconds and the ratios, and checks both LoRA programs sample the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from rlhf_jax import models  # noqa: E402
from rlhf_jax.models import lora  # noqa: E402
from rlhf_jax.sampling import SamplingConfig, generate  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results to this JSON file")
    args = p.parse_args(argv)

    base_config = common.llama_config(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=4 * args.hidden,
        heads=args.heads,
        vocab=args.vocab,
        max_positions=args.prompt_len + args.new_tokens,
    )
    config = dataclasses.replace(
        base_config, lora=models.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
    )
    params = models.init_params(config, jax.random.key(args.seed))
    trainable, frozen = lora.split(params, config.lora)  # non-zero B: a trained adapter
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)
    params = lora.join(trainable, frozen)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(2, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    key = jax.random.key(args.seed + 1)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, pad_token_id=0, exit_early=False)

    base_fn = jax.jit(lambda p, x, m, k: generate(p, base_config, x, m, k, sampling))
    unmerged_fn = jax.jit(lambda p, x, m, k: generate(p, config, x, m, k, sampling))
    merged_fn = jax.jit(
        lambda p, x, m, k: generate(lora.merge(p, config), base_config, x, m, k, sampling)
    )
    base_params = lora.base(params)
    unmerged = unmerged_fn(params, prompts, mask, key)
    merged = merged_fn(params, prompts, mask, key)
    same = float(np.mean(np.asarray(unmerged.tokens) == np.asarray(merged.tokens)))
    n_adapter = sum(x.size for x in jax.tree.leaves(lora.adapters_only(params)))
    n_base = sum(x.size for x in jax.tree.leaves(base_params))
    print(
        f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch {args.batch}, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, rank {args.rank} on all linear "
        f"layers ({n_adapter / n_base:.1%} of {n_base / 1e6:.1f}M params); merged and unmerged "
        f"sample the same token at {same:.1%} of positions"
    )
    times = common.time_interleaved(
        {
            "base": lambda: base_fn(base_params, prompts, mask, key),
            "unmerged": lambda: unmerged_fn(params, prompts, mask, key),
            "merged": lambda: merged_fn(params, prompts, mask, key),
        },
        repeats=args.repeats,
    )
    med = {k: common.median(v) for k, v in times.items()}
    for name, seconds in med.items():
        runs = [round(t * 1e3, 1) for t in times[name]]
        print(f"  {name:9s} {seconds * 1e3:8.1f} ms  (runs: {runs})")
    print(
        f"  unmerged / base = {med['unmerged'] / med['base']:.2f}; "
        f"merged / base = {med['merged'] / med['base']:.2f}"
    )
    result = {"median_seconds": med, "same_tokens": same, "adapter_fraction": n_adapter / n_base}
    if args.json:
        common.write_json(args.json, "lora_decode", vars(args), result)
    return result


if __name__ == "__main__":
    main()
