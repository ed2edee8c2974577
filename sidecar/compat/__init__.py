"""Everything the sidecar relies on inside its libraries, fenced in one module per library.

The pool's correctness leans on a few internals that httpcore, h11 and h2 do
not promise to keep (an HTTP/1.1 parser's unread bytes, the streams an HTTP/2
connection grants, its state machine).  Every private access lives in
``compat/<library>.py`` behind a named function, and each of those modules
registers a :class:`SelfCheck` that verifies, on the installed version, that
the internals are what it expects.

:func:`start_up` runs the checks once per process before the sidecar serves.
A failing check that has a safe fallback logs one line and switches the
sidecar to that fallback; one without a fallback stops start-up
(:class:`IncompatibleLibrary`, exit code 1), naming the library and version.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

from ..logs import get_logger

__all__ = ["Failure", "IncompatibleLibrary", "SelfCheck", "register", "run_self_checks", "start_up"]

log = get_logger("sidecar")


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
_started = False


def register(check: SelfCheck) -> SelfCheck:
    """Add a check to those :func:`run_self_checks` runs (done at import of a compat module)."""
    _registry.append(check)
    return check


def run_self_checks() -> list[Failure]:
    """Run every registered check; the failures, in registration order."""
    # Importing a compat module registers its checks.
    from . import h2, httpcore  # noqa: F401

    failures = []
    for check in _registry:
        try:
            problem = check.check()
        except Exception as exc:  # a check that breaks is a check that failed
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            failures.append(Failure(check, problem))
    return failures


def start_up() -> None:
    """Once per process, before serving: the self-checks and the process-wide set-up.

    Logs one line per check that failed and switches to its fallback; raises
    :class:`IncompatibleLibrary` if any failed check has none.  Then installs
    the fast httpcore locks (see ``install_fast_locks()`` in compat/httpcore.py)
    unless their check failed.
    """
    global _started
    if _started:
        return
    failures = run_self_checks()
    fatal = [failure for failure in failures if failure.fatal]
    if fatal:
        raise IncompatibleLibrary("; ".join(map(str, fatal)))
    for failure in failures:
        log.warning("library_fallback", message=str(failure))
        if failure.check.use_fallback is not None:
            failure.check.use_fallback()
    from . import httpcore

    httpcore.install_fast_locks()
    _started = True


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"
