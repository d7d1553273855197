"""Early-exit decoding: what `generate` costs when every row stops well before the length limit.

    python3 benchmarks/early_exit.py --new-tokens 256 --repeats 5

The policy's final norm is zeroed, so its logits are 0 and tokens are sampled uniformly from a
small vocabulary (the peer benchmark's `--uniform-policy` workload): with one stop id among
`--vocab` tokens a row stops with probability 1/vocab per step. Three programs, timed
interleaved (medians):

- `early`: `max_new_tokens=N`, decoding exits when the last row has stopped (the default);
- `full`: the same with `exit_early=False` (every one of the N steps runs: the old behaviour);
- `oracle`: `max_new_tokens` = the longest response of that batch, every step run: the cost of
  knowing the lengths in advance, the floor `early` is compared against.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from rlhf_jax import models  # noqa: E402
from rlhf_jax.sampling import SamplingConfig, jit_generate  # noqa: E402

PAD_ID, STOP_ID = 0, 1


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results to this JSON file")
    args = p.parse_args(argv)

    config = common.llama_config(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=4 * args.hidden,
        heads=args.heads,
        vocab=args.vocab,
        max_positions=args.prompt_len + args.new_tokens,
    )
    params = models.init_params(config, jax.random.key(args.seed))
    params["final_norm"]["scale"] = params["final_norm"]["scale"] * 0  # uniform sampling
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(2, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    key = jax.random.key(args.seed + 1)
    base = SamplingConfig(
        max_new_tokens=args.new_tokens, stop_token_ids=(STOP_ID,), pad_token_id=PAD_ID
    )
    early_fn = jit_generate(config, base)
    full_fn = jit_generate(config, dataclasses.replace(base, exit_early=False))
    gen = early_fn(params, prompts, mask, key)
    longest = int(np.max(gen.sequence_lengths)) + 1
    lengths = np.asarray(gen.sequence_lengths) + 1
    oracle_cfg = dataclasses.replace(base, max_new_tokens=longest, exit_early=False)
    oracle_fn = jit_generate(config, oracle_cfg)
    # Same samples: the steps skipped would only have emitted padding.
    full = full_fn(params, prompts, mask, key)
    np.testing.assert_array_equal(np.asarray(full.tokens), np.asarray(gen.tokens))
    print(
        f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch {args.batch}, "
        f"prompt {args.prompt_len}, max_new_tokens {args.new_tokens}: response lengths median "
        f"{int(np.median(lengths))}, longest {longest}; decode_steps {int(gen.decode_steps)}"
    )
    times = common.time_interleaved(
        {
            "early": lambda: early_fn(params, prompts, mask, key),
            "full": lambda: full_fn(params, prompts, mask, key),
            "oracle": lambda: oracle_fn(params, prompts, mask, key),
        },
        repeats=args.repeats,
    )
    med = {k: common.median(v) for k, v in times.items()}
    for name, seconds in med.items():
        runs = [round(t * 1e3, 1) for t in times[name]]
        print(f"  {name:7s} {seconds * 1e3:8.1f} ms  (runs: {runs})")
    print(
        f"  early / oracle = {med['early'] / med['oracle']:.2f} (target <= 1.5); "
        f"full / early = {med['full'] / med['early']:.2f}"
    )
    result = {"args": vars(args), "longest": longest, "decode_steps": int(gen.decode_steps)}
    result["median_seconds"] = med
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
