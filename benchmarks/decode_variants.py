"""What would a different KV-cache / layer-loop structure in `rlhf_jax/models/model.py` buy for
decoding? Pure-JAX Llama decode loops over the library's own params (prefill done by the library),
timed against `rlhf_jax.generate`, interleaved, at N and 2N new tokens.

    python3 benchmarks/decode_variants.py --new-tokens 64 --repeats 5

Variants (all sample the same tokens as the library: same keys, same Gumbel-max):
  library          `rlhf_jax.generate` (layers in `nn.scan`; the cache goes through the layer
                   scan as xs/ys, layout [L, B, S, N, K]).
  carried          layer `lax.scan` with the whole cache in the carry, one in-place
                   `dynamic_update_slice` per layer for the new token.
  +BNSK +unroll    cache layout [L, B, N, S, K] (no transposes before the attention dots), the
                   layer loop unrolled and each layer's weights sliced once, before the decode loop.
  +per-layer       as above with one cache array per layer (no per-step slice of the stacked
                   cache).
Only Llama-style configs (RMSNorm, RoPE, gated SiLU MLP, untied head) are supported here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

import rlhf_jax  # noqa: E402
from rlhf_jax import models  # noqa: E402
from rlhf_jax.models import model as model_lib  # noqa: E402
from rlhf_jax.sampling import prompt_positions  # noqa: E402

VARIANTS = {
    "carried": dict(layout="BSNK", unroll=False, per_layer=False),
    "+BNSK +unroll": dict(layout="BNSK", unroll=True, per_layer=False),
    "+per-layer": dict(layout="BNSK", unroll=True, per_layer=True),
}


def _rope(config, positions_BT):
    tables = getattr(model_lib, "rope_tables", None) or model_lib._rope_tables
    return tables(config, positions_BT)


def _first_argmax(x_BV):
    hit = (x_BV == jnp.max(x_BV, -1, keepdims=True)) | jnp.isnan(x_BV)
    return jnp.min(jnp.where(hit, jnp.arange(x_BV.shape[-1], dtype=jnp.int32), x_BV.shape[-1]), -1)


def make_generate(config, batch, prompt_len, new, *, layout, unroll, per_layer):
    """A jitted `(params, tokens, mask, key) -> tokens [B, new]` decode loop."""
    c, n_layers, total = config, config.num_layers, prompt_len + new
    bnsk = layout == "BNSK"

    def rms(x, scale):
        return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + c.norm_eps) * scale

    def layer(w, h_BD, rope, allowed_BS, read_write):
        x = rms(h_BD, w["attn_norm"]["scale"])
        q, k, v = (jnp.einsum("bd,dhk->bhk", x, w["attn"][n]["kernel"]) for n in "qkv")
        q = model_lib._apply_rope(q[:, None], *rope)[:, 0]
        k = model_lib._apply_rope(k[:, None], *rope)[:, 0]
        keys, values = read_write(k, v)
        sub = "bnsk" if bnsk else "bsnk"
        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(q.shape[0], c.num_kv_heads, groups, c.head_dim)
        s = jnp.einsum(f"bngk,{sub}->bngs", q, keys) * c.head_dim**-0.5
        s = jnp.where(allowed_BS[:, None, None], s, jnp.finfo(jnp.float32).min)
        o = jnp.einsum(f"bngs,{sub}->bngk", jax.nn.softmax(s, -1), values)
        o = o.reshape(o.shape[0], c.num_heads, c.head_dim)
        h_BD = h_BD + jnp.einsum("bhk,hkd->bd", o, w["attn"]["o"]["kernel"])
        x = rms(h_BD, w["mlp_norm"]["scale"])
        mlp = w["mlp"]
        g = jax.nn.silu(x @ mlp["gate"]["kernel"]) * (x @ mlp["up"]["kernel"])
        return h_BD + g @ mlp["down"]["kernel"]

    def generate(params, tokens_BP, mask_BP, key):
        cache = models.init_cache(c, batch, total)
        mask = mask_BP.astype(bool)
        hidden, cache = models.forward(params, c, tokens_BP, prompt_positions(mask), mask, cache)
        cache_k, cache_v = cache.k, cache.v
        if bnsk:
            cache_k, cache_v = cache_k.swapaxes(2, 3), cache_v.swapaxes(2, 3)
        if per_layer:
            cache_k, cache_v = tuple(cache_k), tuple(cache_v)
        logits = models.lm_logits(params, c, hidden[:, -1:])[:, 0]
        first_B = jnp.sum(mask, -1, dtype=jnp.int32)
        keys = jax.random.split(key, new)
        token0 = _first_argmax(jax.random.gumbel(keys[0], logits.shape) + logits)
        stacked = params["layers"]
        weights = [jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(n_layers)]

        def step(carry, inputs):
            ck, cv, kv_mask, token_B = carry
            key_t, t = inputs
            slot = prompt_len + t - 1
            kv_mask = lax.dynamic_update_slice(kv_mask, jnp.ones((batch, 1), bool), (0, slot))
            allowed = kv_mask & (jnp.arange(total) <= slot)[None]
            rope = _rope(c, (first_B + t - 1)[:, None])
            h = params["embed"]["embedding"][token_B]

            def one(i, h, ck, cv):
                out = {}

                def read_write(k, v):
                    if per_layer:
                        at = (0, 0, slot, 0)
                        nk, nv = list(ck), list(cv)
                        nk[i] = lax.dynamic_update_slice(ck[i], k[:, :, None], at)
                        nv[i] = lax.dynamic_update_slice(cv[i], v[:, :, None], at)
                        out["k"], out["v"] = tuple(nk), tuple(nv)
                        return nk[i], nv[i]
                    if bnsk:
                        k, v, at = k[None, :, :, None], v[None, :, :, None], (i, 0, 0, slot, 0)
                    else:
                        k, v, at = k[None, :, None], v[None, :, None], (i, 0, slot, 0, 0)
                    out["k"] = lax.dynamic_update_slice(ck, k, at)
                    out["v"] = lax.dynamic_update_slice(cv, v, at)
                    return out["k"][i], out["v"][i]

                w = weights[i] if isinstance(i, int) else jax.tree.map(lambda x: x[i], stacked)
                h = layer(w, h, rope, allowed, read_write)
                return h, out["k"], out["v"]

            if unroll:
                for i in range(n_layers):
                    h, ck, cv = one(i, h, ck, cv)
            else:

                def body(carry, i):
                    return one(i, *carry), None

                (h, ck, cv), _ = lax.scan(body, (h, ck, cv), jnp.arange(n_layers))
            logits = rms(h, params["final_norm"]["scale"]) @ params["lm_head"]["kernel"]
            token_B = _first_argmax(jax.random.gumbel(key_t, logits.shape) + logits)
            return (ck, cv, kv_mask, token_B), token_B

        kv_mask = jnp.concatenate([mask, jnp.zeros((batch, new), bool)], 1)
        steps = (keys[1:], jnp.arange(1, new, dtype=jnp.int32))
        _, tokens_TB = lax.scan(step, (cache_k, cache_v, kv_mask, token0), steps)
        return jnp.concatenate([token0[:, None], tokens_TB.T], 1)

    return jax.jit(generate)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    config = models.ModelConfig(
        family="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=2048,
    )
    params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
    b, pl = args.batch, args.prompt_len
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, args.vocab, (b, pl)), jnp.int32)
    mask = jnp.ones((b, pl), jnp.int32)
    key = jax.random.key(1)
    lengths = (args.new_tokens, 2 * args.new_tokens)
    fns = {}
    for n in lengths:
        sampling = rlhf_jax.SamplingConfig(max_new_tokens=n, stop_token_ids=(), pad_token_id=0)
        lib = jax.jit(rlhf_jax.generate, static_argnums=(1, 5))
        lib = lib.lower(params, config, tokens, mask, key, sampling).compile()
        fns[(n, "library")] = lambda lib=lib: lib(params, tokens, mask, key).tokens
        reference = np.asarray(fns[(n, "library")]())
        for name, kw in VARIANTS.items():
            fn = make_generate(config, b, pl, n, **kw)
            fn = fn.lower(params, tokens, mask, key).compile()
            fns[(n, name)] = lambda fn=fn: fn(params, tokens, mask, key)
            same = np.mean(np.asarray(fns[(n, name)]()) == reference)
            print(f"N={n} {name}: fraction of tokens equal to the library's: {same:.3f}")
    cpu: dict = {}
    times = common.time_interleaved(fns, repeats=args.repeats, warmup=1, cpu_out=cpu)
    med = {k: common.median(v) for k, v in times.items()}
    fast = {k: min(v) for k, v in times.items()}
    n1, n2 = lengths
    cpu_med = {k: common.median(v) for k, v in cpu.items()}
    print(f"\nwall median (fastest) [process CPU median] of {args.repeats} interleaved repeats")
    print(f"B={b} P={pl} N={n1}; ms/token is wall")
    head = f"{'variant':<16}{'ms/token N':>12}{'ms/token 2N':>13}{'vs library':>25}{'2N/N':>21}"
    print(head)
    results: dict = {}
    for name in ("library", *VARIANTS):
        per1 = med[(n1, name)] / n1 * 1e3
        per2 = med[(n2, name)] / n2 * 1e3
        speed = med[(n1, "library")] / med[(n1, name)]
        speed_fast = fast[(n1, "library")] / fast[(n1, name)]
        lin, lin_fast = med[(n2, name)] / med[(n1, name)], fast[(n2, name)] / fast[(n1, name)]
        speed_cpu = cpu_med[(n1, "library")] / cpu_med[(n1, name)]
        lin_cpu = cpu_med[(n2, name)] / cpu_med[(n1, name)]
        results[name] = dict(ms_per_step_n=per1, ms_per_step_2n=per2, speedup=speed)
        results[name] |= dict(speedup_fastest=speed_fast, speedup_cpu=speed_cpu)
        results[name] |= dict(linearity=lin, linearity_fastest=lin_fast, linearity_cpu=lin_cpu)
        print(
            f"{name:<16}{per1:>12.2f}{per2:>13.2f}"
            f"{speed:>8.2f}x ({speed_fast:.2f}) [{speed_cpu:.2f}]"
            f"{lin:>8.2f} ({lin_fast:.2f}) [{lin_cpu:.2f}]"
        )
    if args.json:
        common.write_json(args.json, "decode_variants", vars(args), results)


if __name__ == "__main__":
    main()
