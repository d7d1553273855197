"""Fused attention kernels (`rlhf_jax.models.attention`, issue #25 item 7) against the XLA path.

The TPU flash kernel runs here in Pallas' TPU interpret mode (`force_tpu_interpret_mode`: the
kernel's own program, executed on the CPU), unsharded and under `shard_map` on a 2x2x2 mesh; the
cuDNN call is checked through the same `jax.nn.dot_product_attention` wrapper on its XLA
implementation (cuDNN itself needs a GPU). Interpret mode's callbacks cannot run under
`jax.checkpoint`, so these models use `remat="none"`. Which path a config takes on each backend
is checked too; the TPU compiler's memory figures are in `benchmarks/README.md`.

The interpret-mode checks run in a child process under a timeout: Pallas' TPU interpreter drives
each kernel through host callbacks, and on this 2-core host, while the other test worker kept
both cores busy, an eager dispatch twice waited forever behind an interpreted kernel (in a
worker and in a fresh child process). A check that times out runs again in a fresh process (up
to four times); a wrong value fails at once. They are in the slow set (CI runs it too), so a hang
does not push the README's test command past 10 minutes.
"""

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from tolerances import GRADIENT, MODEL, assert_f32_close

from rlhf_jax import models
from rlhf_jax import sharding as sh
from rlhf_jax.models import attention

CONFIG = models.ModelConfig(
    family="llama",
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=64,
    attention="xla",
    remat="none",
)
B, T = 4, 12


def batch():
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, CONFIG.vocab_size)
    mask = np.ones((B, T), bool)
    mask[0, :3] = False  # left padding
    mask[2, 9:] = False  # right padding
    mask = jnp.asarray(mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return tokens, positions, mask


def real_rows(x, mask):
    return jnp.where(mask[..., None], x, 0)


def loss(params, config, tokens, positions, mask):
    hidden, _ = models.forward(params, config, tokens, positions, mask)
    return jnp.sum(real_rows(hidden, mask) ** 2)


def _isolated(check: str, *args, devices: int = 1) -> None:
    """Runs `check(*args)` of this module in a fresh Python process with `devices` CPU devices
    and synchronous CPU dispatch; runs it again (up to four times) when it hangs past the
    timeout (a check takes 5-15 s on a 2-core host)."""
    here = Path(__file__).resolve().parent
    code = (
        f"import sys; sys.path.insert(0, {str(here)!r}); import test_attention as t; "
        f"t.{check}(*{args!r})"
    )
    flags = os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8",
        f"--xla_force_host_platform_device_count={devices}",
    )
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false"}
    for attempt in range(4):
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
                cwd=here.parent,
            )
        except subprocess.TimeoutExpired:
            if attempt == 3:
                pytest.fail(f"{check}{args} hung four times in Pallas' TPU interpreter")
            continue
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return


@pytest.mark.slow  # a hang costs a timeout: kept out of the README's 10-minute command
@pytest.mark.parametrize("scan", [False, True])
def test_flash_kernel_equals_xla_attention(scan):
    _isolated("check_flash_kernel_equals_xla_attention", scan)


def check_flash_kernel_equals_xla_attention(scan):
    config = dataclasses.replace(CONFIG, scan_layers=scan)
    params = models.init_params(config, jax.random.key(0))
    tokens, positions, mask = batch()
    want, _ = models.forward(params, config, tokens, positions, mask)
    want_grads = jax.grad(loss)(params, config, tokens, positions, mask)
    flash = dataclasses.replace(config, attention="flash")
    with pltpu.force_tpu_interpret_mode():
        got, _ = models.forward(params, flash, tokens, positions, mask)
        grads = jax.grad(loss)(params, flash, tokens, positions, mask)
    assert_f32_close(real_rows(got, mask), real_rows(want, mask), ulps=MODEL)
    assert_f32_close(grads, want_grads, ulps=GRADIENT, per_leaf=True)


@pytest.mark.slow
def test_flash_kernel_under_shard_map_on_a_mesh():
    """On 2x2x2 the kernel runs per shard (rows over data x fsdp, heads over tensor) inside a
    `shard_map`, with the same values as the unsharded XLA path."""
    _isolated("check_flash_kernel_under_shard_map_on_a_mesh", devices=8)


def check_flash_kernel_under_shard_map_on_a_mesh():
    config = dataclasses.replace(CONFIG, scan_layers=True)
    params = models.init_params(config, jax.random.key(0))
    tokens, positions, mask = batch()
    want, _ = models.forward(params, config, tokens, positions, mask)
    flash = dataclasses.replace(config, attention="flash")
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    fn = jax.jit(lambda p, t, pos, m: models.forward(p, flash, t, pos, m)[0])
    with pltpu.force_tpu_interpret_mode(), sh.with_rules(mesh):
        assert "manual_computation" in fn.lower(params, tokens, positions, mask).as_text()
        got = fn(params, tokens, positions, mask)
    assert_f32_close(real_rows(got, mask), real_rows(want, mask), ulps=MODEL)


def test_cudnn_wrapper_equals_xla_attention():
    """`jax.nn.dot_product_attention` as the cuDNN path calls it (causal, key mask, grouped kv
    heads, scale), on its XLA implementation, equals `attention.attend` on the real queries."""
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (B, T, 4, 8))
    k, v = (jax.random.normal(key, (B, T, 2, 8)) for key in keys[1:])
    _, _, mask = batch()
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]
    want = attention.attend(q, k, v, allowed, 8**-0.5)
    got = attention.fused_attention("cudnn-xla", q, k, v, mask, 8**-0.5)
    m = mask[..., None, None]
    assert_f32_close(jnp.where(m, got, 0), jnp.where(m, want, 0), ulps=MODEL)


def test_which_path_each_backend_takes():
    auto = dataclasses.replace(CONFIG, attention="auto")
    bf16 = dataclasses.replace(auto, dtype="bfloat16")
    assert attention.kernel_for(auto) is None  # this CPU
    assert attention.kernel_for(auto, "tpu") == "flash"
    assert attention.kernel_for(bf16, "gpu") == "cudnn"
    assert attention.kernel_for(auto, "gpu") is None  # cuDNN's fused attention is 16-bit only
    assert attention.kernel_for(dataclasses.replace(auto, attention="flash")) == "flash"
    assert attention.kernel_for(dataclasses.replace(auto, attention="xla"), "tpu") is None
    # What the kernels cannot express (Gemma 2's soft-cap, sliding windows, GPT-2's per-layer
    # scale) takes the XLA path even when a kernel is asked for.
    plain = dict(
        attention="flash",
        attn_logit_softcap=None,
        has_local_layers=False,
        attn_scale_by_inverse_layer=False,
        compute_dtype=jnp.dtype(jnp.bfloat16),
    )
    assert attention.kernel_for(types.SimpleNamespace(**plain), "tpu") == "flash"
    for unsupported in (
        dict(attn_logit_softcap=50.0),
        dict(has_local_layers=True),
        dict(attn_scale_by_inverse_layer=True),
    ):
        config = types.SimpleNamespace(**(plain | unsupported))
        assert attention.kernel_for(config, "tpu") is None, unsupported
    with pytest.raises(ValueError, match="attention='pallas' is not one of"):
        dataclasses.replace(auto, attention="pallas")
