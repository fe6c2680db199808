"""Dotted CLI overrides (``--trainer.max_duration.value=100``) on top of OLMo-core's ``Config.merge``.

Why a wrapper: ``Config.merge`` is the merge we want (same syntax and YAML value parsing as
OLMo-core's own scripts), but a typo in an intermediate key surfaces as a bare ``KeyError: 'nope'``
and a value that doesn't decode doesn't say which override it came from. We check every key
against the config's structure first and name the bad key (with close matches), then let
OLMo-core merge, and on a decode error find the override responsible.
"""

from __future__ import annotations

import difflib
from typing import Any, List, Optional, Sequence, Tuple, TypeVar

from olmo_core.config import Config
from olmo_core.exceptions import OLMoConfigurationError

__all__ = ["OverrideError", "apply_overrides", "override_key"]

C = TypeVar("C", bound=Config)

_CLASS_FIELD = Config.CLASS_NAME_FIELD


class OverrideError(OLMoConfigurationError):
    """A CLI override names a key the experiment doesn't have, or a value that doesn't fit."""


def override_key(arg: str) -> str:
    """The dotted key of one override, normalised the way OLMo-core's ``Config.merge`` does it
    (leading dashes stripped, ``-`` -> ``_``)."""
    name = arg.split("=", 1)[0]
    return name.strip(" -").replace("-", "_")


def _suggest(part: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(part, list(choices), n=3, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return ""


def _fields(node: dict) -> List[str]:
    return sorted(k for k in node if k not in (_CLASS_FIELD, "type"))


def _check_key(data: Any, key: str, root_name: str) -> None:
    """Raise :class:`OverrideError` unless ``key`` can be set in ``data`` (``Config.as_dict``
    output with class names) without inventing a dataclass field."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or root_name
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            is_dataclass = _CLASS_FIELD in node
            if part in node and part not in (_CLASS_FIELD,):
                node = node[part]
                continue
            if is_dataclass:
                cls = node[_CLASS_FIELD].rsplit(".", 1)[-1]
                raise OverrideError(
                    f"unknown override key '{key}': '{where}' ({cls}) has no field '{part}'"
                    f"{_suggest(part, _fields(node))} (fields: {', '.join(_fields(node))})"
                )
            if last:
                return  # a new entry of a plain dict field (e.g. optimizer group opts)
            entries = ", ".join(repr(k) for k in node) or "none"
            raise OverrideError(
                f"unknown override key '{key}': '{where}' has no entry '{part}'"
                f"{_suggest(part, [str(k) for k in node])} (entries: {entries})"
            )
        if isinstance(node, (list, tuple)):
            try:
                index = int(part)
            except ValueError:
                raise OverrideError(
                    f"bad override key '{key}': '{where}' is a list, so '{part}' must be an index"
                ) from None
            if not 0 <= index < len(node):
                raise OverrideError(
                    f"bad override key '{key}': index {index} out of range for '{where}' (length {len(node)})"
                )
            node = node[index]
            continue
        if node is None:
            raise OverrideError(
                f"can't set '{key}': '{where}' is None. Set it as a whole instead, e.g. --{where}='{{{part}: ...}}'"
            )
        raise OverrideError(
            f"bad override key '{key}': '{where}' is a {type(node).__name__} "
            f"({node!r}), not a config with field '{part}'"
        )


def _value_at(data: Any, key: str) -> Any:
    """The current value at a dotted key that :func:`_check_key` accepted (``None`` if new)."""
    node = data
    for part in key.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, (list, tuple)):
            node = node[int(part)]
        else:
            return None
    return node


def _merge(config: C, overrides: Sequence[str]) -> C:
    try:
        return config.merge(list(overrides))
    except (OLMoConfigurationError, TypeError, ValueError, KeyError) as e:
        raise OverrideError(str(e)) from e


def apply_overrides(config: C, overrides: Optional[Sequence[str]], root_name: str = "config") -> C:
    """``config.merge(overrides)`` (OLMo-core's dotted syntax), with errors that name the bad key
    or value. Returns ``config`` itself when there are no overrides."""
    overrides = [o for o in (overrides or []) if o.strip()]
    if not overrides:
        return config
    data = config.as_dict(include_class_name=True, include_registered_name=True)
    for arg in overrides:
        key = override_key(arg)
        if not key:
            raise OverrideError(f"bad override {arg!r}: expected --dotted.key=value")
        _check_key(data, key, root_name)
        if "=" not in arg:
            # OLMo-core reads a bare --key as True, and True passes as 1 in an int or float field
            # (--train_module.optim.lr would train at lr=1): only booleans may be set that way.
            current = _value_at(data, key)
            if not isinstance(current, bool):
                raise OverrideError(
                    f"override '{arg}' has no value: write --{key}=VALUE (only a boolean can be set by a "
                    f"bare flag; '{key}' is {current!r})"
                )
    try:
        return _merge(config, overrides)
    except OverrideError as e:
        culprit = _find_culprit(config, overrides)
        if culprit is None:
            raise
        arg, err = culprit
        raise OverrideError(f"bad value in override '{arg}': {err}") from e


def _find_culprit(config: Config, overrides: Sequence[str]) -> Optional[Tuple[str, OverrideError]]:
    for arg in overrides:
        try:
            _merge(config, [arg])
        except OverrideError as e:
            return arg, e
    return None
