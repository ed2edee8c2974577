"""``workers: N``: the one admin endpoint of the host, served by the supervisor.

Each worker serves its own admin app (:mod:`sidecar.admin`) on a private Unix
socket in a directory only this user can enter; nothing else talks to it.
The supervisor listens on the configured admin address and answers from all
workers at once (docs/operations.md, "Multi-core"):

* ``/metrics``: every worker's exposition parsed and added up, sample by
  sample: counters and histograms summed, gauges summed (the configured caps
  add up to the host-wide totals) except ``sidecar_oldest_pending_seconds``
  (the largest) and ``sidecar_build_info``; ``sidecar_worker_up{worker}``
  says who answered.  A worker that does not answer in time contributes its
  last counters and histograms, so host-wide counters never go backwards
  (Prometheus would read a drop as a restart), and none of its gauges.
* ``/pools``: host totals per upstream, plus each worker's own snapshot.
* ``/readyz``: 200 only when every worker answers that it is ready.
* ``/reload``: sent to every worker; the answer lists each result.
* ``/config``: one worker's, with the host's admin address.

The admin token is checked by the workers, which hold the config as last
reloaded: the caller's ``Authorization`` header is passed on, and a worker's
401 is the answer.  Nothing a token protects is served unless at least one
worker accepted the caller.

The server runs on its own thread with its own event loop, so the
supervisor's main thread keeps its plain signal handlers and ``wait()`` loop;
that thread never takes a signal (they stay blocked on it).  Every call to a
worker has a timeout: a worker that hangs or died is reported as down, never
waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .metrics import CONTENT_TYPE
from .server import LISTEN_BACKLOG

__all__ = ["HostAdmin", "merge_metrics", "merge_pools", "render_families"]

# A probe or a scrape must answer well within Prometheus' and Kubernetes'
# own timeouts (10 s and 1 s by default): a worker gets this long.
PROBE_TIMEOUT = 0.8
SCRAPE_TIMEOUT = 3.0
# A reload opens the new pools (TLS contexts, CA files) before it answers.
RELOAD_TIMEOUT = 30.0
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Gauges that do not add up across workers: the largest is the host's.
_LARGEST_GAUGES = frozenset({"sidecar_oldest_pending_seconds", "sidecar_build_info"})
# /pools fields that are the same setting in every worker, and the one that is a maximum.
_SAME_IN_EVERY_WORKER = frozenset({"url", "http2", "keepalive_expiry_s", "pool_timeout_s"})
_LARGEST_FIELDS = frozenset({"oldest_wait_s", "min_rtt_ms"})


@dataclass(frozen=True, slots=True)
class Answer:
    """One worker's answer to one call: ``status`` is None when it gave none in time."""

    index: int
    status: int | None
    body: bytes = b""
    error: str | None = None

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def describe(self) -> dict[str, Any]:
        if self.status is None:
            return {"index": self.index, "up": False, "error": self.error}
        return {"index": self.index, "up": True}


class HostAdmin:
    """The host's admin server, over the workers' private admin sockets.

    ``listener`` is already bound and listening (so a taken port fails the
    start, before any worker exists); :meth:`start` serves it on a thread.
    """

    def __init__(self, listener: socket.socket, sockets: Sequence[str], address: str) -> None:
        self._listener = listener
        self._sockets = tuple(sockets)
        self.address = address
        self.draining = False  # set by the supervisor's signal handler: /readyz says 503 at once
        self._metrics_cache: dict[int, list[Metric]] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._serving = threading.Event()
        self._sessions: list[aiohttp.ClientSession] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="host-admin", daemon=True)
        self._thread.start()

    def close_listener(self) -> None:
        """In a forked worker: the listening socket is the supervisor's alone."""
        self._listener.close()

    def begin_drain(self) -> None:
        """Safe in a signal handler: one attribute, read by the next /readyz."""
        self.draining = True

    def stop(self, timeout: float = 3.0) -> None:
        """Stop serving; bounded, since the supervisor must exit in bounded time."""
        thread = self._thread
        if thread is None:
            self._listener.close()
            return
        if self._serving.wait(timeout) and self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(timeout)  # a daemon thread: exiting the process ends it regardless

    def _run(self) -> None:
        # Signals belong to the supervisor's main thread, whose wait() they must interrupt.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM})
        try:
            asyncio.run(self._serve())
        except Exception:
            _log().exception("admin_failed", admin=self.address)
        finally:
            self._serving.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._sessions = [aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) for path in self._sockets]
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        try:
            await runner.setup()
            # SockSite calls listen() again: keep the proxy's large accept queue.
            await web.SockSite(runner, self._listener, backlog=LISTEN_BACKLOG).start()
            self._serving.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            for session in self._sessions:
                await session.close()
            self._listener.close()

    # ------------------------------------------------------------ fan-out

    async def _ask(self, index: int, method: str, path: str, headers: dict[str, str], timeout: float) -> Answer:
        try:
            async with self._sessions[index].request(
                method, "http://worker" + path, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                return Answer(index, response.status, await response.read())
        except TimeoutError:
            return Answer(index, None, error="no answer in time")
        except (aiohttp.ClientError, OSError) as exc:
            return Answer(index, None, error=f"not reachable: {type(exc).__name__}")

    async def _ask_all(self, request: web.Request, path: str, timeout: float, method: str = "GET") -> list[Answer]:
        headers = {}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        calls = (self._ask(index, method, path, headers, timeout) for index in range(len(self._sockets)))
        return list(await asyncio.gather(*calls))

    def _refusal(self, request: web.Request, answers: Iterable[Answer]) -> web.Response | None:
        """401 if a worker refused the caller; 503 if no worker could judge a protected request."""
        answered = [answer for answer in answers if answer.status is not None]
        if any(answer.status == 401 for answer in answered):
            return _json({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        if not answered and request.path not in _OPEN_PATHS:
            return _json({"error": "no worker answered", "workers": [a.describe() for a in answers]}, status=503)
        return None

    # ------------------------------------------------------------ endpoints

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/pools", self.pools)
        app.router.add_get("/config", self.config)
        app.router.add_post("/reload", self.reload)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return _json({"status": "draining"}, status=503)
        answers = await self._ask_all(request, "/readyz", PROBE_TIMEOUT)
        workers = []
        for answer in answers:
            row = answer.describe()
            body = answer.json()
            if isinstance(body, dict) and "status" in body:
                row["status"] = body["status"]
            workers.append(row)
        if all(answer.status == 200 for answer in answers):
            return _json({"status": "ready", "workers": workers})
        states = {row.get("status") for row in workers}
        status = "draining" if self.draining or "draining" in states else "starting" if "starting" in states else "down"
        return _json({"status": status, "workers": workers}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        answers = await self._ask_all(request, "/metrics", SCRAPE_TIMEOUT)
        refused = self._refusal(request, answers)
        if refused is not None:
            return refused
        parts: list[tuple[list[Metric], bool]] = []
        up = GaugeMetricFamily("sidecar_worker_up", "1 if the worker answered this scrape in time", labels=["worker"])
        for answer in answers:
            fresh = answer.status == 200
            if fresh:
                with contextlib.suppress(ValueError):  # a garbled page counts as no answer
                    self._metrics_cache[answer.index] = list(text_string_to_metric_families(answer.body.decode()))
            cached = self._metrics_cache.get(answer.index)
            if cached is not None:
                parts.append((cached, fresh))
            up.add_metric([str(answer.index)], 1 if fresh else 0)
        merged = merge_metrics(parts)
        merged.append(up)
        return web.Response(body=render_families(merged), headers={"Content-Type": CONTENT_TYPE})

    async def pools(self, request: web.Request) -> web.Response:
        answers = await self._ask_all(request, "/pools", SCRAPE_TIMEOUT)
        refused = self._refusal(request, answers)
        if refused is not None:
            return refused
        workers: list[dict[str, Any]] = []
        snapshots: list[dict[str, Any]] = []
        retiring: list[dict[str, Any]] = []
        for answer in answers:
            row = answer.describe()
            body = answer.json()
            if answer.status == 200 and isinstance(body, dict):
                snapshots.append(body.get("upstreams", {}))
                row["draining"] = body.get("draining", False)
                row["upstreams"] = body.get("upstreams", {})
                for pool in body.get("retiring", ()):
                    retiring.append(dict(pool, worker=answer.index))
                if "retiring" in body:
                    row["retiring"] = body["retiring"]
            elif row["up"]:
                row.update(up=False, error=f"answered {answer.status}")
            workers.append(row)
        document: dict[str, Any] = {
            "time": time.time(),
            "draining": self.draining or any(row.get("draining") for row in workers),
            "upstreams": merge_pools(snapshots),
        }
        if retiring:
            document["retiring"] = retiring
        document["workers"] = workers
        return _json(document)

    async def config(self, request: web.Request) -> web.Response:
        headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
        answers: list[Answer] = []
        for index in range(len(self._sockets)):  # the first worker that answers: they share one file
            answer = await self._ask(index, "GET", "/config", headers, SCRAPE_TIMEOUT)
            answers.append(answer)
            if answer.status is not None:
                break
        refused = self._refusal(request, answers)
        if refused is not None:
            return refused
        view = answers[-1].json()
        if answers[-1].status != 200 or not isinstance(view, dict):
            return _json({"error": "no worker answered", "workers": [a.describe() for a in answers]}, status=503)
        view.setdefault("bound", {})["admin"] = self.address
        return _json(view)

    async def reload(self, request: web.Request) -> web.Response:
        answers = await self._ask_all(request, "/reload", RELOAD_TIMEOUT, method="POST")
        refused = self._refusal(request, answers)
        if refused is not None:
            return refused
        results: list[dict[str, Any]] = []
        for answer in answers:
            body = answer.json()
            if answer.status is None or not isinstance(body, dict):
                results.append({"index": answer.index, "result": "no_answer", "error": answer.error})
            else:
                results.append({"index": answer.index, **body})
        outcomes = {row["result"] for row in results}
        if outcomes == {"success"}:
            summary = {key: value for key, value in results[0].items() if key not in ("index", "result")}
            return _json({"result": "success", **summary, "workers": results})
        if "failure" in outcomes:  # the file is invalid: every worker that read it says so
            error = next(row["error"] for row in results if row["result"] == "failure")
            return _json({"result": "failure", "error": error, "workers": results}, status=400)
        # Refused (draining) or unanswered by some: the others may have reloaded.
        return _json({"result": "incomplete", "workers": results}, status=503)


def merge_metrics(parts: Iterable[tuple[list[Metric], bool]]) -> list[Metric]:
    """Families from every worker added up, sample by sample (see the module docstring).

    ``parts`` holds each worker's families and whether they are fresh; a
    stale worker contributes its counters and histograms only.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for metrics, fresh in parts:
        for family in metrics:
            if not fresh and family.type not in ("counter", "histogram"):
                continue
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            samples = values[family.name]
            largest = family.name in _LARGEST_GAUGES
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in samples:
                    samples[key] = max(samples[key], sample.value) if largest else samples[key] + sample.value
                else:
                    samples[key] = sample.value
    merged = []
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        merged.append(family)
    return merged


def merge_pools(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per-upstream /pools snapshots of every worker as host totals: counts and limits added up."""
    total: dict[str, Any] = {}
    for upstreams in snapshots:
        total = _merge(total, upstreams)
    return total


def _merge(left: Any, right: Any, key: str | None = None) -> Any:
    if isinstance(left, dict) and isinstance(right, dict):
        merged = dict(left)
        for name, value in right.items():
            merged[name] = _merge(left[name], value, name) if name in left else value
        return merged
    if key in _SAME_IN_EVERY_WORKER or isinstance(left, bool) or isinstance(right, bool):
        return left
    if isinstance(left, int | float) and isinstance(right, int | float):
        return max(left, right) if key in _LARGEST_FIELDS else left + right
    return left


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render_families(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body, indent=2) + "\n", status=status, content_type="application/json", headers=headers
    )


def _log() -> Any:
    from .logs import get_logger

    return get_logger("sidecar.admin")
