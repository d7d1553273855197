"""`ModelConfig`: one frozen, hashable description of every supported decoder LM.

The architecture is described entirely by the flags (norm type, positions, biases, MLP kind, ...);
`family` names the Hugging Face format used for export and is checked against the flags, so every
valid config can be saved as a checkpoint that `transformers` loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rlhf_jax.models.lora_config import LoRAConfig, check_family

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
# Attention kinds of `ModelConfig.layer_types` (HF names).
LAYER_TYPES = ("full_attention", "sliding_attention")
# Families whose HF format can express sliding-window layers.
_WINDOW_FAMILIES = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3")
_GEMMA = ("gemma2", "gemma3")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
ROPE_TYPES = ("linear", "dynamic", "llama3")
# Full passes of models with at most this many layers run unrolled (`ModelConfig.scan_layers`).
UNROLL_MAX_LAYERS = 4
REMAT = ("none", "dots", "full")
ATTENTION = ("auto", "xla", "flash", "cudnn")
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _freeze(value: Any) -> Any:
    """Lists become tuples, recursively, so the value is hashable."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def freeze_rope_scaling(rope_scaling: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    """HF `rope_scaling` dict -> sorted tuple of `(key, value)` pairs (None for plain RoPE).

    Accepts the old `type` key for `rope_type`. `rope_theta` and `partial_rotary_factor` (which
    transformers 5 keeps in the same dict) are dropped: they live in `ModelConfig.rope_theta` and
    `ModelConfig.rotary_pct`.
    """
    if not rope_scaling:
        return None
    items = dict(rope_scaling)
    rope_type = items.pop("rope_type", None) or items.pop("type", None) or "default"
    items.pop("type", None)
    items.pop("rope_theta", None)
    items.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return None
    items["rope_type"] = rope_type
    return tuple(sorted((k, _freeze(v)) for k, v in items.items() if v is not None))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture, head and dtypes of a decoder-only LM. Hashable: pass it as a static jit arg.

    Defaults describe a Llama-style model, so a tiny Llama needs only the sizes.

    Attributes:
      family: HF format for export: "gpt2" | "gpt_neox" | "llama" | "mistral" | "qwen2" | "qwen3" |
        "gemma2" | "gemma3" (Gemma 3's text decoder).
      vocab_size, hidden_size, num_layers, intermediate_size: model sizes.
      num_heads, num_kv_heads, head_dim: query heads, key/value heads (GQA when fewer), head size.
      max_position_embeddings: size of the learned position table; for RoPE only carried for
        export and `dynamic` scaling.
      norm: "layernorm" (with bias) or "rmsnorm"; computed in float32.
      norm_eps: epsilon of every norm (including q/k norms).
      norm_plus_one: RMSNorm scales are stored as `weight - 1` (zero-initialised) and applied as
        `1 + weight` (Gemma), in every norm including the q/k norms.
      post_norms: Gemma's sandwich norms: the attention and MLP outputs are normed again
        (`attn_post_norm`, `mlp_post_norm`) before they are added to the residual stream.
      embed_scale: token embeddings are multiplied by `sqrt(hidden_size)`, rounded to the compute
        dtype (Gemma); tied LM logits use the unscaled table.
      positions: "learned" (GPT-2 table) or "rope".
      rope_theta: RoPE base. rotary_pct: fraction of head_dim that is rotated (NeoX 0.25).
      rope_scaling: hashable HF rope scaling (see `freeze_rope_scaling`): rope_type "linear",
        "dynamic" (NTK, recomputed per call from the largest position like transformers) or
        "llama3"; None for plain RoPE.
      rope_local_theta: RoPE base of the sliding-window layers, which then use plain RoPE
        (Gemma 3's `rope_local_base_freq`); None: every layer uses `rope_theta` and
        `rope_scaling`.
      sliding_window: window of the sliding-window layers, in tokens: a query sees itself and
        the `sliding_window - 1` real (mask = 1) tokens before it. None: no window.
      layer_types: per layer "full_attention" or "sliding_attention" (HF `layer_types`); None:
        every layer slides when `sliding_window` is set (Mistral), else none does. The pattern
        is data of the layer scan, so layers of both kinds still run as one `nn.scan`.
      parallel_residual: NeoX `x + attn(ln1(x)) + mlp(ln2(x))` instead of sequential blocks.
      attn_bias: biases on q/k/v. attn_out_bias: bias on the output projection. mlp_bias: biases
        on the MLP projections.
      qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
      mlp: "gated" (`down(act(gate(x)) * up(x))`) or "plain" (`down(act(up(x)))`).
      activation: one of `ACTIVATIONS` (HF names; "gelu" is exact erf, "gelu_new" tanh).
      tie_embeddings: LM logits use the token embedding instead of a separate `lm_head`.
      attn_scale: scale scores by head_dim**-0.5 (GPT-2 `scale_attn_weights`).
      attn_scale_by_inverse_layer: also divide scores by (layer index + 1) (GPT-2).
      query_pre_attn_scalar: scale scores by `query_pre_attn_scalar**-0.5` instead of
        `head_dim**-0.5` (Gemma).
      attn_logit_softcap: attention scores become `tanh(s / cap) * cap` before the mask
        (Gemma 2); None: off.
      final_logit_softcap: LM logits become `tanh(x / cap) * cap` (Gemma 2); None: off.
      head: "lm" (causal LM, `lm_head` unless tied) or "score" (sequence classification `score`).
      num_labels: outputs of the score head.
      dtype: compute dtype; softmax, norms and RoPE angles are float32. param_dtype: params.
      remat: what the backward pass recomputes of each layer: "dots" (default; keep the
        weight-matmul outputs, recompute norms, RoPE, activations and the attention softmax:
        about half the activation memory at no measured cost), "full" (recompute the layer from
        its input: least memory) or "none" (keep every activation). True/False mean
        "full"/"none".
      attention: how a full pass attends (`rlhf_jax.models.attention`): "auto" (default: TPU's
        Pallas flash kernel on TPU, cuDNN's fused attention on GPU in bfloat16/float16, the XLA
        einsum + softmax elsewhere), "xla", "flash" or "cudnn". Cached passes (prefill,
        decode), sliding-window models, soft-capped scores and GPT-2's per-layer scaling always
        take the XLA path.
      scan_layers: run a full pass's layers as one `nn.scan` (True) or as the same scan fully
        unrolled (False); None (default) scans when `num_layers > UNROLL_MAX_LAYERS`. A scan
        keeps compile time flat in depth; unrolled, shallow models avoid the scan's per-layer
        slicing and stacking (4-10% of a PPO iteration of a 2-4-layer model on CPU) and a pass
        asked for a few positions computes only those in its last layer. Params are stacked
        either way.
      initializer_range: std of the normal init of kernels and embeddings.
      pad_token_id, bos_token_id, eos_token_id: carried for export only.
      lora: LoRA adapters on the projections (`rlhf_jax.models.lora_config.LoRAConfig`); None: none.
        The params then hold `lora_a` / `lora_b` beside each targeted kernel.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    positions: str = "rope"
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    parallel_residual: bool = False
    attn_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    mlp: str = "gated"
    activation: str = "silu"
    tie_embeddings: bool = False
    attn_scale: bool = True
    attn_scale_by_inverse_layer: bool = False
    head: str = "lm"
    num_labels: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "dots"
    attention: str = "auto"
    scan_layers: bool | None = None
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    norm_plus_one: bool = False
    post_norms: bool = False
    embed_scale: bool = False
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", freeze_rope_scaling(self.rope_scaling))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.remat, bool):  # true / false of configs written before the names
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"ModelConfig(family={self.family!r}): {msg}")

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                fail(f"{name}={getattr(self, name)!r} is not one of {options}")

        choice("family", FAMILIES)
        choice("norm", ("layernorm", "rmsnorm"))
        choice("positions", ("learned", "rope"))
        choice("mlp", ("gated", "plain"))
        choice("activation", ACTIVATIONS)
        choice("head", ("lm", "score"))
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
            "num_labels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            fail(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.norm_eps <= 0:
            fail(f"norm_eps must be > 0, got {self.norm_eps}")
        for name in ("dtype", "param_dtype"):
            try:
                dt = jnp.dtype(getattr(self, name))
            except TypeError:
                dt = None
            if dt is None or not jnp.issubdtype(dt, jnp.floating):
                fail(f"{name}={getattr(self, name)!r} is not a floating dtype name")
        if self.remat not in REMAT:
            fail(f"remat must be one of {REMAT} (or true / false), got {self.remat!r}")
        choice("attention", ATTENTION)
        if self.positions == "rope":
            if not 0.0 < self.rotary_pct <= 1.0:
                fail(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
            if self.rotary_dim % 2 or self.rotary_dim == 0:
                fail(
                    f"rotary dims int(head_dim * rotary_pct)={self.rotary_dim} must be even and > 0"
                )
            if self.rope_theta <= 0:
                fail(f"rope_theta must be > 0, got {self.rope_theta}")
            self._validate_rope_scaling(fail)
        elif self.rope_scaling is not None or self.rope_local_theta is not None:
            fail("rope_scaling and rope_local_theta need positions='rope'")
        if self.rope_local_theta is not None and self.rope_local_theta <= 0:
            fail(f"rope_local_theta must be > 0, got {self.rope_local_theta}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                fail(f"{name} must be > 0 (or None), got {value!r}")
        self._validate_layer_types(fail)
        self._validate_family(fail)

    def _validate_layer_types(self, fail) -> None:
        window = self.sliding_window
        if window is not None and (
            not isinstance(window, int) or isinstance(window, bool) or window < 1
        ):
            fail(f"sliding_window must be a positive int or None, got {window!r}")
        if self.layer_types is None:
            return
        if len(self.layer_types) != self.num_layers:
            fail(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                fail(f"layer_types[{i}]={kind!r} is not supported; supported: {LAYER_TYPES}")
        if window is None and "sliding_attention" in self.layer_types:
            fail("layer_types has sliding_attention layers but sliding_window is None")

    def _validate_rope_scaling(self, fail) -> None:
        if self.rope_scaling is None:
            return
        params = dict(self.rope_scaling)
        rope_type = params.get("rope_type")
        if rope_type not in ROPE_TYPES:
            fail(f"rope_scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
        missing = [k for k in _ROPE_REQUIRED_KEYS[rope_type] if k not in params]
        if missing:
            fail(f"rope_scaling {rope_type!r} is missing {missing}")
        if params["factor"] <= 0 or (rope_type == "dynamic" and params["factor"] < 1):
            fail(f"rope_scaling factor {params['factor']} is out of range")
        if rope_type == "dynamic" and self.rotary_dim <= 2:
            fail("dynamic rope scaling needs more than 2 rotary dims")

    def _validate_family(self, fail) -> None:
        """Checks that the flags can be expressed in the family's HF checkpoint format."""
        mha = self.num_kv_heads == self.num_heads and self.num_heads * self.head_dim == (
            self.hidden_size
        )
        if self.family == "gpt2":
            expected = dict(positions="learned", norm="layernorm", mlp="plain", attn_bias=True)
            expected |= dict(attn_out_bias=True, mlp_bias=True, parallel_residual=False)
        elif self.family == "gpt_neox":
            expected = dict(positions="rope", norm="layernorm", mlp="plain", mlp_bias=True)
            expected |= dict(attn_out_bias=self.attn_bias)
        else:
            expected = dict(positions="rope", norm="rmsnorm", mlp="gated", parallel_residual=False)
            expected |= dict(rotary_pct=1.0)
            if self.family == "llama":
                expected |= dict(attn_out_bias=self.attn_bias)
            elif self.family == "mistral":
                expected |= dict(attn_bias=False, attn_out_bias=False, mlp_bias=False)
            elif self.family == "qwen2":
                expected |= dict(attn_bias=True, attn_out_bias=False, mlp_bias=False)
            else:  # qwen3, gemma2, gemma3
                expected |= dict(attn_out_bias=self.attn_bias, mlp_bias=False)
        if self.family == "gemma3":
            expected["qk_norm"] = True
        elif self.family != "qwen3":
            expected["qk_norm"] = False
        if self.family != "gpt2":
            expected |= dict(attn_scale=True, attn_scale_by_inverse_layer=False)
        gemma = self.family in _GEMMA
        expected |= dict(norm_plus_one=gemma, post_norms=gemma, embed_scale=gemma)
        if not gemma:
            expected |= dict(query_pre_attn_scalar=None, final_logit_softcap=None)
        if self.family != "gemma2":  # transformers' Gemma 3 never applies attention soft-capping
            expected["attn_logit_softcap"] = None
        if self.family != "gemma3":
            expected["rope_local_theta"] = None
        if self.family not in _WINDOW_FAMILIES:
            expected |= dict(sliding_window=None, layer_types=None)
        if self.family == "mistral":  # one window for every layer
            expected["layer_types"] = None
        for name, value in expected.items():
            if getattr(self, name) != value:
                fail(f"{name}={getattr(self, name)!r} cannot be expressed; expected {value!r}")
        if gemma and self.query_pre_attn_scalar is None:
            fail("query_pre_attn_scalar is required (transformers' Gemma always scales by it)")
        if self.family == "gemma3" and self.rope_local_theta is None:
            fail("rope_local_theta is required (Gemma 3's local layers have their own RoPE base)")
        if gemma and self.hidden_size % self.num_heads:
            fail(f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}")
        if self.family in ("gpt2", "gpt_neox") and not mha:
            fail(
                "needs num_kv_heads == num_heads and num_heads * head_dim == hidden_size, got "
                f"{self.num_kv_heads}, {self.num_heads}, {self.head_dim}, {self.hidden_size}"
            )
        try:
            check_family(self)
        except ValueError as err:
            fail(str(err))

    @property
    def rotary_dim(self) -> int:
        """Number of rotated dims per head (HF `int(head_dim * partial_rotary_factor)`)."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it is a sliding-window ("sliding_attention") layer."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(kind == "sliding_attention" for kind in self.layer_types)

    @property
    def has_local_layers(self) -> bool:
        return any(self.local_layers)

    @property
    def use_scan(self) -> bool:
        """Whether a full pass scans over the layers (see `scan_layers`)."""
        if self.scan_layers is None:
            return self.num_layers > UNROLL_MAX_LAYERS
        return self.scan_layers

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)
