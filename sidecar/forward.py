"""The request path, one request at a time (see docs/architecture.md).

    check → gate → snapshot → route → stages admit → attempt(s) → relay
          → stages release → one log/metrics call

Policy lives in the stages (``sidecar/policy``): this module only walks the
path.  Ownership rules that keep every slot and connection accounted for:

* the stages' admission (slots, and every future token or lease) is taken by
  :meth:`Stages.admit` and given back in one ``finally``, synchronously, so
  neither an error nor a (double) cancellation can skip it;
* the upstream response is closed in a ``finally`` before that; the pool's
  own release of the connection is synchronous too, and a connection that is
  not cleanly idle is closed by the pool in the background.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
from aiohttp import hdrs, web

from .body import request_body
from .errors import SidecarError, error_response, from_upstream_exception
from .exchange import Attempt, Exchange, Generation
from .headers import caller_request_id, downstream_headers, new_request_id, upstream_headers
from .policy.signals import may_carry_signal
from .policy.stack import sidecar_stages
from .pools import UpstreamPool
from .wellformed import (
    CLOSES_THE_CONNECTION,
    SPOKEN_VERSIONS,
    UNREAD,
    asks_upgrade,
    check_framing,
    check_version,
    refuse_to_read_on,
)

_BODYLESS_STATUS = (204, 304)


class _Response(web.StreamResponse):
    """A StreamResponse that adds nothing the upstream did not send.

    aiohttp adds ``Content-Type: application/octet-stream`` and its own
    ``Server`` header when missing; a proxy must not invent either.
    """

    __slots__ = ("_invented",)

    def __init__(self, status: int, invented: tuple[str, ...]) -> None:
        super().__init__(status=status)
        self._invented = invented

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        for name in self._invented:
            self._headers.popall(name, None)


class Forwarder:
    """The aiohttp handler of the proxy port."""

    def __init__(
        self,
        generation: Callable[[], Generation],
        finished: Callable[[Exchange], None],
        draining: Callable[[], bool],
    ) -> None:
        self._generation = generation
        self._finished = finished
        self._gate = sidecar_stages(draining)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = Exchange(
            request_id=caller_request_id(request.headers.get("X-Request-Id")) or new_request_id(),
            method=request.method,
            # Encoded and without the query: no secrets in query strings, no
            # control characters from percent-decoding in a log line.
            path=request.rel_url.raw_path,
            started=time.monotonic(),
            declared_length=request.content_length,
            request_headers=request.headers,
        )
        try:
            return await self._handle(request, exchange)
        except SidecarError as error:
            exchange.status, exchange.error = error.status, error.code
            exchange.upstream = exchange.upstream or error.upstream
            close = isinstance(error, CLOSES_THE_CONNECTION) or asks_upgrade(request)
            if isinstance(error, UNREAD):
                refuse_to_read_on(request)
            as_http11 = request.version not in SPOKEN_VERSIONS
            return error_response(error, exchange.request_id, close=close, as_http11=as_http11)
        except (asyncio.CancelledError, ConnectionResetError):
            exchange.error = exchange.error or "client_disconnected"
            exchange.aborted = True
            raise
        except Exception:
            # aiohttp answers 500 (or aborts, past the headers); account for it.
            exchange.error = exchange.error or "internal_error"
            exchange.status = exchange.status or 500
            raise
        finally:
            self._finished(exchange)

    async def _handle(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        check_version(request)
        check_framing(request)
        await self._gate.admit(exchange)
        try:
            # The one snapshot of the config this request sees, whatever reloads
            # happen while it runs.
            generation = exchange.generation = self._generation()
            match = generation.router.resolve(request.method, request.raw_path, request.headers.get(hdrs.HOST))
            pool = generation.pools[match.upstream.name]
            exchange.match, exchange.upstream, exchange.pool = match, pool.name, pool
            # Counted before the first await: a reload that retires this pool
            # must see the request, or it could close the pool under it.
            pool.request_started()
            try:
                exchange.waiting_since = time.monotonic()
                await pool.stages.admit(exchange)
                try:
                    return await self._attempts(request, exchange, pool)
                finally:
                    pool.stages.release(exchange)
            finally:
                pool.request_finished()
        finally:
            self._gate.release(exchange)

    async def _attempts(self, request: web.BaseRequest, exchange: Exchange, pool: UpstreamPool) -> web.StreamResponse:
        """Attempts at the upstream until one is relayed or the stages want no other.

        A request whose body is streaming cannot be sent twice (its bytes are
        gone once sent), so it gets exactly one attempt.
        """
        stages = pool.stages
        repeatable = not request.body_exists
        attempt = exchange.begin_attempt(time.monotonic())
        while True:
            try:
                response = await self._send(request, exchange, pool)
            except SidecarError as error:
                attempt.error = error.code
                stages.observe(exchange, attempt)
                delay = stages.next_attempt(exchange, attempt) if repeatable else None
                if delay is None:
                    raise
            else:
                try:
                    self._answered(exchange, attempt, response)
                    stages.observe(exchange, attempt)
                    delay = stages.next_attempt(exchange, attempt) if repeatable else None
                    if delay is None:
                        return await self._relay(request, response, exchange)
                finally:
                    await response.aclose()
            await asyncio.sleep(delay)
            attempt = exchange.begin_attempt(time.monotonic())
            # Every attempt after the first passes the stages' per-attempt gates
            # (circuit, pause, token) while the request keeps its slot.
            await stages.before_retry(exchange, attempt)
            attempt.started = time.monotonic()

    async def _send(self, request: web.BaseRequest, exchange: Exchange, pool: UpstreamPool) -> httpx.Response:
        """One attempt: send the request, wait for the response head."""
        match = exchange.match
        generation = exchange.generation
        assert match is not None and generation is not None
        content = request_body(request, exchange, generation.inbound) if request.body_exists else None
        upstream_request = httpx.Request(
            request.method,
            pool.base_url,
            headers=upstream_headers(
                request.raw_headers, request.headers.getall(hdrs.CONNECTION, ()), pool, exchange.request_id
            ),
            content=content,
            extensions={
                # The connection pool may only wait for what is left of
                # timeouts.pool after the stages, so no request waits longer in total.
                "timeout": {**pool.timeout_extension, "pool": exchange.wait_allowance(time.monotonic()) or 0.0},
                "target": match.target.encode("latin-1"),
            },
        )
        try:
            return await pool.client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            raise from_upstream_exception(exc, pool.name, retry_after=pool.admission.retry_after()) from None

    @staticmethod
    def _answered(exchange: Exchange, attempt: Attempt, response: httpx.Response) -> None:
        now = time.monotonic()
        attempt.status = response.status_code
        attempt.headers_after = now - attempt.started
        exchange.upstream_time = attempt.headers_after
        exchange.http_version = response.http_version
        raw = response.headers.raw
        if may_carry_signal(raw):
            attempt.signal_headers = raw

    async def _relay(
        self, request: web.BaseRequest, response: httpx.Response, exchange: Exchange
    ) -> web.StreamResponse:
        """Stream the upstream response back; abort the caller's connection on failure."""
        relayed, invented = downstream_headers(
            response.headers.raw,
            response.headers.get("connection"),
            framed_by_coding="transfer-encoding" in response.headers,
            upstream=exchange.upstream,
        )
        downstream = _Response(response.status_code, invented)
        for name, value in relayed:
            downstream.headers.add(name, value)
        downstream.headers["X-Request-Id"] = exchange.request_id
        if asks_upgrade(request):
            # Never tunnelled: the Upgrade header was not forwarded and the
            # answer is an ordinary response. aiohttp's C parser stops parsing
            # a connection after an upgrade request, so it cannot be reused.
            downstream.force_close()
        await downstream.prepare(request)
        # Only now has the caller been sent a status: a caller gone before the
        # headers went out (prepare raising ConnectionResetError) counts as 499.
        exchange.status = response.status_code
        try:
            if request.method != "HEAD" and response.status_code not in _BODYLESS_STATUS:
                async for chunk in response.aiter_raw():
                    exchange.bytes_out += len(chunk)
                    await downstream.write(chunk)
            else:
                # Read the (empty) body to its end all the same: a response that
                # was never read to its end closes its connection instead of
                # returning it to the pool.  Body bytes an upstream sends anyway
                # are not part of this response; the pool sees them and does
                # not reuse the connection.
                async for _ in response.aiter_raw():
                    pass
        except httpx.TransportError:
            # Headers are out: the only honest signal left is to abort, so the
            # caller cannot mistake a truncated body for a complete one.
            exchange.error = "upstream_body_error"
            exchange.aborted = True
            _abort(request)
            return downstream
        await downstream.write_eof()
        return downstream


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
