"""What a reload changes, decided in plain code before anything is touched.

See docs/operations.md, "Reload and shutdown".

:func:`plan_reload` compares the running config with a freshly loaded one and
says which upstreams keep their pool (settings identical, field by field),
which get a new pool (added or changed), which are retired (changed or
removed) and which top-level settings cannot change without a restart.  The
server then applies that plan in one synchronous step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .config import Config, Upstream


class ReloadRefused(Exception):
    """A reload asked for before the sidecar started or once it is shutting down."""


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did, by upstream name; the body of ``POST /reload``."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]
    restart_needed: tuple[str, ...]

    @property
    def replaced(self) -> tuple[str, ...]:
        """Upstreams whose running pool is retired: changed or removed."""
        return (*self.changed, *self.removed)

    @property
    def opened(self) -> tuple[str, ...]:
        """Upstreams that need a new pool: added or changed."""
        return (*self.added, *self.changed)

    def summary(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "changed": list(self.changed),
            "removed": list(self.removed),
            "unchanged": list(self.unchanged),
            "restart_needed": list(self.restart_needed),
        }


def plan_reload(old: Config, new: Config) -> ReloadResult:
    """Compare two configs; pure, touches nothing."""
    before = {upstream.name: upstream for upstream in old.upstreams}
    added, changed, unchanged = [], [], []
    # A pool takes its Redis client when it is built: a changed shared:
    # section replaces every pool with a shared limit (docs/shared-limits.md).
    shared_changed = old.shared != new.shared
    for upstream in new.upstreams:
        current = before.get(upstream.name)
        if current is None:
            added.append(upstream.name)
        elif current == upstream and not (shared_changed and uses_shared(upstream)):
            unchanged.append(upstream.name)
        else:
            changed.append(upstream.name)
    names = {upstream.name for upstream in new.upstreams}
    removed = [name for name in before if name not in names]
    return ReloadResult(tuple(added), tuple(changed), tuple(removed), tuple(unchanged), restart_needed(old, new))


def uses_shared(upstream: Upstream) -> bool:
    limit = upstream.rate_limit
    return (
        (limit is not None and limit.shared)
        or upstream.limits.shared_max_concurrent_requests is not None
        or upstream.pacing.shared
    )


def restart_needed(old: Config, new: Config) -> tuple[str, ...]:
    """Settings bound at startup (sockets, processes, parser limits) that differ."""
    bound_at_start = (
        ("listen", old.listen, new.listen),
        ("admin", old.admin.listen, new.admin.listen),
        ("admin.per_worker", old.admin.per_worker, new.admin.per_worker),
        ("workers", old.workers, new.workers),
        ("inbound.max_line_size", old.inbound.max_line_size, new.inbound.max_line_size),
        ("inbound.max_field_size", old.inbound.max_field_size, new.inbound.max_field_size),
        ("inbound.max_headers", old.inbound.max_headers, new.inbound.max_headers),
    )
    return tuple(name for name, before, after in bound_at_start if before != after)


def file_signature(path: str) -> str | None:
    """Content hash of the config file; None while it is missing or unreadable.

    Content, not mtime: mtime misses two edits within its resolution and
    changes on a touch; through some bind mounts it is not updated at all.
    """
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
