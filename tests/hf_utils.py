"""Tiny random Hugging Face reference models for tests (built locally; nothing is downloaded).

`tiny_hf_model("llama")` gives a 2-layer, hidden-64, 4-head torch model in eval mode whose weights,
norm scales and biases are all random, so a wrong norm, bias or layout shows in the logits.
Special tokens: pad 0, bos 1, eos 2; draw real tokens from `[3, vocab_size)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transformers

VOCAB_SIZE = 128
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    num_labels=1,
)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "gpt_neox": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    "llama": dict(num_key_value_heads=2, tie_word_embeddings=False, attention_bias=False),
    "mistral": dict(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3": dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}
_ROPE_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def tiny_hf_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """A tiny transformers config of `family` (HF model_type), with `overrides` applied."""
    kwargs = dict(_COMMON)
    if family not in ("gpt2", "gpt_neox"):
        kwargs |= _ROPE_SIZES
    kwargs |= _DEFAULTS[family] | overrides
    return transformers.AutoConfig.for_model(family, **kwargs)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """In place: weights ~ N(0, std), norm scales ~ 1 + N(0, 0.2), biases ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(std * noise)


def tiny_hf_model(family: str, head: str = "lm", seed: int = 0, **overrides: Any) -> Any:
    """Random tiny torch model in eval mode (float32, eager attention).

    head "lm" -> *ForCausalLM / GPT2LMHeadModel; "score" -> *ForSequenceClassification (pad id 0).
    """
    config = tiny_hf_config(family, **overrides)
    auto = {
        "lm": transformers.AutoModelForCausalLM,
        "score": transformers.AutoModelForSequenceClassification,
    }[head]
    torch.manual_seed(seed)
    model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    randomize_(model, seed)
    return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as float32 numpy arrays."""
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def torch_logits(
    model: Any,
    tokens_BT: np.ndarray,
    mask_BT: np.ndarray | None = None,
    positions_BT: np.ndarray | None = None,
) -> np.ndarray:
    """`model(...).logits` as float32 numpy (LM: [B, T, V]; sequence classification: [B, L])."""
    kwargs = {"input_ids": torch.as_tensor(np.asarray(tokens_BT), dtype=torch.long)}
    if mask_BT is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(mask_BT), dtype=torch.long)
    if positions_BT is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions_BT), dtype=torch.long)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()
