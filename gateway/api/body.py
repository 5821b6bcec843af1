"""Reading and checking a client's JSON body, once, without re-encoding it."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import InvalidRequest, RequestTimeout, RequestTooLarge

__all__ = ["parse_call_body", "read_body"]


async def read_body(request: web.Request, limit: int, within: float = 30.0) -> bytes:
    """The raw body; 413 when it is over `limit` bytes, 408 when it takes over `within` s."""
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(f"request body of {length} bytes is over the limit of {limit}")
    try:
        if request.content.is_eof():  # all of it came with the headers: nothing to wait for
            return await request.read()
        async with asyncio.timeout(within):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLarge(f"request body is over the limit of {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {within:g}s") from None


def parse_call_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a model call, which must name its `model`."""
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    return payload
