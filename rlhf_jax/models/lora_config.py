"""What a LoRA adapter is (`rlhf_jax.models.lora` works with adapter params): the projections it
may target (`TARGETS`), `LoRAConfig` (part of `ModelConfig`), which families can carry adapters
(`check_family`) and peft's initialisation of `A` (`a_init`, used by `layers.Dense`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

# Our projection names -> (param path, number of input axes of the kernel, HF module name).
TARGETS: dict[str, tuple[tuple[str, ...], int, str]] = {
    "q": (("layers", "attn", "q"), 1, "self_attn.q_proj"),
    "k": (("layers", "attn", "k"), 1, "self_attn.k_proj"),
    "v": (("layers", "attn", "v"), 1, "self_attn.v_proj"),
    "o": (("layers", "attn", "o"), 2, "self_attn.o_proj"),
    "gate": (("layers", "mlp", "gate"), 1, "mlp.gate_proj"),
    "up": (("layers", "mlp", "up"), 1, "mlp.up_proj"),
    "down": (("layers", "mlp", "down"), 1, "mlp.down_proj"),
}
_HF_TARGET = {hf.split(".")[-1]: name for name, (_, _, hf) in TARGETS.items()}
# Modules trained whole next to the adapters (peft's `modules_to_save`): param tree key -> HF.
TRAIN_MODULES = {"embed": "embed_tokens", "lm_head": "lm_head", "score": "score"}
# Families whose projections are separate linear layers (GPT-2 and NeoX fuse q, k and v).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
ADAPTER_KEYS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Which projections carry adapters and how they scale. Hashable (part of `ModelConfig`).

    Attributes:
      rank: adapter rank r (> 0). alpha: scale numerator: the update is `(alpha / rank) x A B`
        (peft's `lora_alpha`; defaults equal peft's, r = alpha = 8).
      targets: projections with adapters, by our names (q, k, v, o, gate, up, down) or HF's
        (q_proj, ..., down_proj), or "all-linear" (every one; the default, as OpenRLHF and verl
        use). A name the model lacks (gate on a plain MLP) is an error.
      train_modules: whole modules trained beside the adapters (peft's `modules_to_save`):
        "embed", "lm_head", "score" (the trainer adds "score" to a LoRA value model: its
        head is new).
      dropout: adapter dropout; only 0 (no dropout, OpenRLHF's and verl's RL default).
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("all-linear",)
    train_modules: tuple[str, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("targets", "train_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if self.dropout != 0:
            raise ValueError(
                f"lora.dropout={self.dropout}: only 0 is supported (RL fine-tuning runs LoRA "
                "without dropout: the rollout policy and the trained one must be the same "
                "function for the importance ratio)"
            )
        names = []
        for target in self.targets:
            if target in ("all-linear", "all"):
                names.extend(TARGETS)
            elif target in TARGETS:
                names.append(target)
            elif target in _HF_TARGET:
                names.append(_HF_TARGET[target])
            else:
                raise ValueError(
                    f"lora.targets: unknown module {target!r}; use 'all-linear' or names from "
                    f"{list(TARGETS)} (or HF's {list(_HF_TARGET)})"
                )
        object.__setattr__(self, "targets", tuple(n for n in TARGETS if n in names))
        for module in self.train_modules:
            if module not in TRAIN_MODULES:
                raise ValueError(
                    f"lora.train_modules: unknown module {module!r}; choose from "
                    f"{list(TRAIN_MODULES)}"
                )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def check_family(config: Any) -> None:
    """Raises ValueError when `config` (a `ModelConfig` with `lora`) cannot carry adapters."""
    lora = config.lora
    if lora is None:
        return
    if config.family not in FAMILIES:
        raise ValueError(
            f"LoRA needs separate q/k/v projections; family {config.family!r} fuses them. "
            f"LoRA supports {FAMILIES}"
        )
    if config.mlp != "gated" and "gate" in lora.targets:
        raise ValueError("lora.targets has 'gate' but this model's MLP has no gate projection")
    for module in lora.train_modules:
        if module == "lm_head" and (config.head != "lm" or config.tie_embeddings):
            raise ValueError("lora.train_modules has 'lm_head' but the model has no separate one")
        if module == "score" and config.head != "score":
            raise ValueError("lora.train_modules has 'score' but the model has no score head")


def a_init(fan_in: int):
    """peft's default `A` init: kaiming-uniform with `a = sqrt(5)`, i.e. U(±1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )
