"""pydantic's ValidationError → ConfigError: the one place it happens.

The loader validates the whole document with pydantic; this module turns the
first problem, in the order the file is read, into ``file: yaml.path:
problem`` in the sidecar's own words, with every secret redacted.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from ..redact import redact
from .model import ConfigError
from .schema import Document, Section

TOP_LEVEL = "(top level)"


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


# --------------------------------------------------------------------------
# ValidationError → ConfigError (the only place)
# --------------------------------------------------------------------------


def config_error(source: str, exc: ValidationError, document: object, secrets: set[str]) -> ConfigError:
    """The first problem, as ``file: yaml.path: problem`` in our words.

    "First" in the order the file is read: a mapping's own problems (a key
    that is unknown, not a string, or not a valid name) before anything under
    it, and then its fields in schema order (named entries in file order).
    """
    error = min(exc.errors(include_url=False), key=lambda error: _reading_order(error, document))
    loc, kind = tuple(error["loc"]), error["type"]
    if kind == "invalid_key":  # a non-string key: the problem is the mapping's
        path, problem = _path(loc[:-1]), f"keys must be strings, got {loc[-1]!r}"
    elif kind == "extra_forbidden":
        path, problem = _path(loc), f"unknown key (expected one of: {', '.join(_section_at(loc[:-1]).model_fields)})"
    elif kind == "missing":
        path, problem = _path(loc), "is required"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        path, problem = _path(loc), f"must be a mapping, got {type(error['input']).__name__}"
    elif kind == "value_error":
        path, problem = _path(loc), str(error["ctx"]["error"])
    else:  # not reachable with our validators; pydantic's own words are still located
        path, problem = _path(loc), error["msg"]
    return ConfigError(source, path or TOP_LEVEL, redact(problem, secrets))


def _reading_order(error: ErrorDetails, document: object) -> tuple[tuple[int, ...], int]:
    loc = tuple(error["loc"])
    if error["type"] in ("invalid_key", "extra_forbidden") or (loc and loc[-1] == "[key]"):
        owner, own = loc[:-1], 0
    else:
        owner, own = loc, 1
    positions: list[int] = []
    node = document
    for part, field_position, _ in _steps(owner):
        if field_position is not None:
            positions.append(field_position)
        elif isinstance(node, dict) and part in node:
            positions.append(list(node).index(part))
        elif isinstance(part, int):
            positions.append(part)
        node = node.get(part) if isinstance(node, dict) else None
    return tuple(positions), own


def _path(loc: tuple[int | str, ...]) -> str:
    """pydantic's location → our YAML path: ``upstreams.api.route.hosts[0]``."""
    path = ""
    for index, part in enumerate(loc):
        if part == "[key]":
            continue  # the error is about a mapping key: its path is the key's
        is_key = index + 1 < len(loc) and loc[index + 1] == "[key]"
        path = f"{path}[{part}]" if isinstance(part, int) and not is_key else join(path, part)
    return path


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The schema model a location points into (for the allowed keys of an unknown-key error)."""
    model: type[BaseModel] = Document
    for _, _, section in _steps(loc):
        model = section or model
    return model


def _steps(loc: tuple[int | str, ...]) -> Iterator[tuple[int | str, int | None, type[BaseModel] | None]]:
    """Each part of ``loc`` with its position among its section's fields (None: a name or
    an index) and the section it leads into (None: a plain value or list)."""
    section: type[BaseModel] | None = Document
    named_entries = False
    for part in loc:
        if named_entries:  # an upstream's name: whatever it is, it is no field
            named_entries = False
            yield part, None, section
        elif section is not None and isinstance(part, str) and part in section.model_fields:
            position = list(section.model_fields).index(part)
            section, named_entries = _nested_section(section, part)
            yield part, position, section
        else:
            section = None
            yield part, None, None


def _nested_section(model: type[BaseModel], field: str) -> tuple[type[BaseModel] | None, bool]:
    """The section model a field holds, and whether it holds a mapping of them by name."""
    annotation = model.model_fields[field].annotation
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation, False
    for kind in getattr(annotation, "__args__", ()):
        if isinstance(kind, type) and issubclass(kind, Section):
            return kind, True
    return None, False


# --------------------------------------------------------------------------
# Inheritance and the checks on resolved values
# --------------------------------------------------------------------------
