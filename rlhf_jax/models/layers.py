"""The weight layers of the decoder LM: `Dense` (a projection over any number of input axes, with
unmerged LoRA adapters when `ModelConfig.lora` targets it) and `Norm` (LayerNorm or RMSNorm, in
float32). Params carry logical axis names (`nn.with_logical_partitioning`) for the sharding rules.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.lora_config import a_init

_F32 = jnp.float32


class Dense(nn.Module):
    """`y = x @ kernel (+ bias)`, contracting the last `in_dims` axes of x.

    The kernel has shape `x.shape[-in_dims:] + features` and logical axes `axes`; the bias has
    shape `features` and the trailing `len(features)` axis names. Inputs and kernel are cast to
    the compute dtype; `float32_out` (the LM and score heads) accumulates and returns float32, so
    bfloat16 logits, values and scores are not rounded before the log-softmax or the loss.
    """

    config: ModelConfig
    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    use_bias: bool
    in_dims: int = 1
    float32_out: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.axes),
            x.shape[x.ndim - self.in_dims :] + self.features,
            c.params_dtype,
        )
        dtype = c.compute_dtype
        # One 2-D matmul [rows, in] x [in, out]: with several contracted or leading axes, the
        # weight gradient becomes a multi-axis contraction that XLA:CPU lowers through a
        # transposing copy fused with the elementwise producer (2x slower backward).
        lead, contract = x.shape[: x.ndim - self.in_dims], kernel.shape[: self.in_dims]
        x_2d = x.astype(dtype).reshape(-1, int(np.prod(contract)))
        kernel_2d = kernel.astype(dtype).reshape(x_2d.shape[1], -1)
        out = _F32 if self.float32_out else None
        y = jnp.dot(x_2d, kernel_2d, preferred_element_type=out)
        lora = c.lora
        if (
            lora is not None
            and self.name in lora.targets
            and (self.is_initializing() or self.has_variable("params", "lora_a"))
        ):  # unmerged LoRA: y += (alpha / r) (x A) B; adapters float32, applied in compute dtype
            in_axes, out_axes = self.axes[: self.in_dims], self.axes[self.in_dims :]
            a = self.param(
                "lora_a",
                nn.with_logical_partitioning(a_init(x_2d.shape[1]), in_axes + (None,)),
                contract + (lora.rank,),
                jnp.float32,
            )
            b = self.param(
                "lora_b",
                nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_axes),
                (lora.rank,) + self.features,
                jnp.float32,
            )
            xa = jnp.dot(x_2d, a.astype(dtype).reshape(x_2d.shape[1], lora.rank))
            xab = jnp.dot(xa, b.astype(dtype).reshape(lora.rank, -1), preferred_element_type=out)
            y = y + (lora.scale * xab).astype(y.dtype)
        y = y.reshape(lead + self.features)
        if self.use_bias:
            bias_axes = self.axes[len(self.axes) - len(self.features) :]
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                self.features,
                c.params_dtype,
            )
            y = y + bias.astype(y.dtype)
        return y


class Norm(nn.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale) over the last axis, computed in float32.

    With `norm_plus_one` (Gemma) the scale is stored as `weight - 1`: zero-initialised, applied
    as `1 + scale`."""

    config: ModelConfig
    kind: str
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        shape = (x.shape[-1],)
        axes = (self.axis_name,)
        init = nn.initializers.zeros if c.norm_plus_one else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, axes), shape, c.params_dtype)
        x = x.astype(_F32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + c.norm_eps)
        y = y * (1.0 + scale.astype(_F32) if c.norm_plus_one else scale.astype(_F32))
        if self.kind == "layernorm":
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, axes),
                shape,
                c.params_dtype,
            )
            y = y + bias.astype(_F32)
        return y.astype(c.compute_dtype)
