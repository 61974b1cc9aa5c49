"""Dotted-key overrides and plain-dict conversion for dataclass configs.

``apply_overrides(cfg, ["model.backbone.depth=101", "train.schedule.steps=(8000,11000)"])``
sets fields in place after converting each value to the field's declared type, and names
the key in every error: an unknown key lists the valid ones at that level, and a value that
does not convert says which type was expected. The dataclass's own ``__post_init__``
validation runs again on every object that changed.

Typed variants: a field annotated with dataclasses tagged by a ``kind: Literal[...]`` field
(``mask_head: FCNMaskHeadConfig | RefineMaskHeadConfig | None``) is chosen by tag:
``model.roi_head.mask_head=refinemask`` puts that variant's defaults there (``=none``
removes it where None is allowed), after which its own keys can be set; an unknown tag is
an error listing the allowed choices. In a dict (a saved config) ``"kind"`` picks it.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _variants(annotation: Any) -> dict[str, type] | None:
    """``{tag: class}`` when ``annotation`` is a tagged dataclass or a union of them (None
    aside); None when it is not."""
    origin = typing.get_origin(annotation)
    members = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else ()
    members = tuple(m for m in members if m is not type(None)) or (annotation,)
    tags: dict[str, type] = {}
    for member in members:
        if not dataclasses.is_dataclass(member) or not isinstance(member, type):
            return None
        kind = typing.get_type_hints(member).get("kind")
        if typing.get_origin(kind) is not typing.Literal:
            return None
        for tag in typing.get_args(kind):
            tags[tag] = member
    return tags


def _choices(tags: dict[str, type], optional: bool) -> str:
    return ", ".join([*tags, *(["none"] if optional else [])])


def _convert_variant(value: Any, annotation: Any, tags: dict[str, type], key: str) -> Any:
    """A tagged section: None, an instance, a tag (that variant's defaults) or a dict."""
    optional = type(None) in typing.get_args(annotation)
    if optional and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        return None
    if isinstance(value, tuple(tags.values())):
        return value
    if isinstance(value, str):
        if value not in tags:
            raise ConfigError(
                f"{key}: unknown choice {value!r}; allowed: {_choices(tags, optional)}"
            )
        return tags[value]()
    if isinstance(value, dict):
        tag = value.get("kind")
        if tag is None and len(set(tags.values())) == 1:
            return from_dict(next(iter(tags.values())), value, key)
        if tag not in tags:
            raise ConfigError(f"{key}: 'kind' must be one of {_choices(tags, False)}, got {tag!r}")
        return from_dict(tags[tag], value, key)
    raise ConfigError(f"{key}: expected one of {_choices(tags, optional)}, got {value!r}")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (a string from the command line, or already typed) as ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    tags = _variants(annotation)
    if tags:
        return _convert_variant(value, annotation, tags, key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: cannot use {value!r} ({'; '.join(errors)})")
    if annotation is Any:
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as exc:
                raise ConfigError(f"{key}: expected a {origin.__name__}, got {value!r}") from exc
        if not isinstance(value, (tuple, list)):
            value = (value,)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            items = [
                _convert(v, a, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            items = [
                _convert(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)
            ]
        return tuple(items) if origin is tuple else list(items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(float(value)) if annotation is int else float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}") from exc
    if annotation is str:
        return str(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return from_dict(annotation, value, key)
        raise ConfigError(f"{key}: expected a {annotation.__name__} section, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def set_value(cfg: Any, dotted: str, value: Any) -> None:
    """Set ``cfg.<dotted> = value`` with type conversion and re-validation."""
    parts = dotted.split(".")
    chain = [cfg]
    for i, part in enumerate(parts):
        obj = chain[-1]
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"unknown key {dotted!r}: {where} has no {part!r} (valid: {', '.join(names)})"
            )
        if i < len(parts) - 1:
            child = getattr(obj, part)
            section = ".".join(parts[: i + 1])
            tags = _variants(_hints(obj)[part]) if child is None else None
            if tags:
                raise ConfigError(
                    f"unknown key {dotted!r}: {section} is none; choose one first "
                    f"({section}={'|'.join(tags)})"
                )
            if not dataclasses.is_dataclass(child):
                raise ConfigError(f"unknown key {dotted!r}: {section} is not a section")
            chain.append(child)
    owner = chain[-1]
    if parts[-1] == "kind" and len(parts) > 1 and _variants(type(owner)):
        # Switching a tagged section's variant: the same as setting the section's tag.
        set_value(cfg, ".".join(parts[:-1]), value)
        return
    annotation = _hints(owner)[parts[-1]]
    current = getattr(owner, parts[-1])
    tags = _variants(annotation) or {}
    if isinstance(value, str) and getattr(current, "kind", None) == value and value in tags:
        converted = current  # the variant it already is: keep its settings
    else:
        converted = _convert(value, annotation, dotted)
    setattr(owner, parts[-1], converted)
    # Re-run the validation of every section on the path, innermost first.
    for i in range(len(chain) - 1, -1, -1):
        post_init = getattr(chain[i], "__post_init__", None)
        if post_init is not None:
            try:
                post_init()
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{dotted}={value!r}: {exc}") from exc


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``key=value`` strings in order; returns ``cfg``."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        set_value(cfg, key.strip(), value.strip())
    return cfg


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a dataclass config (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def from_dict(cls: type, data: dict, key: str = "") -> Any:
    """Rebuild a dataclass config from :func:`to_dict` output, checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{key or cls.__name__}: unknown keys {unknown}")
    kwargs = {
        name: _convert(value, hints[name], f"{key}.{name}" if key else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key or cls.__name__}: {exc}") from exc
