"""Send a call to the first reachable upstream and relay its answer back as it arrives.

Failover happens only while no upstream has been reached: once a request is sent, retrying it
elsewhere could run (and bill) the generation twice. The answer is relayed chunk by chunk, so
the first token leaves the gateway as soon as it arrives; each chunk is offered to an optional
transform (the meter), which passes it on untouched unless it must hide what the gateway added.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.schema import TimeoutsConfig
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.proxy.headers import DEFAULT_RESPONSE_HEADERS, request_headers, response_headers
from gateway.proxy.routing import Upstream

__all__ = ["ChunkTransform", "RelayOutcome", "UpstreamCall", "open_upstream", "relay"]

# Reads a stream chunk and returns the bytes to send on (the meter; it may hold back a partial
# event or drop a chunk the client did not ask for).
ChunkTransform = Callable[[bytes], bytes]
RelayStatus = Literal["ok", "client_disconnected", "upstream_error", "upstream_timeout"]

_CONNECT_FAILURES = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_ANTHROPIC_PATHS = "/messages"


class StreamGate(Protocol):
    """Strict enforcement's say over a stream: may it go on, and how does it end if not."""

    def needs_more(self, chunk: bytes) -> bool: ...

    async def extend(self, chunk: bytes) -> bool: ...

    def leading_bytes(self, chunk: bytes) -> bytes: ...

    def closing_bytes(self) -> bytes: ...


@dataclass(slots=True)
class UpstreamCall:
    """An upstream answer whose headers have arrived and whose body is still to be read."""

    response: aiohttp.ClientResponse
    upstream: Upstream
    started: float  # loop time when the call was sent
    deadline_first_byte: float
    # Upstreams tried first that refused the connection (failed over, not failed).
    refused: tuple[str, ...] = ()


@dataclass(slots=True)
class RelayOutcome:
    """How relaying ended, for settlement and logs."""

    status: RelayStatus = "ok"
    streamed: bool = False
    first_chunk_at: float | None = None  # time.perf_counter()
    enforced: bool = False  # strict enforcement ended the stream (cleanly) before the upstream
    body: bytes | None = field(default=None, repr=False)  # the whole body when not streamed


async def open_upstream(
    session: aiohttp.ClientSession,
    candidates: tuple[Upstream, ...],
    path: str,
    body_for: Callable[[Upstream], bytes] | None,
    incoming: CIMultiDictProxy[str],
    request_id: str,
    timeouts: TimeoutsConfig,
    method: str = "POST",
) -> UpstreamCall:
    """Send the call (a POST with the body `body_for` gives each upstream, unless `method`
    says otherwise) to the first upstream that accepts a connection; raise 502/504 per SPEC
    section 6. Anthropic's routes get the upstream's key as `x-api-key` too (Anthropic's
    API reads that header; vLLM and LiteLLM read either)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeouts.first_byte
    client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect)
    failures: list[str] = []
    tried: list[str] = []
    for upstream in candidates:
        headers = request_headers(incoming, upstream.api_key, request_id)
        if upstream.api_key and path.startswith(_ANTHROPIC_PATHS):
            headers["x-api-key"] = upstream.api_key
        try:
            async with asyncio.timeout_at(deadline):
                response = await session.request(
                    method,
                    upstream.base_url + path,
                    data=None if body_for is None else body_for(upstream),
                    headers=headers,
                    timeout=client_timeout,
                    allow_redirects=False,
                )
        except _CONNECT_FAILURES as exc:
            failures.append(f"{upstream.label}: {exc.__class__.__name__}")
            tried.append(upstream.label)
            continue
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream {upstream.label} sent no answer within {timeouts.first_byte:g}s",
                upstreams=(upstream.label,),
                refused=tuple(tried),
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"upstream {upstream.label} failed: {exc.__class__.__name__}",
                upstreams=(upstream.label,),
                refused=tuple(tried),
            ) from None
        return UpstreamCall(response, upstream, started, deadline, tuple(tried))
    raise UpstreamUnavailable(
        "no upstream could be reached (" + "; ".join(failures) + ")", refused=tuple(tried)
    )


def _is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


async def relay(
    request: web.Request,
    call: UpstreamCall,
    timeouts: TimeoutsConfig,
    transform: ChunkTransform | None = None,
    flush: Callable[[], bytes] | None = None,
    extra_headers: Mapping[str, str] | None = None,
    gate: StreamGate | None = None,
    send_whole: bool = False,
    passed_headers: tuple[str, ...] = DEFAULT_RESPONSE_HEADERS,
    answer_headers: Callable[[bytes], Awaitable[Mapping[str, str]]] | None = None,
    after_chunk: Callable[[], None] | None = None,
) -> tuple[web.StreamResponse, RelayOutcome]:
    """Relay the upstream answer to the client.

    Raises 502/504 only while the client has been sent nothing; after that, failures end up
    in the outcome's status. Of the upstream's headers only `passed_headers` reach the client,
    and `extra_headers` (the gateway's) replace any of the same name. A non-streamed body is
    kept in the outcome for the meter, and with `send_whole` it is written out here, so that
    what the caller does next (settling the call) adds nothing to the client's wait, as for a
    stream; `answer_headers` reads such a body first and gives headers to add (its cost).
    A stream's `after_chunk` runs after each chunk is written.
    """
    upstream = call.response
    outcome = RelayOutcome(streamed=_is_event_stream(upstream))
    try:
        if not outcome.streamed:
            headers = _client_headers(call, extra_headers, passed_headers)
            whole = await _relay_whole(call, timeouts, outcome, headers)
            if answer_headers is not None and outcome.body is not None:
                whole.headers.update(await answer_headers(outcome.body))
            if send_whole:
                try:
                    await whole.prepare(request)
                    await whole.write_eof()
                except (ConnectionError, aiohttp.ClientConnectionResetError):
                    outcome.status = "client_disconnected"
            return whole, outcome
        return (
            await _relay_stream(
                request,
                call,
                timeouts,
                outcome,
                transform,
                flush,
                _client_headers(call, extra_headers, passed_headers),
                gate,
                after_chunk,
            ),
            outcome,
        )
    except asyncio.CancelledError:
        upstream.close()  # the client left (or shutdown cut the call): stop the generation
        raise
    finally:
        upstream.release()


def _client_headers(
    call: UpstreamCall, extra_headers: Mapping[str, str] | None, passed: tuple[str, ...]
) -> CIMultiDict[str]:
    headers = response_headers(call.response.headers, passed)
    if extra_headers:
        headers.update(extra_headers)
    return headers


async def _relay_whole(
    call: UpstreamCall,
    timeouts: TimeoutsConfig,
    outcome: RelayOutcome,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    upstream = call.response
    try:
        async with asyncio.timeout_at(call.deadline_first_byte + timeouts.idle):
            body = await upstream.read()
    except TimeoutError:
        upstream.close()
        raise UpstreamTimeout(
            f"upstream {call.upstream.label} stalled while answering",
            upstreams=(call.upstream.label,),
        ) from None
    except aiohttp.ClientError as exc:
        upstream.close()
        raise UpstreamUnavailable(
            f"upstream {call.upstream.label} failed while answering: {exc.__class__.__name__}",
            upstreams=(call.upstream.label,),
        ) from None
    outcome.body = body
    return web.Response(status=upstream.status, body=body, headers=headers)


async def _send(response: web.StreamResponse, data: bytes, outcome: RelayOutcome) -> bool:
    """Write to the client; False (and the outcome says why) once the client has gone."""
    if not data:
        return True
    try:
        await response.write(data)
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        outcome.status = "client_disconnected"
        return False
    return True


async def _first_chunk(call: UpstreamCall) -> bytes:
    """The first body chunk, read before the client sees a status: until then a failure can
    still be a clean 502/504 that costs nothing."""
    try:
        async with asyncio.timeout_at(call.deadline_first_byte):
            return await call.response.content.readany()
    except TimeoutError:
        call.response.close()
        raise UpstreamTimeout(
            f"upstream {call.upstream.label} sent no first token in time",
            upstreams=(call.upstream.label,),
        ) from None
    except aiohttp.ClientError as exc:
        call.response.close()
        raise UpstreamUnavailable(
            f"upstream {call.upstream.label} failed before its first token: "
            f"{exc.__class__.__name__}",
            upstreams=(call.upstream.label,),
        ) from None


async def _relay_stream(
    request: web.Request,
    call: UpstreamCall,
    timeouts: TimeoutsConfig,
    outcome: RelayOutcome,
    transform: ChunkTransform | None,
    flush: Callable[[], bytes] | None,
    headers: CIMultiDict[str],
    gate: StreamGate | None,
    after_chunk: Callable[[], None] | None = None,
) -> web.StreamResponse:
    upstream = call.response
    chunk = await _first_chunk(call)
    loop = asyncio.get_running_loop()
    outcome.first_chunk_at = time.perf_counter()
    response = web.StreamResponse(status=upstream.status, headers=headers)
    await response.prepare(request)
    content = upstream.content
    try:
        async with asyncio.timeout(timeouts.idle) as deadline:
            while chunk:
                if gate is not None and gate.needs_more(chunk) and not await gate.extend(chunk):
                    # The balance cannot cover more: end the stream cleanly here (after the
                    # opening events of this chunk, if it holds them).
                    outcome.enforced = True
                    lead = gate.leading_bytes(chunk)
                    if lead:
                        await _send(response, transform(lead) if transform else lead, outcome)
                    await _send(response, gate.closing_bytes(), outcome)
                    break
                out = transform(chunk) if transform is not None else chunk
                if not await _send(response, out, outcome):
                    break
                if after_chunk is not None:
                    after_chunk()
                deadline.reschedule(loop.time() + timeouts.idle)
                chunk = await content.readany()
            else:
                if flush is not None:
                    await _send(response, flush(), outcome)
    except TimeoutError:
        outcome.status = "upstream_timeout"
    except (aiohttp.ClientError, asyncio.IncompleteReadError):
        outcome.status = "upstream_error"
    if outcome.status == "ok":
        if outcome.enforced:
            upstream.close()  # stop the generation nobody will pay for
        try:
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            outcome.status = "client_disconnected"  # reset as the stream ended
        return response
    # Stop the upstream's generation, and end the client's stream without its last chunk so
    # the client sees a truncated answer rather than a clean end.
    upstream.close()
    if request.transport is not None:
        request.transport.close()
    return response
