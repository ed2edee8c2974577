"""How a YAML value becomes a schema field: ${VAR} expansion and the pydantic types.

The ``Annotated`` types below plug the parsers of ``scalars.py`` into the
pydantic schema (``PlainValidator``: pydantic does no coercion of its own, so
``"5"`` or ``true`` mean exactly what those functions say), each value
expanded from ``${VAR}`` first where the field allows it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, PlainValidator, ValidationInfo

from .model import HostPort, HTTP2Mode, UpstreamURL
from .scalars import (
    attempt_conditions,
    boolean,
    header_name,
    header_value,
    http2_mode,
    non_empty_string,
    non_negative_int,
    non_negative_number,
    parse_duration,
    parse_host_port,
    parse_rate,
    parse_size,
    parse_upstream_url,
    path_prefix,
    positive_int,
    route_host,
    shown,
    upstream_name,
)

T = TypeVar("T")


# ---------------------------------------------------------------- ${VAR}

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class Expansion:
    """The environment ${VAR} reads, and every value it produced (secrets: never shown).

    Passed to the schema as the validation context: a value is expanded when
    its field is validated, so a ${VAR} under an unknown key is reported as
    the unknown key, and only values the sidecar uses become secrets.
    """

    env: Mapping[str, str]
    secrets: set[str] = field(default_factory=set)

    def substitute(self, value: str) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.env:
                found = self.env[name]
            elif default is not None:
                found = default
            else:
                raise ValueError(f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
            if found:
                self.secrets.add(found)
            return found

        result = _VARIABLE.sub(replace, value)
        if result != value and result:
            self.secrets.add(result)
        return result


def expanded(parse: Callable[[object], T]) -> Callable[[Any, ValidationInfo], T]:
    """``parse`` applied to the value after ${VAR} expansion (strings only)."""

    def validate(value: Any, info: ValidationInfo) -> T:
        if isinstance(value, str) and isinstance(info.context, Expansion):
            value = info.context.substitute(value)
        return parse(value)

    return validate


# ---------------------------------------------------------------- pydantic glue


def optional(parse: Callable[[object], T]) -> Callable[[object], T | None]:
    """``parse``, letting an explicit null through (it means "not set")."""

    def parse_or_none(value: object) -> T | None:
        return None if value is None else parse(value)

    return parse_or_none


def list_of(what: str, *, empty_when_falsy: bool = False) -> Callable[[Any], Any]:
    """A before-validator: the value must be a YAML sequence (``what`` words the error)."""

    def check(value: Any) -> Any:
        if empty_when_falsy and not value:
            return []
        if not isinstance(value, list):
            got = "" if empty_when_falsy else f", got {shown(value)}"
            raise ValueError(f"must be a list of {what}{got}")
        return value

    return check


def mapping_of(what: str) -> Callable[[Any], Any]:
    """A before-validator: a YAML mapping, where an empty or missing one means none."""

    def check(value: Any) -> Any:
        if not value:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping of {what}")
        return value

    return check


Duration = Annotated[float, PlainValidator(expanded(parse_duration))]
Size = Annotated[int, PlainValidator(expanded(parse_size))]
OptionalRate = Annotated[float | None, PlainValidator(expanded(optional(parse_rate)))]
OptionalSize = Annotated[int | None, PlainValidator(expanded(optional(parse_size)))]
PositiveInt = Annotated[int, PlainValidator(expanded(positive_int))]
OptionalPositiveInt = Annotated[int | None, PlainValidator(expanded(optional(positive_int)))]
NonNegativeInt = Annotated[int, PlainValidator(expanded(non_negative_int))]
OptionalNonNegativeInt = Annotated[int | None, PlainValidator(expanded(optional(non_negative_int)))]
NonNegativeNumber = Annotated[float, PlainValidator(expanded(non_negative_number))]
RetryOn = Annotated[tuple[str | int, ...], PlainValidator(attempt_conditions(allow_429=True))]
FailureOn = Annotated[tuple[str | int, ...], PlainValidator(attempt_conditions(allow_429=False))]
Boolean = Annotated[bool, PlainValidator(expanded(boolean))]
OptionalString = Annotated[str | None, PlainValidator(expanded(optional(non_empty_string)))]
HostPortValue = Annotated[HostPort, PlainValidator(expanded(parse_host_port))]
HTTP2Value = Annotated[HTTP2Mode, PlainValidator(expanded(http2_mode))]
UpstreamURLValue = Annotated[UpstreamURL, PlainValidator(expanded(parse_upstream_url))]
PathPrefix = Annotated[str, PlainValidator(expanded(path_prefix))]
# Names are never expanded: upstream names, header names.
UpstreamName = Annotated[str, PlainValidator(upstream_name)]
HeaderName = Annotated[str, PlainValidator(header_name)]
HeaderValue = Annotated[str, PlainValidator(expanded(header_value))]
RouteHosts = Annotated[
    tuple[Annotated[str, PlainValidator(expanded(route_host))], ...], BeforeValidator(list_of("host names"))
]
HeaderNames = Annotated[tuple[HeaderName, ...], BeforeValidator(list_of("header names", empty_when_falsy=True))]
HeaderValues = Annotated[dict[HeaderName, HeaderValue], BeforeValidator(mapping_of("header name to value"))]
