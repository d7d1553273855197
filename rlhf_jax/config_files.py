"""Dataclass configs <-> YAML files: loading with dotted `key.sub=value` overrides, checking,
writing and comparing.

`load_config(cls, "configs/x.yaml", ["ppo.batch_size=64"])` merges the YAML file and the overrides
onto the dataclass `cls` with OmegaConf structured configs (which check every key and type), then
builds the frozen dataclasses, whose `__post_init__` validate values. Every error is a
`ConfigError` that names the offending key. Nothing here knows a particular config: the run
configs' sections are in `rlhf_jax.config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


def _describe(err: OmegaConfBaseException) -> str:
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {message}" if key else message


def _dataclass_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _required_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the fields without defaults, recursively."""
    out = []
    for f in dataclasses.fields(cls):
        hint = _dataclass_fields(cls)[f.name]
        no_default = (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        )
        if no_default and dataclasses.is_dataclass(hint):
            out.extend(_required_keys(hint, f"{prefix}{f.name}."))
        elif no_default:
            out.append(f"{prefix}{f.name}")
    return out


def _locate_value_error(node: DictConfig, cls: type, prefix: str) -> tuple[str, Exception] | None:
    """Finds the innermost section whose dataclass rejects its values."""
    for name, hint in _dataclass_fields(cls).items():
        if dataclasses.is_dataclass(hint) and isinstance(node.get(name), DictConfig):
            found = _locate_value_error(node[name], hint, f"{prefix}{name}.")
            if found is not None:
                return found
    try:
        OmegaConf.to_object(node)
    except (ValueError, TypeError) as err:
        return prefix.rstrip(".") or "<top level>", err
    return None


def _strip_optional(hint: Any) -> Any:
    """`X | None` -> `X` when X is the only other member (sections that may be null)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _field_hint(cls: Any, parts: Sequence[str], where: str) -> Any:
    """The type hint of the dotted key `parts` under the dataclass `cls`.

    Raises ConfigError naming the key and the section's keys when a part is not a field. Below a
    field that is not a dataclass (`Any`, a mapping), every key is allowed and `Any` returned.
    """
    hint: Any = cls
    for i, part in enumerate(parts):
        section = _strip_optional(hint)
        if not dataclasses.is_dataclass(section):
            return Any
        fields = _dataclass_fields(section)  # type: ignore[arg-type]
        if part not in fields:
            name = ".".join(parts[: i + 1])
            raise ConfigError(
                f"{where}{name}: unknown key; {section.__name__} has "  # type: ignore[union-attr]
                + ", ".join(sorted(fields))
            )
        hint = fields[part]
    return hint


def _type_name(hint: Any) -> str:
    """A type hint in words, for error messages: `tuple[int, ...] | None` -> "a list of int or
    null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list) or (isinstance(origin, type) and issubclass(origin, Sequence)):
        inner = args[0] if args else Any
        return f"a list of {_type_name(inner)}"
    if origin is dict or (isinstance(origin, type) and issubclass(origin, Mapping)):
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} section"
    names = {type(None): "null", bool: "true/false", int: "int", float: "float", str: "str"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a parsed YAML value fits a field's type hint (unknown hint kinds accept anything:
    OmegaConf and the dataclass's `__post_init__` still check them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or (isinstance(value, str) and value.startswith("${")):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_conforms, value, args))
        return all(_conforms(v, args[0]) for v in value) if args else True
    if dataclasses.is_dataclass(hint):
        return isinstance(value, Mapping)
    return True


def _check_values(cls: Any, values: Mapping[str, Any], prefix: str, where: str) -> None:
    """Checks every key of a parsed YAML mapping against the dataclass `cls`: unknown keys and
    values that do not fit the field's type are ConfigErrors naming the key and the type."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        hint = _field_hint(cls, [str(key)], where + prefix)
        section = _strip_optional(hint)
        if dataclasses.is_dataclass(section) and isinstance(value, Mapping):
            _check_values(section, value, f"{name}.", where)
        elif not _conforms(value, hint):
            raise ConfigError(f"{where}{name} expects {_type_name(hint)}, got {value!r}")


def _schema(cls: type) -> DictConfig:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    return OmegaConf.structured(cls)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
) -> T:
    """Builds a frozen config dataclass from a YAML file, a mapping and dotted overrides.

    Args:
      cls: the config dataclass (nested dataclasses become YAML sections).
      path: YAML file (optional).
      overrides: `"key.sub=value"` strings applied in order after the file (values are parsed as
        YAML: `ppo.stop_token_ids=[0,2]`, `models.value=null`).
      values: a mapping merged after the file and before the overrides.
    Returns:
      An instance of `cls`.
    Raises:
      ConfigError: unreadable file, unknown key, wrong type, missing required value or a value a
        dataclass rejects; the message names the key.
    """
    merged = _schema(cls)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            file_cfg = OmegaConf.load(path)
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot parse {path}: {err}") from err
        except OmegaConfBaseException as err:  # valid YAML that OmegaConf cannot hold
            plain = yaml.safe_load(path.read_text())
            if isinstance(plain, Mapping):
                _check_values(cls, plain, "", f"{path}: ")  # names the key and its type
            raise ConfigError(f"cannot parse {path}: {_describe(err)}") from err
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of sections, got a list")
        _check_values(cls, OmegaConf.to_container(file_cfg), "", f"{path}: ")
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_describe(err)}") from err
    if values:
        _check_values(cls, dict(values), "", "")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(dict(values)))
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err)) from err
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            yaml.safe_load(raw)  # syntax only: OmegaConf's loader below also reads 1e-5 as a float
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                f"{key}=\"['?']\""
            ) from err
        hint = _field_hint(cls, key.split("."), f"override {item!r}: ")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as err:
            raise ConfigError(
                f"override {item!r}: {key} expects {_type_name(hint)}, got {raw.strip()!r}"
            ) from err
        _check_values(cls, parsed, "", f"override {item!r}: ")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(parsed))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {_describe(err)}") from err
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        hints = dict(_dataclass_fields(cls))
        needed = []
        for key in missing:
            hint = hints.get(key)
            if hint is not None and dataclasses.is_dataclass(hint):
                needed.extend(_required_keys(hint, f"{key}."))
            else:
                needed.append(key)
        raise ConfigError(
            "missing required value(s): " + ", ".join(needed) + " (set them in the YAML file or "
            "as key=value overrides)"
        )
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from err
    except (ValueError, TypeError) as err:
        found = _locate_value_error(merged, cls, "")
        where, cause = found if found is not None else ("<config>", err)
        raise ConfigError(f"{where}: {cause}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain nested dicts/lists (JSON- and YAML-safe)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def to_yaml(config: Any) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal object."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, path: str | Path) -> None:
    """Writes `to_yaml(config)` to `path`."""
    Path(path).write_text(to_yaml(config))


def diff_configs(a: Any, b: Any, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs of the same class (for resume
    checks); keys starting with any prefix in `ignore` are skipped."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out |= flat(v, f"{prefix}{k}.")
            return out
        return {prefix[:-1]: d}

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k) != fb.get(k) and not any(k.startswith(p) for p in ignore)]
