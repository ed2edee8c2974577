"""sidecar: an outbound HTTP proxy with one bounded, observable pool per upstream."""

__version__ = "0.1.0"
