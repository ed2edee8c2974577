"""Load ``upstreams.yaml`` into typed, immutable objects.

Everything the rest of the code knows about configuration comes from the
frozen dataclasses in ``model.py``; no dict of settings travels past this
package.  Every error names the file, the YAML path of the offending field and
what is wrong with it, so ``sidecar validate`` can print it without a
traceback.  ``scalars.py`` parses the value forms, ``fields.py`` plugs them
(with ``${VAR}`` expansion) into pydantic, ``schema.py`` says what may be
written where, ``loader.py`` reads, validates and inherits, ``translate.py``
turns pydantic's errors into ours, ``view.py`` is what may be shown.
"""

from .loader import load_config, parse_config
from .model import (
    DEFAULT_CONFIG_PATH,
    H2_STREAMS_PER_CONNECTION,
    UPSTREAM_NAME,
    AdminSettings,
    Config,
    ConfigError,
    HeaderRules,
    HostPort,
    HTTP2Mode,
    Inbound,
    Limits,
    Pacing,
    RateLimit,
    Route,
    Shared,
    Timeouts,
    TLSSettings,
    Upstream,
    check_divisible,
)
from .scalars import parse_duration, parse_host_port, parse_size
from .view import admin_exposure_warning, public_view

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "H2_STREAMS_PER_CONNECTION",
    "UPSTREAM_NAME",
    "AdminSettings",
    "Config",
    "ConfigError",
    "HTTP2Mode",
    "HeaderRules",
    "HostPort",
    "Inbound",
    "Limits",
    "Pacing",
    "RateLimit",
    "Route",
    "Shared",
    "TLSSettings",
    "Timeouts",
    "Upstream",
    "admin_exposure_warning",
    "check_divisible",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_host_port",
    "parse_size",
    "public_view",
]
