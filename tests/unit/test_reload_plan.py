"""plan_reload: which upstreams keep their pool, which are replaced, what needs a restart."""

from __future__ import annotations

import textwrap
from pathlib import Path

from sidecar.config import Config, parse_config
from sidecar.reload import file_signature, plan_reload


def config(text: str) -> Config:
    return parse_config(textwrap.dedent(text), source="upstreams.yaml", env={})


BASE = """
listen: 127.0.0.1:8088
upstreams:
  a: { url: "http://a.test" }
  b: { url: "http://b.test", limits: { max_connections: 10 } }
  c: { url: "http://c.test" }
"""


def test_identical_config_changes_nothing() -> None:
    plan = plan_reload(config(BASE), config(BASE))
    assert plan.unchanged == ("a", "b", "c")
    assert plan.added == plan.changed == plan.removed == plan.restart_needed == ()
    assert plan.replaced == plan.opened == ()


def test_added_changed_and_removed_upstreams() -> None:
    new = config(
        """
        listen: 127.0.0.1:8088
        upstreams:
          a: { url: "http://a.test" }
          b: { url: "http://b.test", limits: { max_connections: 2 } }
          d: { url: "http://d.test" }
        """
    )
    plan = plan_reload(config(BASE), new)
    assert (plan.added, plan.changed, plan.removed, plan.unchanged) == (("d",), ("b",), ("c",), ("a",))
    assert plan.replaced == ("b", "c")
    assert plan.opened == ("d", "b")
    assert plan.summary() == {
        "added": ["d"],
        "changed": ["b"],
        "removed": ["c"],
        "unchanged": ["a"],
        "restart_needed": [],
    }


def test_a_changed_default_changes_every_upstream_that_inherits_it() -> None:
    new = config(BASE.replace("upstreams:", "defaults: { timeouts: { read: 5s } }\nupstreams:"))
    plan = plan_reload(config(BASE), new)
    assert plan.changed == ("a", "b", "c") and plan.unchanged == ()


def test_same_effective_settings_written_differently_are_unchanged() -> None:
    explicit = 'a: { url: "http://a.test", timeouts: { read: 30s }, http2: false }'
    new = config(BASE.replace('a: { url: "http://a.test" }', explicit))
    assert plan_reload(config(BASE), new).unchanged == ("a", "b", "c")


def test_listener_and_parser_settings_need_a_restart() -> None:
    new = config(BASE.replace("listen: 127.0.0.1:8088", "listen: 127.0.0.1:9000\nadmin: off\nworkers: 2"))
    assert plan_reload(config(BASE), new).restart_needed == ("listen", "admin", "workers")


def test_file_signature_follows_content_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.yaml"
    assert file_signature(str(path)) is None
    path.write_text("a: 1\n")
    first = file_signature(str(path))
    path.write_text("a: 1\n")
    assert file_signature(str(path)) == first
    path.write_text("a: 2\n")
    assert file_signature(str(path)) not in (None, first)


def test_admin_per_worker_needs_a_restart() -> None:
    new = config(BASE.replace("listen: 127.0.0.1:8088", "listen: 127.0.0.1:8088\nadmin: { per_worker: true }"))
    assert plan_reload(config(BASE), new).restart_needed == ("admin.per_worker",)


def test_a_changed_shared_section_replaces_the_pools_that_use_it() -> None:
    """The Redis client is taken when a pool is built: a new redis URL must reach the pools."""
    text = """
        shared: {{ redis: "redis://{host}:6379/0" }}
        upstreams:
          a: {{ url: "http://a", rate_limit: {{ rate: 5/s, shared: true }} }}
          b: {{ url: "http://b" }}
        """
    plan = plan_reload(config(text.format(host="old")), config(text.format(host="new")))
    assert plan.changed == ("a",) and plan.unchanged == ("b",)
    same = plan_reload(config(text.format(host="old")), config(text.format(host="old")))
    assert same.changed == ()
