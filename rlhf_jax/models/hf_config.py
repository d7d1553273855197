"""Hugging Face config <-> `ModelConfig`, both ways, for every supported family.

Gemma 3 checkpoints come as a text decoder (`gemma3_text`: `Gemma3ForCausalLM`,
`Gemma3TextForSequenceClassification`) or inside the multimodal `gemma3` config
(`Gemma3ForConditionalGeneration`, `Gemma3ForSequenceClassification`), whose `text_config` we
read; the vision tower is ignored. Both map to family "gemma3" and are exported as the text
decoder. Anything that would change the computation and that we do not implement (an unknown
rope type or layer type, bidirectional attention, cross attention) is a ValueError naming the
field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_jax.models.config import LAYER_TYPES, ModelConfig, freeze_rope_scaling

if TYPE_CHECKING:  # imported where used: transformers adds seconds to every process start
    import transformers

# HF model_type -> family.
_FAMILY = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",  # multimodal: the text decoder of its text_config
}
_ARCH_STEM = {
    "gpt2": "GPT2",
    "gpt_neox": "GPTNeoX",
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma2",
    "gemma3": "Gemma3",
}
_GEMMA3_MULTIMODAL_LM = "Gemma3ForConditionalGeneration"


def architecture(family: str, head: str) -> str:
    """The transformers class name we export a family's causal LM ("lm") or sequence classifier
    ("score") as."""
    stem = _ARCH_STEM[family]
    if family == "gemma3" and head == "score":
        return "Gemma3TextForSequenceClassification"
    if head == "score":
        return f"{stem}ForSequenceClassification"
    return "GPT2LMHeadModel" if family == "gpt2" else f"{stem}ForCausalLM"


def _heads(family: str) -> dict[str, str]:
    """Architectures we load for a family -> head."""
    heads = {architecture(family, h): h for h in ("lm", "score")}
    if family == "gemma3":
        heads |= {_GEMMA3_MULTIMODAL_LM: "lm", "Gemma3ForSequenceClassification": "score"}
    return heads


def _rope_from_hf(hf: Any) -> tuple[float, float, tuple | None]:
    """(rope_theta, rotary_pct, frozen rope_scaling) from a transformers 4 or 5 config."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:  # transformers 4
        params = getattr(hf, "rope_scaling", None) or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer rope parameters are not supported: {params}")
    theta = params.get("rope_theta") or getattr(hf, "rope_theta", None)
    theta = theta or getattr(hf, "rotary_emb_base", 10000.0)
    pct = params.get("partial_rotary_factor") or getattr(hf, "rotary_pct", None)
    return float(theta), float(pct or 1.0), freeze_rope_scaling(params)


def _gemma3_rope_from_hf(hf: Any) -> dict[str, Any]:
    """Gemma 3's global RoPE (`full_attention`: theta and scaling) and local base
    (`sliding_attention`: plain RoPE only), from a transformers 4 or 5 text config."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:  # transformers 4: rope_theta, rope_scaling, rope_local_base_freq
        full = dict(getattr(hf, "rope_scaling", None) or {})
        full["rope_theta"] = getattr(hf, "rope_theta", 1_000_000.0)
        sliding = {"rope_theta": getattr(hf, "rope_local_base_freq", 10_000.0)}
    else:
        full = dict(params.get("full_attention") or {})
        sliding = dict(params.get("sliding_attention") or {})
    local_type = sliding.get("rope_type") or sliding.get("type") or "default"
    if local_type != "default":
        raise ValueError(
            f"gemma3: rope_parameters['sliding_attention'] rope_type {local_type!r} is not "
            "supported (local layers use plain RoPE)"
        )
    return dict(
        rope_theta=float(full.get("rope_theta", 1_000_000.0)),
        rotary_pct=float(full.get("partial_rotary_factor") or 1.0),
        rope_scaling=freeze_rope_scaling(full),
        rope_local_theta=float(sliding.get("rope_theta", 10_000.0)),
    )


def _layer_types_from_hf(hf: Any, family: str) -> list[str] | None:
    """The HF per-layer attention kinds, derived as transformers does where a (transformers 4)
    config has no `layer_types`."""
    layer_types = getattr(hf, "layer_types", None)
    if family == "mistral":  # transformers' Mistral slides every layer (it ignores layer_types)
        return None
    if layer_types is not None:
        return list(layer_types)
    n = hf.num_hidden_layers
    if family in ("qwen2", "qwen3"):
        window = hf.sliding_window if getattr(hf, "use_sliding_window", False) else None
        first = getattr(hf, "max_window_layers", n)
        kinds = ["sliding_attention" if window is not None and i >= first else "" for i in range(n)]
    elif family in ("gemma2", "gemma3"):
        pattern = 2 if family == "gemma2" else getattr(hf, "sliding_window_pattern", 6)
        kinds = ["sliding_attention" if (i + 1) % pattern else "" for i in range(n)]
    else:
        return None
    return [kind or "full_attention" for kind in kinds]


def _window_from_hf(hf: Any, family: str) -> dict[str, Any]:
    """`sliding_window` and `layer_types` fields: None/None without sliding layers, layer_types
    None when every layer slides (Mistral)."""
    layer_types = _layer_types_from_hf(hf, family)
    window = getattr(hf, "sliding_window", None)
    if family in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
        window = None
    if layer_types is None:
        if family == "mistral" and window is not None:
            return dict(sliding_window=int(window), layer_types=None)
        return dict(sliding_window=None, layer_types=None)
    for i, kind in enumerate(layer_types):
        if kind not in LAYER_TYPES:
            raise ValueError(
                f"{family}: layer_types[{i}]={kind!r} is not supported; supported: {LAYER_TYPES}"
            )
    local = [kind == "sliding_attention" for kind in layer_types]
    if not any(local):
        return dict(sliding_window=None, layer_types=None)
    if family not in ("qwen2", "qwen3", "gemma2", "gemma3"):
        raise ValueError(f"{family}: sliding_attention layers in layer_types are not supported")
    if window is None:
        raise ValueError(
            f"{family}: layer_types has sliding_attention layers but sliding_window is None"
        )
    return dict(sliding_window=int(window), layer_types=None if all(local) else tuple(layer_types))


def _head(hf: Any, family: str) -> str:
    """The head named by `architectures` ("lm" when there is none)."""
    heads = _heads(family)
    head = "lm"
    for arch in getattr(hf, "architectures", None) or []:
        if arch not in heads:
            raise ValueError(
                f"unsupported architecture {arch!r} for {family}; expected one of {list(heads)}"
            )
        head = heads[arch]
    return head


def _gemma_fields(text: Any, family: str, multimodal_lm: bool) -> dict[str, Any]:
    """The `ModelConfig` fields of a Gemma 2 / Gemma 3 text config."""
    if getattr(text, "use_bidirectional_attention", False):
        raise ValueError(f"{family}: use_bidirectional_attention=True is not supported")
    if family == "gemma2":
        theta, pct, scaling = _rope_from_hf(text)
        rope = dict(rope_theta=theta, rotary_pct=pct, rope_scaling=scaling)
    else:
        rope = _gemma3_rope_from_hf(text)
    attention_bias = bool(getattr(text, "attention_bias", False))
    final_cap = getattr(text, "final_logit_softcapping", None)
    return dict(
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads or text.num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        max_position_embeddings=text.max_position_embeddings,
        positions="rope",
        **rope,
        activation=getattr(text, "hidden_activation", None) or text.hidden_act,
        norm="rmsnorm",
        norm_eps=text.rms_norm_eps,
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        attn_bias=attention_bias,
        attn_out_bias=attention_bias,
        qk_norm=family == "gemma3",
        mlp="gated",
        query_pre_attn_scalar=text.query_pre_attn_scalar,
        # transformers' Gemma 3 applies neither attention soft-capping (never passed to its
        # attention) nor, in Gemma3ForConditionalGeneration, final soft-capping; neither do we.
        attn_logit_softcap=text.attn_logit_softcapping if family == "gemma2" else None,
        final_logit_softcap=None if multimodal_lm else final_cap,
        **_window_from_hf(text, family),
    )


def config_from_hf(hf_config: Any) -> ModelConfig:
    """Maps a transformers config onto `ModelConfig` (*ForSequenceClassification: head "score").

    Raises ValueError for unsupported model types, architectures or features (unknown layer or
    rope types, bidirectional or cross attention).
    """
    hf = hf_config
    family = _FAMILY.get(hf.model_type)
    if family is None:
        raise ValueError(f"unsupported model_type {hf.model_type!r}; supported: {sorted(_FAMILY)}")
    head = _head(hf, family)
    text = hf.text_config if hf.model_type == "gemma3" else hf
    eos = text.eos_token_id
    common = dict(
        family=family,
        vocab_size=text.vocab_size,
        head=head,
        num_labels=hf.num_labels if head == "score" else 1,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        initializer_range=text.initializer_range,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )
    if family in ("gemma2", "gemma3"):
        multimodal_lm = hf.model_type == "gemma3" and head == "lm"
        return ModelConfig(**common, **_gemma_fields(text, family, multimodal_lm))
    if family == "gpt2":
        if getattr(hf, "add_cross_attention", False):
            raise ValueError("gpt2: cross attention is not supported")
        return ModelConfig(
            **common,
            hidden_size=hf.n_embd,
            num_layers=hf.n_layer,
            num_heads=hf.n_head,
            num_kv_heads=hf.n_head,
            head_dim=hf.n_embd // hf.n_head,
            intermediate_size=hf.n_inner or 4 * hf.n_embd,
            max_position_embeddings=hf.n_positions,
            norm="layernorm",
            norm_eps=hf.layer_norm_epsilon,
            positions="learned",
            attn_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            mlp="plain",
            activation=hf.activation_function,
            attn_scale=hf.scale_attn_weights,
            attn_scale_by_inverse_layer=hf.scale_attn_by_inverse_layer_idx,
        )
    theta, pct, scaling = _rope_from_hf(hf)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = dict(
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        positions="rope",
        rope_theta=theta,
        rotary_pct=pct,
        rope_scaling=scaling,
        activation=hf.hidden_act,
        **_window_from_hf(hf, family),
    )
    if family == "gpt_neox":
        bias = bool(getattr(hf, "attention_bias", True))
        return ModelConfig(
            **common,
            **rope,
            num_kv_heads=hf.num_attention_heads,
            norm="layernorm",
            norm_eps=hf.layer_norm_eps,
            parallel_residual=hf.use_parallel_residual,
            attn_bias=bias,
            attn_out_bias=bias,
            mlp_bias=True,
            mlp="plain",
        )
    attn_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **common,
        **rope,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        norm="rmsnorm",
        norm_eps=hf.rms_norm_eps,
        attn_bias=True if family == "qwen2" else attn_bias,
        attn_out_bias=False if family == "qwen2" else attn_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=family == "qwen3",
        mlp="gated",
    )


def _rope_parameters(theta: float, rope_scaling: tuple | None) -> dict[str, Any]:
    """transformers 5 `rope_parameters` of one RoPE (theta and scaling)."""
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in rope_scaling or ()}
    return {"rope_type": "default", **params, "rope_theta": theta}


def _hf_layer_types(config: ModelConfig) -> list[str]:
    return [LAYER_TYPES[int(local)] for local in config.local_layers]


def _float_or_none(value: float | None) -> float | None:
    """transformers' strict config fields take floats, not ints."""
    return None if value is None else float(value)


def _gemma_to_hf(c: ModelConfig) -> dict[str, Any]:
    scalar = c.query_pre_attn_scalar
    kwargs = dict(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        hidden_activation=c.activation,
        rms_norm_eps=c.norm_eps,
        attention_bias=c.attn_bias,
        query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
        sliding_window=c.sliding_window,
        layer_types=_hf_layer_types(c),
        final_logit_softcapping=_float_or_none(c.final_logit_softcap),
        use_bidirectional_attention=False,
    )
    global_rope = _rope_parameters(c.rope_theta, c.rope_scaling)
    if c.family == "gemma2":
        kwargs["attn_logit_softcapping"] = _float_or_none(c.attn_logit_softcap)
        kwargs["rope_parameters"] = global_rope
    else:
        local_rope = {"rope_type": "default", "rope_theta": c.rope_local_theta}
        kwargs["rope_parameters"] = {"full_attention": global_rope, "sliding_attention": local_rope}
    return kwargs


def config_to_hf(config: ModelConfig) -> transformers.PretrainedConfig:
    """The transformers config of `config`'s family (architectures set for the head); Gemma 3 as
    its text decoder (`gemma3_text`)."""
    import transformers

    c = config
    kwargs: dict[str, Any] = dict(
        architectures=[architecture(c.family, c.head)],
        vocab_size=c.vocab_size,
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=c.initializer_range,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        dtype=c.param_dtype,
    )
    if c.head == "score":
        kwargs["num_labels"] = c.num_labels
    if c.family == "gpt2":
        kwargs |= dict(
            n_embd=c.hidden_size,
            n_layer=c.num_layers,
            n_head=c.num_heads,
            n_inner=c.intermediate_size,
            n_positions=c.max_position_embeddings,
            layer_norm_epsilon=c.norm_eps,
            activation_function=c.activation,
            scale_attn_weights=c.attn_scale,
            scale_attn_by_inverse_layer_idx=c.attn_scale_by_inverse_layer,
        )
        return transformers.AutoConfig.for_model(c.family, **kwargs)
    if c.family in ("gemma2", "gemma3"):
        model_type = "gemma3_text" if c.family == "gemma3" else c.family
        return transformers.AutoConfig.for_model(model_type, **kwargs, **_gemma_to_hf(c))
    rope_scaling = None
    if c.rope_scaling is not None:
        rope_scaling = {k: list(v) if isinstance(v, tuple) else v for k, v in c.rope_scaling}
    kwargs |= dict(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        hidden_act=c.activation,
        rope_scaling=rope_scaling,
    )
    if c.family == "gpt_neox":
        kwargs |= dict(
            layer_norm_eps=c.norm_eps,
            rotary_pct=c.rotary_pct,
            rotary_emb_base=c.rope_theta,
            use_parallel_residual=c.parallel_residual,
            attention_bias=c.attn_bias,
        )
        return transformers.AutoConfig.for_model(c.family, **kwargs)
    kwargs |= dict(
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
    )
    if c.family in ("llama", "qwen3"):
        kwargs["attention_bias"] = c.attn_bias
    if c.family == "llama":
        kwargs["mlp_bias"] = c.mlp_bias
    if c.family == "mistral":
        kwargs["sliding_window"] = c.sliding_window
    if c.family in ("qwen2", "qwen3"):
        local = c.local_layers
        kwargs |= dict(use_sliding_window=any(local), sliding_window=c.sliding_window)
        if any(local):
            kwargs |= dict(layer_types=_hf_layer_types(c), max_window_layers=local.index(True))
    return transformers.AutoConfig.for_model(c.family, **kwargs)
