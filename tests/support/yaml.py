"""The one builder of ``upstreams.yaml`` text for tests.

Tests describe a config as Python data and let PyYAML write it, instead of
formatting YAML by hand::

    upstreams_yaml({"api": {"url": up.url, "timeouts": {"read": "300ms"}}}, inbound={"header_timeout": "1s"})
    one_upstream(up.url, limits={"max_connections": 2})      # the same, for one upstream named "api"

Durations and sizes are strings as in a hand-written file ("300ms", "1MiB");
``${VAR}`` references pass through as strings and are expanded by the loader.
Keys whose value is ``None`` are left out, so optional sections can be passed
through unconditionally.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# Routing by the Host header / absolute-form authority, as most forwarding tests use.
API_INTERNAL = {"hosts": ["api.internal"]}


def _present(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if value is not None}


def upstreams_yaml(upstreams: Mapping[str, str | Mapping[str, Any]], /, **top: Any) -> str:
    """``upstreams.yaml`` text: ``upstreams`` maps each name to its URL or to a
    mapping of its fields; ``top`` adds the other top-level sections
    (``inbound=``, ``admin=``, ``defaults=``, ``shutdown_timeout=``, ``workers=``...)."""
    document = {
        **_present(top),
        "upstreams": {
            name: {"url": spec} if isinstance(spec, str) else _present(spec) for name, spec in upstreams.items()
        },
    }
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def one_upstream(url: str, /, *, name: str = "api", top: Mapping[str, Any] | None = None, **fields: Any) -> str:
    """:func:`upstreams_yaml` for a single upstream: ``fields`` are its settings
    (``route=``, ``limits=``, ``timeouts=``, ``headers=``, ``tls=``, ``http2=``...)."""
    return upstreams_yaml({name: {"url": url, **fields}}, **(top or {}))


def write_config(directory: Path, yaml_text: str, name: str = "upstreams.yaml") -> Path:
    """Write ``yaml_text`` (dedented) to ``directory/name``; return the path."""
    path = directory / name
    path.write_text(textwrap.dedent(yaml_text))
    return path
