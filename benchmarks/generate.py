"""Sampling throughput: `rlhf_jax.generate` against transformers' `model.generate` on the same
random weights, measured in one process and interleaved so machine load hits both alike.

    python3 benchmarks/generate.py --batch 16 --prompt-len 32 --new-tokens 64 --repeats 5

Reports prefill and decode tokens/s (decode = full generate minus a prefill-only pass of the same
implementation), the speedup over transformers, achieved FLOP/s against the machine's measured
matmul rate, and the linearity check: our time for `2N` new tokens over our time for `N`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

import rlhf_jax  # noqa: E402
from rlhf_jax import models  # noqa: E402
from rlhf_jax.sampling import (  # noqa: E402
    decode_compiler_options,
    prefill_cache_length,
    prompt_positions,
)

PAD_ID = 0
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--decode-chunks",
        type=int,
        default=None,
        help="SamplingConfig.decode_chunks (default: automatic, ~16 decode steps a chunk)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--no-torch", action="store_true", help="skip transformers; random JAX init")
    p.add_argument("--no-linearity", action="store_true", help="skip the 2N linearity check")
    p.add_argument(
        "--xla-defaults",
        action="store_true",
        help="compile our programs with XLA's default options, not decode_compiler_options()",
    )
    p.add_argument("--trace", default=None, help="profile our generate; print the top XLA ops")
    return p.parse_args(argv)


def hf_config(args: argparse.Namespace) -> Any:
    import transformers

    return transformers.AutoConfig.for_model(
        args.arch,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=max(2048, args.prompt_len + 2 * args.new_tokens),
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
        **({} if args.arch == "llama" else {"sliding_window": None}),
    )


def build_models(args: argparse.Namespace) -> tuple[Any, Any, models.ModelConfig]:
    """(torch model or None, our params, our config), with identical weights when torch is on."""
    from rlhf_jax.models import config_from_hf, hf_to_params

    if args.no_torch:  # the same config, from transformers' config class, without its model
        config = dataclasses.replace(config_from_hf(hf_config(args)), dtype=args.dtype)
        params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
        return None, params, config

    import torch
    import transformers

    common.set_threads(args.threads)
    torch.manual_seed(0)
    cfg = hf_config(args)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    model = model.to(getattr(torch, args.dtype)).eval()
    config = config_from_hf(model.config)
    config = dataclasses.replace(config, dtype=args.dtype)
    tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    params = hf_to_params(tensors, config)
    params = jax.tree.map(lambda x: jnp.asarray(x, config.params_dtype), params)
    return model, params, config


def count_flops(config: models.ModelConfig, batch: int, prompt: int, new: int) -> dict[str, float]:
    """Approximate useful FLOPs: 2 * (matmul params) per token plus causal attention
    (4 * heads * head_dim per (query, key) pair), and the LM head once per sampled token."""
    c = config
    d, f, h, n, k = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    per_layer = d * h * k + 2 * d * n * k + h * k * d + 3 * d * f
    body = c.num_layers * per_layer
    head = d * c.vocab_size
    attn_pair = 4 * h * k * c.num_layers
    prefill = 2 * body * batch * prompt + attn_pair * batch * prompt * (prompt + 1) / 2
    prefill += 2 * head * batch  # logits of the last prompt token
    # decode: new - 1 forward steps (the first token comes from the prefill logits); step t reads
    # prompt + t keys.
    keys = sum(prompt + t for t in range(1, new))
    decode = (2 * (body + head) * batch) * (new - 1) + attn_pair * batch * keys
    return {"prefill": prefill, "decode": decode, "params_matmul": body + head}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    use_torch = not args.no_torch
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    print(f"jax {jax.__version__} on {jax.devices()}; load avg {common.environment()['load_avg']}")

    t0 = time.perf_counter()
    hf_model, params, config = build_models(args)
    print(f"built models in {time.perf_counter() - t0:.1f}s: {config}")

    rng = np.random.default_rng(0)
    tokens_np = rng.integers(3, args.vocab, size=(b, p)).astype(np.int32)
    mask_np = np.ones((b, p), np.int32)
    tokens, mask = jnp.asarray(tokens_np), jnp.asarray(mask_np)
    key = jax.random.key(1)

    def sampling(new: int) -> rlhf_jax.SamplingConfig:
        return rlhf_jax.SamplingConfig(
            max_new_tokens=new,
            temperature=1.0,
            stop_token_ids=(),
            pad_token_id=PAD_ID,
            decode_chunks=args.decode_chunks,
        )

    # The library's standalone sampler, and the prefill compiled with the same XLA options.
    options = {} if args.xla_defaults else decode_compiler_options()
    print(f"XLA compiler options: {options or 'defaults'}")

    def gen(new: int):
        return rlhf_jax.jit_generate(config, sampling(new), compiler_options=options)

    @functools.partial(jax.jit, static_argnums=(1, 4), compiler_options=options or None)
    def prefill(params, config, tokens, mask, max_len):
        cache = models.init_cache(config, tokens.shape[0], max_len)
        hidden, cache = models.forward(
            params, config, tokens, prompt_positions(mask), mask.astype(bool), cache
        )
        return models.lm_logits(params, config, hidden[:, -1:]), cache

    def compile_timed(fn, *a):
        start = time.perf_counter()
        compiled = fn.lower(*a).compile()
        return compiled, time.perf_counter() - start

    gen_n, compile_n = compile_timed(gen(n), params, tokens, mask, key)
    prefill_len = prefill_cache_length(sampling(n), p)  # the cache generate's prefill fills
    prefill_c, compile_prefill = compile_timed(prefill, params, config, tokens, mask, prefill_len)
    fns = {
        "ours_generate": lambda: gen_n(params, tokens, mask, key),
        "ours_prefill": lambda: prefill_c(params, tokens, mask),
    }
    compile_2n = None
    if not args.no_linearity:
        gen_2n, compile_2n = compile_timed(gen(2 * n), params, tokens, mask, key)
        fns["ours_generate_2n"] = lambda: gen_2n(params, tokens, mask, key)
    print(f"compile: generate {compile_n:.2f}s, prefill {compile_prefill:.2f}s", end="")
    print(f", generate 2N {compile_2n:.2f}s" if compile_2n is not None else "")

    if use_torch:
        import torch

        t_tokens, t_mask = torch.as_tensor(tokens_np).long(), torch.as_tensor(mask_np).long()

        def hf_generate():
            with torch.inference_mode():
                return hf_model.generate(
                    input_ids=t_tokens,
                    attention_mask=t_mask,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=PAD_ID,
                    eos_token_id=None,
                    use_cache=True,
                )

        def hf_prefill():
            with torch.inference_mode():
                return hf_model(input_ids=t_tokens, attention_mask=t_mask, use_cache=True).logits

        out = hf_generate()
        assert out.shape == (b, p + n), out.shape
        fns["hf_generate"] = hf_generate
        fns["hf_prefill"] = hf_prefill

    sample = gen_n(params, tokens, mask, key)
    assert sample.tokens.shape == (b, n) and bool(jnp.all(sample.mask)), "early stop in ours"

    cpu: dict[str, list[float]] = {}
    times = common.time_interleaved(fns, repeats=args.repeats, warmup=1, cpu_out=cpu)
    med = {name: common.median(ts) for name, ts in times.items()}
    matmul_rate = common.measure_matmul_flops(args.dtype)
    flops = count_flops(config, b, p, n)

    rows = {}
    for impl in ("ours", "hf") if use_torch else ("ours",):
        total, pre = med[f"{impl}_generate"], med[f"{impl}_prefill"]
        dec = max(total - pre, 1e-9)
        rows[impl] = {
            "total_s": total,
            "prefill_s": pre,
            "decode_s": dec,
            "prefill_tok_s": b * p / pre,
            "decode_tok_s": b * n / dec,
            "total_tok_s": b * n / total,
            "decode_flops": flops["decode"] / dec,
            "prefill_flops": flops["prefill"] / pre,
        }

    print(f"\nmedians of {args.repeats} interleaved repeats; B={b} P={p} N={n} {args.dtype}")
    print(f"measured jnp.dot rate: {matmul_rate / 1e9:.1f} GFLOP/s")
    header = (
        f"{'impl':<6}{'prefill s':>11}{'decode s':>10}{'total s':>9}"
        f"{'prefill tok/s':>15}{'decode tok/s':>14}{'total tok/s':>13}"
        f"{'decode GF/s':>13}{'% matmul':>10}"
    )
    print(header)
    for impl, r in rows.items():
        print(
            f"{impl:<6}{r['prefill_s']:>11.4f}{r['decode_s']:>10.4f}{r['total_s']:>9.4f}"
            f"{r['prefill_tok_s']:>15.0f}{r['decode_tok_s']:>14.0f}{r['total_tok_s']:>13.0f}"
            f"{r['decode_flops'] / 1e9:>13.2f}{100 * r['decode_flops'] / matmul_rate:>9.1f}%"
        )
    results: dict[str, Any] = {
        "rows": rows,
        "times": times,
        "cpu_times": cpu,
        "compile_s": {"generate": compile_n, "prefill": compile_prefill, "generate_2n": compile_2n},
        "compiler_options": options,
        "matmul_flops": matmul_rate,
        "flops": flops,
        "peak_rss_mb": common.peak_rss_mb(),
    }
    if use_torch:
        speed = {
            "prefill": rows["ours"]["prefill_tok_s"] / rows["hf"]["prefill_tok_s"],
            "decode": rows["ours"]["decode_tok_s"] / rows["hf"]["decode_tok_s"],
            "total": rows["ours"]["total_tok_s"] / rows["hf"]["total_tok_s"],
        }
        # per-repeat ratio of totals (paired, so load spikes cancel), as a robustness check
        paired = [h / o for h, o in zip(times["hf_generate"], times["ours_generate"])]
        speed["total_paired_median"] = common.median(paired)
        results["speedup_vs_hf"] = speed
        fastest = {name: min(ts) for name, ts in times.items()}
        speed["decode_min"] = (fastest["hf_generate"] - fastest["hf_prefill"]) / (
            fastest["ours_generate"] - fastest["ours_prefill"]
        )
        print(
            f"speedup vs transformers: decode {speed['decode']:.2f}x, prefill "
            f"{speed['prefill']:.2f}x, total {speed['total']:.2f}x "
            f"(paired per-repeat total {speed['total_paired_median']:.2f}x, decode from fastest "
            f"repeats {speed['decode_min']:.2f}x); target decode >= 3x"
        )
    if not args.no_linearity:
        # Our N and 2N alternated by themselves: the interleaved transformers runs above (their
        # threads and their 25 MB of weights in the shared L3) disturb the two unequally.
        alone = common.time_interleaved(
            {"n": fns["ours_generate"], "2n": fns["ours_generate_2n"]}, repeats=args.repeats
        )
        ratio = common.median(alone["2n"]) / common.median(alone["n"])
        paired = [a / c for a, c in zip(alone["2n"], alone["n"])]
        in_mix = med["ours_generate_2n"] / med["ours_generate"]
        ratio_cpu = common.median(cpu["ours_generate_2n"]) / common.median(cpu["ours_generate"])
        results["linearity"] = {
            "ratio": ratio,
            "paired_median": common.median(paired),
            "ratio_of_fastest": min(alone["2n"]) / min(alone["n"]),
            "ratio_in_mix_with_transformers": in_mix,
            "ratio_cpu_time_in_mix": ratio_cpu,
            "times": alone,
        }
        verdict = "ok" if ratio <= 2.2 else "FAIL"
        print(
            f"linearity: time(2N={2 * n}) / time(N={n}) = {ratio:.2f} (N and 2N alternated alone; "
            f"paired {common.median(paired):.2f}; in the mix with transformers {in_mix:.2f}, "
            f"process CPU time {ratio_cpu:.2f}); target <= 2.2: {verdict}"
        )
    print(f"peak RSS {results['peak_rss_mb']:.0f} MiB")
    if args.trace:
        ops = common.top_xla_ops(fns["ours_generate"], args.trace)
        results["top_xla_ops"] = ops
        print("\ntop XLA ops of our generate, ms per call (names as in compiled.as_text()):")
        for name, ms, count in ops:
            print(f"{ms:10.2f} ms  x{count:<6d} {name}")
    if args.json:
        common.write_json(args.json, "generate", vars(args), results)
    return results


if __name__ == "__main__":
    main()
