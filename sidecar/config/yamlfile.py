"""YAML text → plain data: a safe loader that refuses duplicate keys and runaway nesting."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

from .model import ConfigError
from .translate import TOP_LEVEL

# Far deeper than any real config (about six levels), and far from where
# PyYAML's recursive composer meets Python's recursion limit (about 490).
# Nothing after composing goes deeper than the schema: pydantic descends only
# into known sections, so aliases (even `&a [*a]`) cannot make it recurse.
MAX_DEPTH = 64


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys.

    PyYAML keeps the last of two equal keys silently: a second upstream with
    the same name would replace the first without a word.  (Runaway nesting is
    refused before this loader runs: see :func:`_check_depth`.)
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may legitimately be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_depth(text: str, source: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH, naming where.

    PyYAML's parser is a state machine (no recursion), so its event stream is
    walked before the recursive composer ever sees the document.
    """
    # One frame per open collection: [is a mapping, current key or index, next node is a key].
    frames: list[list[Any]] = []
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            frames.pop()
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue
        if frames:
            frame = frames[-1]
            if not frame[0]:
                frame[1] += 1
            else:
                if frame[2]:
                    frame[1] = event.value if isinstance(event, yaml.ScalarEvent) else "?"
                frame[2] = not frame[2]
        if isinstance(event, yaml.CollectionStartEvent):
            if len(frames) >= MAX_DEPTH:
                path = ""
                for is_mapping, key, _ in frames:
                    path = f"{path}.{key}" if is_mapping and path else (str(key) if is_mapping else f"{path}[{key}]")
                mark = event.start_mark
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
                raise ConfigError(source, path or TOP_LEVEL, f"nested more than {MAX_DEPTH} levels deep{where}")
            frames.append([isinstance(event, yaml.MappingStartEvent), -1, True])


def read_yaml(text: str, source: str) -> Any:
    """The document as plain data. Raises yaml.YAMLError for malformed YAML, and
    ConfigError for a document nested too deep."""
    _check_depth(text, source)
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
