"""What may end a stream before its upstream does: strict enforcement and the client's cap.

Strict enforcement (`billing.enforcement: strict`) never lets a prepaid balance be overspent.
A stream's hold covers the output it was admitted for; one whose request names its own output
limit is held for all of it and is not watched here (it is charged no more than its hold,
below, whatever the upstream does). Before a chunk that would take the
stream past it goes out, the hold is extended (in steps of `hold_output_tokens`, as many as the
chunk needs) from the available balance (balance minus every open hold, checked by the extend
script); when the balance cannot cover that, the stream ends cleanly before the chunk (a last
chunk with `finish_reason: "length"`, then `[DONE]`), and the call is billed for what was
delivered; the events of that chunk before its first text (a Responses or Messages stream's
opening events), or the whole events of it that the hold still covers (chat and legacy
completions), still go out first. A non-streamed call is sent with a `max_tokens` its hold
covers. Whatever an
upstream reports beyond that, a strict call is never charged more than it holds
(`limited_charge`), so the balance, which covers every hold, never goes below zero.

A client's cost cap (`x-gateway-max-cost`) ends a stream the same way once its output reaches
what the cap covers (never extended past it), and a capped call is never charged more than
its cap.

Tokens are judged by events (the meter's `pieces_in`: a chat chunk's `data:` lines, the two
newer APIs' text deltas), at least one per content piece as upstreams send them, with a
margin so that a multi-token piece does not overrun the hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import tiktoken

from gateway.ledger import Ledger
from gateway.metering.completion import CompletionMeter
from gateway.timefmt import now_ms

__all__ = ["OutputGate", "limited_charge"]

MARGIN = 8  # pieces held back from the covered count before extending

# The cost, as the client is shown it, of a stream cut short: (prompt, completion) tokens ->
# a decimal string, or None when costs are not reported.
LocalCost = Callable[[int, int], str | None]


class OutputGate:
    """Extends a stream's hold as it grows (strict), or says where to stop."""

    def __init__(
        self,
        meter: CompletionMeter,
        covered_tokens: int,
        *,
        send_usage: bool,
        prompt_tokens: int,
        encoding: tiktoken.Encoding,
        extend_hold: Callable[[int], Any] | None = None,
        extension_tokens: int = 1,
        output_cost: Callable[[int], int] | None = None,
        most_tokens: int | None = None,
        local_cost: LocalCost | None = None,
    ) -> None:
        self.encoding = encoding
        self.meter = meter
        self.covered = covered_tokens
        # Strict: grows the hold by an amount (True when the balance covered it); None: the
        # covered tokens are all the stream gets (a cap without strict enforcement).
        self.extend_hold = extend_hold
        self.extension = max(1, extension_tokens)
        self.output_cost = output_cost  # what n more output tokens may cost (pricing)
        self.most = most_tokens  # the cap's tokens: no extension goes past them
        self.send_usage = send_usage
        self.prompt_tokens = prompt_tokens
        self.local_cost = local_cost
        self.extra_held = 0  # micro-units the extensions added to the hold

    @classmethod
    def strict(
        cls,
        ledger: Ledger,
        account_id: str,
        request_id: str,
        meter: CompletionMeter,
        covered_tokens: int,
        **options: Any,
    ) -> OutputGate:
        """A gate whose extensions are held from the account's available balance."""

        async def extend(amount: int) -> bool:
            return await ledger.extend(account_id, request_id, amount, now_ms())

        return cls(meter, covered_tokens, extend_hold=extend, **options)

    def needs_more(self, chunk: bytes) -> bool:
        """True when the pieces relayed so far and the events of `chunk` come within the
        margin of what is covered."""
        return len(self.meter.texts) + self.meter.pieces_in(chunk) + MARGIN >= self.covered

    async def extend(self, chunk: bytes) -> bool:
        """Hold as many more extensions as `chunk` needs; False when the balance (or the
        cap) cannot cover that."""
        while self.needs_more(chunk):
            if self.extend_hold is None:
                return False
            step = self.extension
            if self.most is not None:
                step = min(step, self.most - self.covered)
                if step <= 0:
                    return False
            extra = self.output_cost(step) if self.output_cost is not None else 0
            if not await self.extend_hold(extra):
                return False
            self.covered += step
            self.extra_held += extra
        return True

    def leading_bytes(self, chunk: bytes) -> bytes:
        """What of `chunk`, where the stream is stopped, still goes out first: its opening
        events, which carry no text (a stream stopped at its first chunk still opens), or,
        for chat and legacy completions, the whole events the covered output still takes
        (a fast upstream can send a whole answer in one read)."""
        lead = self.meter.leading_events(chunk)
        if lead:
            return lead
        room = self.covered - MARGIN - 1 - len(self.meter.texts)  # as `needs_more` counts
        return self.meter.events_within(chunk, room)

    def closing_bytes(self) -> bytes:
        """The clean end of a stopped stream, shaped like the stream's own chunks."""
        completion_tokens = self.meter.local_tokens(self.encoding)
        own = self.meter.closing_events(self.prompt_tokens, completion_tokens)
        if own is not None:  # a Responses or Messages stream: its API's own end
            return own
        last: dict[str, Any] = self.meter.last or {}
        chat = last.get("object") == "chat.completion.chunk"
        choices = []
        for index in sorted(self.meter.choice_texts()) or [0]:  # every choice ends
            choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": "length"}
            if chat:
                choice["delta"] = {}
            else:
                choice["text"] = ""
            choices.append(choice)
        head = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
        out = b"data: " + orjson.dumps({**head, "choices": choices}) + b"\n\n"
        if self.send_usage:
            usage: dict[str, Any] = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
            }
            cost = (
                self.local_cost(self.prompt_tokens, completion_tokens) if self.local_cost else None
            )
            if cost is not None:
                usage["cost"] = cost
            out += b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n"
        return out + b"data: [DONE]\n\n"


def limited_charge(cost: int, most: int) -> tuple[int, int]:
    """What a call that may not be charged more than `most` is charged, and what it is not."""
    if cost <= most:
        return cost, 0
    return most, cost - most
