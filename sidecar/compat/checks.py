"""The self-check registry: what each compat module verifies about its library.

Kept apart from ``sidecar/compat/__init__.py`` (which imports every compat
module to run their checks) so that the compat modules can register here
without importing their own package: no import cycle.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Failure", "IncompatibleLibrary", "SelfCheck", "register", "registered"]


@dataclass(frozen=True, slots=True)
class SelfCheck:
    """One internal of a library that the sidecar relies on, and how to verify it.

    ``check`` returns None when the internal is what the sidecar expects, or
    what it found instead.  ``fallback`` says what the sidecar does without it
    and ``use_fallback`` switches to that; with no fallback (None) a failure
    is fatal at start-up.
    """

    libraries: tuple[str, ...]  # distributions involved, named with their versions on failure
    guards: str  # what the sidecar relies on, in a few words
    check: Callable[[], str | None]
    fallback: str | None = None
    use_fallback: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A self-check that did not pass."""

    check: SelfCheck
    problem: str

    @property
    def fatal(self) -> bool:
        return self.check.fallback is None

    @property
    def versions(self) -> str:
        return ", ".join(f"{name} {_version(name)}" for name in self.check.libraries)

    def __str__(self) -> str:
        then = "no safe fallback" if self.check.fallback is None else f"falling back: {self.check.fallback}"
        return f"{self.versions}: cannot rely on {self.check.guards} ({self.problem}); {then}"


class IncompatibleLibrary(RuntimeError):
    """An installed library lacks an internal the sidecar cannot run without."""


_registry: list[SelfCheck] = []


def register(check: SelfCheck) -> SelfCheck:
    """Add a check to those run at start-up (done at import of a compat module)."""
    _registry.append(check)
    return check


def registered() -> tuple[SelfCheck, ...]:
    """Every check registered so far, in registration order."""
    return tuple(_registry)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"
