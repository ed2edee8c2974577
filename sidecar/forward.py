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

from .body import ReplayableBody, request_body
from .compat.aiohttp import RelayedResponse
from .errors import (
    ClientDisconnected,
    InternalError,
    SidecarError,
    UpstreamBodyError,
    attempt_failure,
    error_response,
    from_upstream_exception,
)
from .exchange import Attempt, Exchange, Generation
from .headers import caller_request_id, downstream_headers, new_request_id, upstream_headers
from .policy.deadline import HEADER_BYTES, budget_gone, caller_deadline, exceeded, forwarded_budget
from .policy.retry import idempotent, parse_retry_after
from .policy.signals import may_carry_signal
from .policy.stack import sidecar_stages
from .pools import UpstreamPool
from .upstream.stream import UpstreamResponse
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
_CHUNKED = (b"Transfer-Encoding", b"chunked")
# A request of these methods without a body still says so (RFC 9110 §8.6).
_LENGTH_EXPECTED = frozenset({"POST", "PUT", "PATCH"})
_NO_CONTENT = (b"Content-Length", b"0")
_RETRY_AFTER_STATUSES = (429, 503)


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
            response = error_response(error, exchange.request_id, close=close, as_http11=as_http11)
            if len(exchange.attempts) > 1:
                response.headers["X-Sidecar-Attempts"] = str(len(exchange.attempts))
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            exchange.error = exchange.error or ClientDisconnected.code
            exchange.aborted = True
            raise
        except Exception:
            # aiohttp answers 500 (or aborts, past the headers); account for it.
            exchange.error = exchange.error or InternalError.code
            exchange.status = exchange.status or 500
            raise
        finally:
            self._finished(exchange)

    async def _handle(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        check_version(request)
        check_framing(request)
        # After the framing checks (a request whose framing cannot be trusted
        # must get the answer that closes its connection); the caller's budget
        # counts from the moment its headers were in, all the same.
        exchange.deadline = caller_deadline(request.headers, exchange.started)
        await self._gate.admit(exchange)
        try:
            # The one snapshot of the config this request sees, whatever reloads
            # happen while it runs.
            generation = exchange.generation = self._generation()
            match = generation.router.resolve(request.method, request.raw_path, request.headers.get(hdrs.HOST))
            pool = generation.pools[match.upstream.name]
            exchange.match, exchange.upstream, exchange.pool = match, pool.name, pool
            exchange.caller, exchange.caller_label = pool.caller_of(request.headers)
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

        Only the last attempt reaches the caller.  The last answer (a response
        read up to its headers, or an error) is kept until the next attempt is
        cleared by the stages' per-attempt gates: if one refuses (an open
        circuit, a pause, no token) the caller gets that last answer, not the
        refusal.  Nothing is retried once the response is being relayed.
        """
        stages = pool.stages
        retries = pool.retries
        exchange.idempotent = idempotent(request.method, "Idempotency-Key" in request.headers)
        body: ReplayableBody | None = None
        generation = exchange.generation
        assert generation is not None
        if request.body_exists:
            source = request_body(request, exchange, generation.inbound)
            declared = request.content_length
            max_body = retries.settings.max_body
            if retries.enabled and (declared is None or declared <= max_body):
                body = ReplayableBody(source, max_body)
            else:
                # Too large to keep (or never retried): streamed once, never repeated.
                exchange.replayable = False
                body = ReplayableBody(source, -1)
        attempt = exchange.begin_attempt(time.monotonic())
        # What the stages waited before the first attempt: later attempts may
        # only wait what is left of timeouts.pool (backoff and attempts are not waits).
        waited = attempt.started - (exchange.waiting_since or attempt.started)
        try:
            while True:
                response: UpstreamResponse | None = None
                failed: SidecarError | None = None
                try:
                    response = await self._send(request, exchange, pool, attempt, body)
                except SidecarError as error:
                    attempt.error = error.code
                    failed = error
                try:
                    if response is not None:
                        self._answered(exchange, attempt, response)
                    if body is not None and body.overflowed:
                        exchange.replayable = False
                    stages.observe(exchange, attempt)
                    # A body that could not be kept whole is never sent twice,
                    # whichever stage asks for another attempt.
                    delay = stages.next_attempt(exchange, attempt) if exchange.replayable else None
                    if delay is not None:
                        await asyncio.sleep(delay)
                        upcoming = exchange.begin_attempt(time.monotonic())
                        exchange.waiting_since = upcoming.started - waited
                        try:
                            # Every attempt after the first passes the stages'
                            # per-attempt gates while the request keeps its slot.
                            await stages.before_retry(exchange, upcoming)
                        except SidecarError:
                            exchange.attempts.pop()  # never made: the last answer stands
                            delay = None
                    if delay is None:
                        if response is None:
                            assert failed is not None
                            raise failed
                        return await self._relay(request, response, exchange)
                finally:
                    if response is not None:
                        await response.aclose()
                attempt = upcoming
                attempt.started = time.monotonic()
        finally:
            if body is not None:
                await body.aclose()

    async def _send(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        pool: UpstreamPool,
        attempt: Attempt,
        body: ReplayableBody | None,
    ) -> UpstreamResponse:
        """One attempt: send the request, wait for the response head."""
        match = exchange.match
        assert match is not None
        now = time.monotonic()
        headers = upstream_headers(
            request.raw_headers, request.headers.getall(hdrs.CONNECTION, ()), pool, exchange.request_id
        )
        budget = forwarded_budget(exchange, now)
        if budget is not None:
            # What is left of the caller's budget, so the next hop shares the deadline.
            headers.append((HEADER_BYTES, budget))
        if body is not None:
            if request.content_length is None:
                # The caller's framing is hop-by-hop: a body of unknown length goes up chunked.
                headers.append(_CHUNKED)
        elif request.method in _LENGTH_EXPECTED and request.content_length is None:
            headers.append(_NO_CONTENT)
        send = pool.transport.send(
            request.method,
            match.target.encode("latin-1"),
            headers,
            None if body is None else body.stream(),
            # The connection pool may only wait for what is left of
            # timeouts.pool after the stages, so no request waits longer in total.
            {**pool.timeout_extension, "pool": exchange.wait_allowance(now) or 0.0},
        )
        try:
            if exchange.deadline is None:
                return await send
            # Connecting, sending and waiting for the response head, all within
            # what is left of the caller's budget; the configured timeouts still
            # apply inside it, and to the body afterwards.
            async with asyncio.timeout(exchange.deadline - now) as scope:
                return await send
        except TimeoutError:
            if exchange.deadline is None or not scope.expired():
                raise
            raise exceeded(exchange, "waiting for the upstream's response headers") from None
        except httpx.TransportError as exc:
            attempt.failure = attempt_failure(exc)
            if isinstance(exc, httpx.TimeoutException) and budget_gone(exchange, time.monotonic()):
                # A configured timeout that fired with the caller's budget: the budget is what ran out.
                raise exceeded(exchange, "waiting for the upstream") from None
            raise from_upstream_exception(exc, pool.name, retry_after=pool.admission.retry_after()) from None

    @staticmethod
    def _answered(exchange: Exchange, attempt: Attempt, response: UpstreamResponse) -> None:
        now = time.monotonic()
        attempt.status = response.status_code
        if attempt.status in _RETRY_AFTER_STATUSES:
            attempt.retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        attempt.headers_after = now - attempt.started
        exchange.upstream_time = attempt.headers_after
        exchange.http_version = response.http_version
        raw = response.headers.raw
        if may_carry_signal(raw):
            attempt.signal_headers = raw

    async def _relay(
        self, request: web.BaseRequest, response: UpstreamResponse, exchange: Exchange
    ) -> web.StreamResponse:
        """Stream the upstream response back; abort the caller's connection on failure."""
        relayed, invented = downstream_headers(
            response.headers.raw,
            response.headers.get("connection"),
            framed_by_coding="transfer-encoding" in response.headers,
            upstream=exchange.upstream,
        )
        downstream = RelayedResponse(response.status_code, invented)
        for name, value in relayed:
            downstream.headers.add(name, value)
        downstream.headers["X-Request-Id"] = exchange.request_id
        if len(exchange.attempts) > 1:
            downstream.headers["X-Sidecar-Attempts"] = str(len(exchange.attempts))
        if asks_upgrade(request):
            # Never tunnelled: the Upgrade header was not forwarded and the
            # answer is an ordinary response. aiohttp's C parser stops parsing
            # a connection after an upgrade request, so it cannot be reused.
            downstream.force_close()
        await downstream.prepare(request)
        # Only now has the caller been sent a status (or will be, with the
        # first chunk): a caller gone before that (prepare raising
        # ConnectionResetError) counts as 499.
        status = exchange.status = response.status_code
        try:
            if request.method != "HEAD" and status not in _BODYLESS_STATUS:
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
            exchange.error = UpstreamBodyError.code
            exchange.aborted = True
            _abort(request)
            return downstream
        await downstream.write_eof()
        return downstream


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
