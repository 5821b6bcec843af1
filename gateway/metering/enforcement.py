"""Strict enforcement (`billing.enforcement: strict`): a prepaid balance is never overspent.

A stream's hold covers the output it was admitted for. Before a chunk that would take the
stream past it goes out, the hold is extended (in steps of `hold_output_tokens`, as many as the
chunk needs) from the available balance (balance minus every open hold, checked by the extend
script); when the balance cannot cover that, the stream ends cleanly before the chunk (a last
chunk with `finish_reason: "length"`, then `[DONE]`), and the call is billed for what was
delivered. Tokens are judged by events, at least one per content piece as upstreams send
them, with a margin so that a multi-token piece does not overrun the hold. A non-streamed call
is sent with a `max_tokens` its hold covers. Whatever an upstream reports beyond that, a
strict call is never charged more than it holds (`strict_charge`), so the balance, which
covers every hold, never goes below zero.
"""

from __future__ import annotations

from typing import Any

import orjson
import tiktoken

from gateway.ledger import Ledger
from gateway.metering.completion import CompletionMeter
from gateway.money import call_cost

__all__ = ["StrictGuard", "strict_charge"]

MARGIN = 8  # pieces held back from the covered count before extending


class StrictGuard:
    """Extends a stream's hold as it grows, or says where to stop."""

    def __init__(
        self,
        ledger: Ledger,
        account_id: str,
        request_id: str,
        meter: CompletionMeter,
        covered_tokens: int,
        extension_tokens: int,
        output_price: int,
        send_usage: bool,
        prompt_tokens: int,
        encoding: tiktoken.Encoding,
    ) -> None:
        self.encoding = encoding
        self.ledger = ledger
        self.account_id = account_id
        self.request_id = request_id
        self.meter = meter
        self.covered = covered_tokens
        self.extension = max(1, extension_tokens)
        self.output_price = output_price
        self.send_usage = send_usage
        self.prompt_tokens = prompt_tokens
        self.extra_held = 0  # micro-units the extensions added to the hold

    def needs_more(self, chunk: bytes) -> bool:
        """True when the pieces relayed so far and the events of `chunk` come within the
        margin of the hold."""
        return len(self.meter.texts) + chunk.count(b"data:") + MARGIN >= self.covered

    async def extend(self, chunk: bytes) -> bool:
        """Hold as many more extensions as `chunk` needs; False when the balance cannot."""
        while self.needs_more(chunk):
            extra = call_cost(0, self.extension, 0, self.output_price)
            if not await self.ledger.extend(self.account_id, self.request_id, extra):
                return False
            self.covered += self.extension
            self.extra_held += extra
        return True

    def closing_bytes(self) -> bytes:
        """The clean end of a stopped stream, shaped like the stream's own chunks."""
        completion_tokens = self.meter.local_tokens(self.encoding)
        last: dict[str, Any] = self.meter.last or {}
        chat = last.get("object") == "chat.completion.chunk"
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        head = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
        out = b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"
        if self.send_usage:
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
            }
            out += b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n"
        return out + b"data: [DONE]\n\n"


def strict_charge(cost: int, held: int) -> tuple[int, int]:
    """What a strict call is charged, and what it is not: never more than it holds."""
    if cost <= held:
        return cost, 0
    return held, cost - held
