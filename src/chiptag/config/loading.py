"""Loading a config: YAML -> validated Config, typed `--set a.b=value` overrides, one-line errors naming the key.

Relative paths in a config are resolved against the current working directory (where `chiptag` runs),
the same way `make demo` and the README use them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from chiptag.config.schema import Config
from chiptag.errors import ChiptagError


def _fields_at(loc: tuple, root: type[BaseModel] = Config) -> list[str]:
    """The valid field names of the model that holds `loc` (for an 'unknown key' message)."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or [])]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)


def _source_of(loc: tuple, source: str, overrides: dict[tuple, str]) -> str:
    """Who set the value at `loc`: the last `--set` whose key is `loc` or holds it, else the file."""
    best = max((path for path in overrides if loc[: len(path)] == path), key=len, default=None)
    return source if best is None else f"--set {overrides[best]}"


def _format_error(err: ValidationError, source: str, overrides: dict[tuple, str] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        source_here = _source_of(loc, source, overrides or {})
        key = ".".join(str(x) for x in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc)
            lines.append(f"{source_here}: unknown key '{key}'"
                         + (f" (valid keys: {', '.join(valid)})" if valid else ""))
        elif e["type"] == "missing":
            lines.append(f"{source_here}: missing required key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or e["type"].startswith("value_error") else f" (got {got!r})"
            lines.append(f"{source_here}: {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b.0.c=value` -> (['a','b',0,'c'], yaml-typed value). `model.x` addresses the active model entry."""
    if "=" not in text:
        raise ChiptagError(f"--set {text!r}: expected KEY=VALUE, e.g. --set training.batch_size=32")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ChiptagError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ChiptagError(f"--set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    path: list[str | int] = [int(p) if p.lstrip("-").isdigit() else p for p in key.strip().split(".")]
    return path, value


def _apply(raw: dict[str, Any], path: list[str | int], value: Any, text: str) -> tuple:
    """Set the value; -> the key it was set at, as validation errors locate it (`model.x` -> ('models', i, 'x'),
    negative indices counted from the end)."""
    if path[0] == "model":  # shorthand for models.<active_model_index>
        path = ["models", int(raw.get("active_model_index", 0)), *path[1:]]
    node: Any = raw
    at: list[str | int] = []
    for i, part in enumerate(path[:-1]):
        where = ".".join(str(p) for p in path[: i + 1])
        if isinstance(node, list):
            if not isinstance(part, int) or not -len(node) <= part < len(node):
                raise ChiptagError(f"--set {text}: '{where}' is not an index of a {len(node)}-entry list")
            at.append(part % len(node))
            node = node[part]
        elif isinstance(node, dict):
            at.append(part)
            node = node.setdefault(part, {})
        else:
            raise ChiptagError(f"--set {text}: '{where}' is not a section")
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or not -len(node) <= last < len(node):
            raise ChiptagError(f"--set {text}: index {last} out of range for a {len(node)}-entry list")
        last = last % len(node)
    elif not isinstance(node, dict):
        raise ChiptagError(f"--set {text}: cannot set a key inside a value")
    node[last] = value
    return (*at, last)


def from_dict(raw: dict[str, Any], source: str = "config", overrides: list[str] | None = None) -> Config:
    raw = copy.deepcopy(raw)
    set_at: dict[tuple, str] = {}  # key -> the --set that gave it its value (errors there name the --set)
    for text in overrides or []:
        path, value = parse_override(text)
        key = _apply(raw, path, value, text)
        set_at = {k: t for k, t in set_at.items() if k[: len(key)] != key}  # a later --set replaces what it holds
        set_at[key] = text
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ChiptagError(_format_error(err, source, set_at)) from None


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ChiptagError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ChiptagError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ChiptagError(f"{path}: expected a mapping of sections (data, models, training, ...) at top level")
    return from_dict(raw, str(path), overrides)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
