"""Everything the sidecar relies on inside its libraries, fenced in one module per library.

The sidecar's correctness leans on a few internals that aiohttp does not
promise to keep (its parsed-request count, response-header hooks, request
queue and parser choice: the upstream side runs on the sidecar's own
connections and needs none).  Every private access lives in
``compat/<library>.py`` behind a named function, and each of those modules
registers a :class:`SelfCheck` that verifies, on the installed version, that
the internals are what it expects.

:func:`start_up` runs the checks once per process before the sidecar serves.
A failing check that has a safe fallback logs one line and switches the
sidecar to that fallback; one without a fallback stops start-up
(:class:`IncompatibleLibrary`, exit code 1), naming the library and version.
"""

from __future__ import annotations

from ..logs import get_logger
from .checks import Failure, IncompatibleLibrary, SelfCheck, _registry, register, registered

__all__ = [
    "Failure",
    "IncompatibleLibrary",
    "SelfCheck",
    "_registry",
    "register",
    "registered",
    "run_self_checks",
    "start_up",
]

log = get_logger("sidecar")

_started = False


def run_self_checks() -> list[Failure]:
    """Run every registered check; the failures, in registration order."""
    # Importing a compat module registers its checks.
    from . import aiohttp  # noqa: F401

    failures = []
    for check in registered():
        try:
            problem = check.check()
        except Exception as exc:  # a check that breaks is a check that failed
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            failures.append(Failure(check, problem))
    return failures


def start_up() -> None:
    """Once per process, before serving: the self-checks.

    Logs one line per check that failed and switches to its fallback; raises
    :class:`IncompatibleLibrary` if any failed check has none.
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
    _started = True
