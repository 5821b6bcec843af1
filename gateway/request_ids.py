"""Request ids: `req_` + 32 hex digits for clients and records, the same digits as a UUID for
upstreams.

Each id keys a call's billing records, so the gateway never reuses one, nor a client's. The 32
digits are laid out as a version-4 UUID's: 20 random digits drawn once per process (with the
UUID's version and variant digits fixed), then a 12-digit counter. So ids are unique across
processes and restarts without a random draw (a system call) per call, and the id sent
upstream in `X-Request-Id` is a UUID (llama-cpp-python's server, and other servers built on
starlette-context, answer an empty 400 to anything else) that an operator can match to the
gateway's id digit for digit.
"""

from __future__ import annotations

import itertools
import os
import uuid

__all__ = ["new_request_id", "upstream_request_id"]

PREFIX = "req_"
_COUNTER_DIGITS = 12  # 2^48 calls per process before the counter would wrap


class _RequestIds:
    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        digits = list(os.urandom(10).hex())
        digits[12] = "4"  # the UUID version
        digits[16] = "89ab"[int(digits[16], 16) & 3]  # the RFC 9562 variant
        self.prefix = PREFIX + "".join(digits)
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):0{_COUNTER_DIGITS}x}"


_REQUEST_IDS = _RequestIds()


def new_request_id() -> str:
    """A fresh id."""
    return _REQUEST_IDS.next()


def upstream_request_id(request_id: str) -> str:
    """The id as a UUID, for upstreams: the same 32 digits for the gateway's own ids, else (an
    id of another form) a UUID derived from it."""
    digits = request_id.removeprefix(PREFIX)
    if len(digits) == 32:
        try:
            return str(uuid.UUID(hex=digits))
        except ValueError:
            pass
    return str(uuid.uuid5(uuid.NAMESPACE_URL, request_id))
