"""LoRA (Hu et al. 2021) on every family with separate projections, as peft applies it.

A targeted projection computes `y = x W + (alpha / rank) (x A) B` with `A` `[in..., rank]` and `B`
`[rank, out...]` (float32, whatever the base's dtype), unmerged, in the layer that also applies
`W` (`model.Dense`). The adapters are leaves `lora_a` / `lora_b` beside the projection's `kernel`
in the one param tree of a model whose `ModelConfig.lora` is set (stacked over layers like the
kernels, with their own logical axes: `A` keeps the kernel's input axes, `B` its output axes), so
every forward, scan, cache, sharding rule and checkpoint handles them without a second path.

- `split(params, lora)` -> `(trainable, frozen)`: the adapters (and the modules named in
  `LoRAConfig.train_modules`, e.g. a value model's new score head) vs the base. Gradients, the
  gradient accumulator and the optimiser state cover only `trainable`; `join` puts them back.
- `base(params)`: the params without adapters: the same forward as the base model (the policy's
  frozen reference when LoRA is on; no second copy of the base exists).
- `merge(params, config)`: the base with `W + (alpha / rank) A B` folded in (export, decode).
- `adapter_to_peft` / `adapter_from_peft`: the adapter in peft's safetensors names and layout.

Initialisation as peft's default: `A` uniform in `±1/sqrt(fan_in)` (kaiming-uniform with
`a = sqrt(5)`), `B` zero, so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]

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


def _is_trainable(path: tuple[str, ...], lora: LoRAConfig) -> bool:
    return path[-1] in ADAPTER_KEYS or path[0] in lora.train_modules


def split(params: Params, lora: LoRAConfig | None) -> tuple[Params, Params | None]:
    """`(trainable, frozen)` halves of a LoRA model's params (nested dicts; `join` inverts it).
    Without LoRA everything is trainable and `frozen` is None."""
    if lora is None:
        return params, None
    flat = flax.traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if _is_trainable(k, lora)}
    frozen = {k: v for k, v in flat.items() if not _is_trainable(k, lora)}
    unflatten = flax.traverse_util.unflatten_dict
    return unflatten(trainable), unflatten(frozen)


def join(trainable: Params, frozen: Params | None) -> Params:
    """The whole param tree from `split`'s halves."""
    if frozen is None:
        return trainable
    flat = flax.traverse_util.flatten_dict(frozen)
    flat.update(flax.traverse_util.flatten_dict(trainable))
    return flax.traverse_util.unflatten_dict(flat)


def base(params: Params) -> Params:
    """`params` without adapters (same arrays): the base model's forward."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k[-1] not in ADAPTER_KEYS}
    )


def has_adapters(params: Params) -> bool:
    return any(k[-1] in ADAPTER_KEYS for k in flax.traverse_util.flatten_dict(params))


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """`A B` in the kernel's shape (`A` `[L, in..., r]`, `B` `[L, r, out...]`), float32."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    layers, r = a.shape[0], a.shape[-1]
    product = jnp.matmul(a.reshape(layers, -1, r), b.reshape(layers, r, -1))
    return product.reshape(a.shape[:-1] + b.shape[2:])


def merge(params: Params, config: Any) -> Params:
    """The base params with every adapter folded into its kernel, `W + (alpha / r) A B`
    (computed and stored in float32: in a 16-bit kernel most of a fine-tuning update would round
    away); no adapter leaves remain."""
    lora = config.lora
    if lora is None or not has_adapters(params):
        return params
    out = base(params)
    flat = flax.traverse_util.flatten_dict(out)
    full = flax.traverse_util.flatten_dict(params)
    for name in lora.targets:
        path = TARGETS[name][0]
        if path + ("lora_a",) not in full:
            continue
        kernel = flat[path + ("kernel",)]
        d = delta(full[path + ("lora_a",)], full[path + ("lora_b",)]) * lora.scale
        flat[path + ("kernel",)] = jnp.asarray(kernel, jnp.float32) + d
    return flax.traverse_util.unflatten_dict(flat)


def merged_for_decode(params: Params, config: Any) -> tuple[Params, Any]:
    """`(params, config)` to sample from: the adapters merged into copies of the kernels, stored
    in the kernels' dtype, and the config without LoRA (no-op without adapters)."""
    if config.lora is None:
        return params, config
    merged = merge(params, config)
    kinds = flax.traverse_util.flatten_dict(base(params))
    flat = flax.traverse_util.flatten_dict(merged)
    flat = {k: v.astype(kinds[k].dtype) for k, v in flat.items()}
    return flax.traverse_util.unflatten_dict(flat), dataclasses.replace(config, lora=None)


# ------------------------------------------------------------------------------------- peft


def _peft_prefix(config: Any) -> str:
    from rlhf_jax.models.hf import _PREFIX

    return f"base_model.model.{_PREFIX[config.family]}.layers"


def peft_config(config: Any, base_model_name_or_path: str | None) -> dict[str, Any]:
    """peft's `adapter_config.json` for the adapters of `config` (a `ModelConfig` with `lora`)."""
    lora = config.lora
    modules = [TRAIN_MODULES[m] for m in lora.train_modules]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if config.head == "lm" else "SEQ_CLS",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(TARGETS[t][2].split(".")[-1] for t in lora.targets),
        "modules_to_save": modules or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_to_peft(params: Params, config: Any) -> dict[str, np.ndarray]:
    """peft's tensors (`adapter_model.safetensors` names, torch `[out, in]` layouts) of the
    adapters and trained modules in `params`."""
    from rlhf_jax.models.hf import _get, params_to_hf

    lora = config.lora
    host = jax.device_get(params)
    prefix = _peft_prefix(config)
    out: dict[str, np.ndarray] = {}
    for name in lora.targets:
        path, _, hf = TARGETS[name]
        node = _get(host, path)
        a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
        r = a.shape[-1]
        for i in range(a.shape[0]):
            out[f"{prefix}.{i}.{hf}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[f"{prefix}.{i}.{hf}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    modules = list(lora.train_modules)
    if modules:
        base_config = dataclasses.replace(config, lora=None)
        tensors = params_to_hf(base(host), base_config)
        for module in modules:
            hf = TRAIN_MODULES[module]
            for key, value in tensors.items():
                parts = key.split(".")
                if hf in parts and parts[-1] == "weight":
                    out[f"base_model.model.{key}"] = np.asarray(value, np.float32)
    return out


def adapter_from_peft(
    tensors: dict[str, Any], adapter_config: dict[str, Any], config: Any
) -> tuple[Params, Any]:
    """Adapters (and trained modules) of a peft LoRA directory as a partial param tree for
    `config`'s base model, with `config` given the adapter's `LoRAConfig`. Checks the adapter's
    shapes against the model; raises ValueError naming the first mismatch."""
    from rlhf_jax.models.hf import _get, _param_shapes

    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type={adapter_config.get('peft_type')!r}")
    for option in ("use_dora", "use_rslora"):
        if adapter_config.get(option):
            raise ValueError(f"the adapter uses {option}, which rlhf_jax does not implement")
    targets = adapter_config.get("target_modules") or ()
    if isinstance(targets, str):
        raise ValueError(f"target_modules={targets!r} (a regex) is not supported; list the names")
    saved = adapter_config.get("modules_to_save") or ()
    modules = [m for m, hf in TRAIN_MODULES.items() if hf in saved]
    lora = LoRAConfig(
        rank=int(adapter_config["r"]),
        alpha=float(adapter_config.get("lora_alpha", adapter_config["r"])),
        targets=tuple(targets),
        train_modules=tuple(modules),
        dropout=0.0,
    )
    config = dataclasses.replace(config, lora=lora)
    check_family(config)
    expected = _param_shapes(config)
    prefix = _peft_prefix(config)
    names = {k.replace(".default", ""): v for k, v in tensors.items()}
    adapters: dict[tuple[str, ...], Any] = {}
    for name in lora.targets:
        path, _, hf = TARGETS[name]
        shape_a = _get(expected, path + ("lora_a",)).shape
        shape_b = _get(expected, path + ("lora_b",)).shape
        layers_a, layers_b = [], []
        for i in range(config.num_layers):
            key_a, key_b = f"{prefix}.{i}.{hf}.lora_A.weight", f"{prefix}.{i}.{hf}.lora_B.weight"
            if key_a not in names or key_b not in names:
                raise ValueError(f"the adapter has no {key_a} / {key_b}")
            a_w, b_w = np.asarray(names[key_a], np.float32), np.asarray(names[key_b], np.float32)
            want_a = (lora.rank, int(np.prod(shape_a[1:-1])))
            want_b = (int(np.prod(shape_b[2:])), lora.rank)
            if a_w.shape != want_a or b_w.shape != want_b:
                raise ValueError(
                    f"adapter tensor shapes {a_w.shape} / {b_w.shape} of {hf} in layer {i} do not "
                    f"fit this model (expected {want_a} / {want_b}): the adapter was trained on a "
                    "different base model"
                )
            layers_a.append(a_w.T.reshape(shape_a[1:]))
            layers_b.append(b_w.T.reshape(shape_b[1:]))
        adapters[path + ("lora_a",)] = np.stack(layers_a)
        adapters[path + ("lora_b",)] = np.stack(layers_b)
    if modules:
        hf_names = {k.removeprefix("base_model.model."): v for k, v in names.items()}
        hf_names = {k.replace(".modules_to_save", ""): v for k, v in hf_names.items()}
        base_config = dataclasses.replace(config, lora=None)
        for module in modules:
            wanted = {k: v for k, v in hf_names.items() if TRAIN_MODULES[module] in k.split(".")}
            part = _modules_from_hf(wanted, base_config, module)
            adapters.update(flax.traverse_util.flatten_dict({module: part}))
    return flax.traverse_util.unflatten_dict(adapters), config


def _modules_from_hf(tensors: dict[str, Any], config: Any, module: str) -> Params:
    from rlhf_jax.models.hf import _expected_specs, _get, _param_shapes

    shapes = _param_shapes(config)
    out = {}
    for spec in _expected_specs(config, shapes):
        if spec.paths[0][0] != module or "{i}" in spec.hf:
            continue
        if spec.hf not in tensors:
            raise ValueError(f"the adapter's modules_to_save has no {spec.hf}")
        value = np.asarray(tensors[spec.hf], np.float32)
        (leaf,) = spec.to_params(value)
        want = _get(shapes, spec.paths[0]).shape
        if leaf.shape != want:
            raise ValueError(
                f"{spec.hf} has shape {value.shape}, this model's {module} needs {want}: the "
                "adapter was trained on a different base model"
            )
        out[spec.paths[0][1]] = leaf
    return out


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_peft(
    path: str | Any, params: Params, config: Any, *, base_model_name_or_path: str | None = None
) -> None:
    """Writes a peft adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
    that `peft.PeftModel.from_pretrained(base_model, path)` loads."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    if config.lora is None:
        raise ValueError("save_peft: the model config has no lora section")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = adapter_to_peft(params, config)
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    adapter_config = peft_config(config, base_model_name_or_path)
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")


def load_peft(path: str | Any, config: Any) -> tuple[Params, Any]:
    """A peft LoRA adapter directory as `(adapter params, config with its LoRAConfig)` for the
    base model `config` (see `adapter_from_peft`; `join(adapters, base_params)` gives the model).
    Raises ValueError when the directory is not a LoRA adapter or does not fit the model."""
    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise ValueError(f"{path} is not a peft adapter directory (no {ADAPTER_CONFIG})")
    adapter_config = json.loads((path / ADAPTER_CONFIG).read_text())
    files = [path / ADAPTER_WEIGHTS] if (path / ADAPTER_WEIGHTS).exists() else []
    if not files:
        raise ValueError(f"{path} has no {ADAPTER_WEIGHTS}")
    return adapter_from_peft(load_file(str(files[0])), adapter_config, config)


def adapters_only(tree: Params) -> Params:
    """The `lora_a` / `lora_b` leaves of a param-shaped tree (no trained modules, no base)."""
    flat = flax.traverse_util.flatten_dict(tree)
    return flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k[-1] in ADAPTER_KEYS}
    )
