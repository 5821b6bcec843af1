"""One metered call's life: planned, admitted, relayed under watch, billed, settled.

`plan` counts the prompt and sizes the hold under the price sheet in force at admission (and
the client's cost cap); `admit` runs the one admission script (key, state, subscription, rate
limits and hold); `relay_hooks` gives the relay its per-chunk hook and the gate that may end a
stream early; `bill` counts and prices what was produced; `settle` / `release` hand the
result to the journal, which writes it to disk before the store and retries it until the
store has it. A call that fails before its first byte reaches the client costs nothing; one
that ends early is billed for what was produced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDictProxy

from gateway.accounts.apikeys import ParsedKey
from gateway.accounts.orphans import HoldInfo
from gateway.billing.gate import OutputGate, limited_charge
from gateway.config.schema import ModelConfig
from gateway.errors import CostCapExceeded, InvalidRequest, LedgerUnavailable
from gateway.ledger import Admission, Ledger, Reservation
from gateway.ledger.journal import Entry, SettlementJournal
from gateway.metering.completion import CompletionMeter
from gateway.metering.estimate import (
    check_prompt_size,
    limit_field,
    limit_fields,
    output_allowance,
)
from gateway.metering.events import meter_class
from gateway.metering.lease import LeaseKeeper
from gateway.metering.prompt import CallKind, count_prompt
from gateway.metering.tokenizers import get_encoding
from gateway.metering.usage import (
    CallStatus,
    Counted,
    UsageBound,
    anomaly_reporter,
    choices_of,
    count_call,
    read_usage,
)
from gateway.money import format_micros, parse_amount
from gateway.observability.access import CallLog
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.pricing import Prices, TokenUsage, in_force
from gateway.ratelimit import rate_rules
from gateway.state import Snapshot
from gateway.usage_record import UsageRecord

__all__ = [
    "AVAILABLE_HEADER",
    "COST_HEADER",
    "MAX_COST_HEADER",
    "CallServices",
    "MeteredCall",
    "cost_cap",
]

log = get_logger("gateway.billing")

_ASKS_FOR_USAGE = frozenset({"chat", "completions"})

COST_HEADER = "x-gateway-cost"
AVAILABLE_HEADER = "x-gateway-balance-available"
MAX_COST_HEADER = "x-gateway-max-cost"


def cost_cap(headers: CIMultiDictProxy[str]) -> int | None:
    """The client's cap on what the call may cost (micro-units), if it set one; a value that
    is not a positive decimal string is 400."""
    values = headers.getall(MAX_COST_HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(
            f"header {MAX_COST_HEADER} is given more than once", param=MAX_COST_HEADER
        )
    text = values[0]
    try:
        return parse_amount(text)
    except ValueError as exc:
        raise InvalidRequest(f"header {MAX_COST_HEADER}: {exc}", param=MAX_COST_HEADER) from None


@dataclass(frozen=True, slots=True)
class CallServices:
    """What a call uses of the app: the ledger, the journal, the metrics, and how to run a
    settlement as a task the app waits for at shutdown."""

    ledger: Ledger
    journal: SettlementJournal
    metrics: Metrics
    track: Callable[[Coroutine[Any, Any, None]], asyncio.Future[None]]


@dataclass(slots=True)
class _Bill:
    charged: int  # what the account is charged
    record: UsageRecord
    actual_tokens: int  # for the token limits' correction


class MeteredCall:
    """One metered call's state between its plan and its settlement."""

    def __init__(
        self,
        services: CallServices,
        snapshot: Snapshot,
        model: ModelConfig,
        key: ParsedKey,
        request_id: str,
        kind: CallKind,
        payload: dict[str, Any],
        cap: int | None,
        entry: CallLog,
    ) -> None:
        self.services = services
        self.snapshot = snapshot
        self.settings = settings = snapshot.settings
        self.model = model
        self.key = key
        self.request_id = request_id
        self.kind = kind
        self.payload = payload
        self.cap = cap
        self.log = entry
        self.stream = payload.get("stream") is True and kind != "embeddings"
        options = payload.get("stream_options")
        # Chat and legacy completions streams report usage only when asked; the gateway asks,
        # and hides it again from a client that did not. Responses and Messages streams
        # always report it (nothing to add, nothing to hide, no in-stream cost).
        self.client_wants_usage = (
            kind in _ASKS_FOR_USAGE
            and isinstance(options, dict)
            and options.get("include_usage") is True
        )
        self.add_usage = self.stream and kind in _ASKS_FOR_USAGE and not self.client_wants_usage
        self.encoding = get_encoding(model.tokenizer)
        self.admitted_ms = int(time.time() * 1000)
        # The sheet in force at admission bills the call, whatever a reload does meanwhile.
        self.prices: Prices | None = in_force(
            snapshot.schedules.get(model.name, ()), self.admitted_ms
        )
        billing = settings.billing
        self.report_cost = billing.report_cost
        self.strict = billing.enforcement == "strict" and self.prices is not None
        self.default_output = model.hold_output_tokens or billing.hold_output_tokens
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.hold = 0
        self.cap_tokens: int | None = None  # output tokens the cap leaves room for
        self.body_limits: dict[str, int] = {}  # output limits the upstream is sent instead
        self.bound = UsageBound(billing.max_tokens_per_call, billing.max_tokens_per_call)
        self.admission: Admission | None = None
        self.meter: CompletionMeter = meter_class(kind)()
        self.gate: OutputGate | None = None
        self.quoted: _Bill | None = None  # a whole answer's bill, made before it was sent
        self.flat: int | None = None  # a passthrough call's price (plan_flat)
        self.upstream_label = ""
        self.finished = False
        self.status: CallStatus | None = None  # how the call ended, once that is known

    # before the call -------------------------------------------------------------------

    async def plan(self, body_size: int) -> None:
        """Count the prompt and size the hold; 400 for limits the gateway cannot hold for,
        402 `cost_cap_exceeded` for a prompt that alone may cost more than the cap."""
        kind, payload, billing = self.kind, self.payload, self.settings.billing
        self.prompt_tokens = await count_prompt(
            kind, payload, self.encoding, body_size, media=self.snapshot.media
        )
        most = billing.max_tokens_per_call
        self.output_tokens = output_allowance(kind, payload, self.default_output, most)
        check_prompt_size(kind, self.prompt_tokens, most)
        report = anomaly_reporter(self.services.metrics, self.model.name, self.request_id)
        self.bound = UsageBound.of_call(kind, payload, most, report)
        prices = self.prices
        if prices is None:
            return
        self.hold = prices.hold(self.prompt_tokens, self.output_tokens)
        if self.strict:
            self._limit_to_hold()
        if self.cap is not None:
            self._fit_cap(prices, self.cap)

    def plan_flat(self, price: int) -> None:
        """A passthrough call: nothing counted, held and charged `price` (nothing for a
        dedicated model's pool); 402 `cost_cap_exceeded` for a price above the client's cap.
        Its body goes upstream as it came."""
        self.flat = price if self.model.billing == "tokens" else 0
        self.prices = None
        self.strict = False
        self.add_usage = self.client_wants_usage = False
        self.bound = UsageBound(0, 0)
        self.hold = self.flat
        if self.cap is not None and self.flat > self.cap:
            raise CostCapExceeded(
                f"this call costs {format_micros(self.flat)}, more than the "
                f"{format_micros(self.cap)} that {MAX_COST_HEADER} allows",
                param=MAX_COST_HEADER,
            )

    def _names_limit(self) -> bool:
        return any(self.payload.get(field) is not None for field in limit_fields(self.kind))

    def _fit_cap(self, prices: Prices, cap: int) -> None:
        """Hold no more than the cap; send a whole answer's upstream no output limit above
        what the cap covers (a stream is cut by the gate instead)."""
        room = prices.output_within(cap, self.prompt_tokens)
        if room < (0 if self.kind == "embeddings" else 1):
            least = prices.hold(self.prompt_tokens, 0 if self.kind == "embeddings" else 1)
            raise CostCapExceeded(
                f"this call may cost up to {format_micros(least)} before any output, more than "
                f"the {format_micros(cap)} that {MAX_COST_HEADER} allows",
                param=MAX_COST_HEADER,
            )
        self.cap_tokens = room
        self.hold = min(self.hold, cap)
        if self.stream or self.kind == "embeddings":
            return
        # Each choice has its own limit: n of them share what the cap covers.
        choices = choices_of(self.payload)
        each = room // choices
        if each < 1:
            raise CostCapExceeded(
                f"{choices} choices of one token each may cost more than the "
                f"{format_micros(cap)} that {MAX_COST_HEADER} allows",
                param=MAX_COST_HEADER,
            )
        fields = limit_fields(self.kind)
        named = [field for field in fields if self.payload.get(field) is not None]
        for field in named:
            if self.payload[field] > each:
                self.body_limits[field] = each
        if not named:
            field = limit_field(self.kind)
            self.body_limits[field] = min(self.body_limits.get(field, each), each)

    async def admit(self) -> Admission:
        """The admission script's answer (the caller refuses what is not `ok`). A client
        that leaves meanwhile, or a store whose answer is lost, gets its hold released."""
        billing = self.settings.billing
        prices = self.prices
        info = HoldInfo(
            self.model.name,
            self.prompt_tokens,
            prices.input if prices else 0,
            prices.output if prices else 0,
            self.key.key_id,
            self.stream,
            prices.version if prices else "",
            self.flat,
            self.cap,
        )
        reservation = Reservation(
            account_id=self.key.account_id,
            key_id=self.key.key_id,
            key_hash=self.key.key_hash,
            model=self.model.name,
            hold=self.hold,
            request_id=self.request_id,
            lease_until_ms=self.admitted_ms + int(billing.hold_lease * 1000),
            dedicated=self.model.billing == "dedicated",
            hold_info=info.encode(),
            now_ms=self.admitted_ms,
            tokens=self.prompt_tokens + self.output_tokens,
            rules=tuple(rate_rules(self.settings.rate_limits, self.model)),
        )
        try:
            admission = await self.services.ledger.reserve(reservation)
        except (asyncio.CancelledError, LedgerUnavailable):
            # The script may have run all the same: a release sent after it (through the
            # journal, so it lands even after an outage) drops whatever it held; where it
            # never ran, the release finds nothing.
            self.services.track(self.release())
            raise
        self.admission = admission
        if admission.bounded:
            self._bound_by_hold()
        return admission

    def _bound_by_hold(self) -> None:
        """A key with a budget never spends past it, so its call is run as strict enforcement
        runs every call, in either mode: a whole answer's upstream is sent the output limit
        its hold covers, a stream is gated (and extended only as far as the key's budget and
        the balance allow), and the call is charged no more than it held."""
        if self.strict or self.prices is None:
            return  # strict already, or a flat price: charged exactly what it held
        self.strict = True
        self._limit_to_hold()

    def _limit_to_hold(self) -> None:
        """Send a whole answer's upstream, where the request names no output limit, the one
        its hold covers (or the cap's, if less)."""
        if not self.stream and self.kind != "embeddings" and not self._names_limit():
            field = limit_field(self.kind)
            self.body_limits[field] = min(
                self.body_limits.get(field, self.output_tokens), self.output_tokens
            )

    # while it runs ---------------------------------------------------------------------

    def relay_hooks(self) -> tuple[Callable[[bytes], bytes], OutputGate | None, LeaseKeeper]:
        """The per-chunk hook, the gate that may end a stream early, and the lease keeper
        (started; the caller stops it)."""
        billing = self.settings.billing
        price = self._usage_cost if self.report_cost and self.client_wants_usage else None
        meter = self.meter = meter_class(self.kind)(strip_usage=self.add_usage, price=price)
        ledger = self.services.ledger
        keeper = LeaseKeeper(
            ledger,
            self.key.account_id,
            self.request_id,
            meter,
            self.encoding,
            billing.hold_lease,
            billing.checkpoint_tokens,
        )
        keeper.start()
        prices = self.prices
        # Strict enforcement watches a stream whose output the request did not limit; one
        # that names its own limit is held for all of it (and never charged past its hold).
        watched = self.strict and not self._names_limit()
        if self.stream and prices is not None and (watched or self.cap_tokens is not None):
            covered = self.output_tokens
            if self.cap_tokens is not None:
                covered = min(covered, self.cap_tokens) if self.strict else self.cap_tokens
            options: dict[str, Any] = {
                "send_usage": self.client_wants_usage,
                "prompt_tokens": self.prompt_tokens,
                "encoding": self.encoding,
                "most_tokens": self.cap_tokens,
                "local_cost": self._local_cost if self.report_cost else None,
            }
            if self.strict:
                self.gate = OutputGate.strict(
                    ledger,
                    self.key.account_id,
                    self.request_id,
                    meter,
                    covered,
                    extension_tokens=self.default_output,
                    output_cost=prices.output_cost,
                    **options,
                )
            else:
                self.gate = OutputGate(meter, covered, **options)

        # The keeper looks at the meter after each chunk is written (the relay's
        # `after_chunk`), so what the meter reads after the write is not read before it.
        return meter.feed, self.gate, keeper

    # pricing ---------------------------------------------------------------------------

    def _most_charged(self) -> int | None:
        """What the call may be charged at most: its hold under strict enforcement, its cap
        when the client set one (None: no limit but the usage bound)."""
        most = None
        if self.strict and self.admission is not None:
            most = self.admission.held + (self.gate.extra_held if self.gate else 0)
        if self.cap is not None:
            most = self.cap if most is None else min(most, self.cap)
        return most

    def _price(self, counted: Counted) -> tuple[int, int, int]:
        """(cost, charged, uncharged) of the counted tokens."""
        if self.flat is not None:
            cost = self.flat
        else:
            cost = self.prices.cost(counted.usage) if self.prices is not None else 0
        most = self._most_charged()
        charged, uncharged = (cost, 0) if most is None else limited_charge(cost, most)
        return cost, charged, uncharged

    def _quiet(self) -> UsageBound:
        """The call's bound, telling no anomaly: for a cost shown before the bill, which
        tells them once."""
        return UsageBound(self.bound.prompt_tokens, self.bound.completion_tokens)

    def _usage_cost(self, usage: dict[str, Any]) -> str | None:
        """The cost a stream's usage report gets: what this report will be billed at."""
        reported = read_usage(usage)
        if reported is None:
            return None  # billed from the gateway's count, not known yet
        counted = count_call(reported, self.prompt_tokens, 0, self._quiet())
        return format_micros(self._price(counted)[1])

    def _local_cost(self, prompt_tokens: int, completion_tokens: int) -> str | None:
        """The cost of a stream the gate ended (billed from the gateway's own count)."""
        counted = count_call(None, prompt_tokens, completion_tokens, self._quiet())
        return format_micros(self._price(counted)[1])

    # after it --------------------------------------------------------------------------

    async def bill(self, status: CallStatus) -> _Bill:
        """Count and price the call; its log entry is filled in."""
        if self.flat is not None:  # a passthrough call: its price, whatever it answered
            counted = Counted(TokenUsage(), "gateway", 0, 0)
        else:
            local_completion = await self.meter.count_local_tokens(self.encoding)
            counted = count_call(
                self.meter.reported_usage(), self.prompt_tokens, local_completion, self.bound
            )
        cost, charged, uncharged = self._price(counted)
        usage = counted.usage
        entry = self.log
        entry.prompt_tokens = usage.prompt_tokens
        entry.completion_tokens = usage.completion_tokens
        entry.cost = charged
        entry.usage_source = counted.source
        entry.local_prompt_tokens = counted.gateway_prompt_tokens
        entry.local_completion_tokens = counted.gateway_completion_tokens
        entry.outcome = status
        record = UsageRecord(
            request_id=self.request_id,
            time=int(time.time() * 1000),
            kind="inference" if self.flat is None else "passthrough",
            cost=charged,
            status=status,
            usage_source=counted.source,
            model=self.model.name,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            uncharged=uncharged,
            price_version=self.prices.version if self.prices is not None else "",
            stream=self.stream,
            gateway_prompt_tokens=counted.gateway_prompt_tokens,
            gateway_completion_tokens=counted.gateway_completion_tokens,
            key_id=self.key.key_id,
            upstream=self.upstream_label,
        )
        if uncharged:
            log.warning(
                "call used more than it could be charged; the rest is not charged",
                request_id=self.request_id,
                model=self.model.name,
                cost=format_micros(cost),
                uncharged=format_micros(uncharged),
            )
        return _Bill(charged, record, usage.total_tokens)

    async def quote(self, body: bytes) -> dict[str, str]:
        """Read a whole answer before it is sent; its cost headers (`x-gateway-cost`,
        `x-gateway-balance-available`). The cost of an answer that reports its usage needs no
        count of its text, so the answer is not held up for one: `bill` counts it after it
        is sent and comes to the same cost. One that reports none is billed here (its cost is
        the gateway's count), and `quoted` keeps that bill."""
        self.meter.observe_body(body)
        if not self.report_cost or self.admission is None:
            return {}
        reported = self.meter.reported_usage()
        if reported is None or self.flat is not None:
            self.quoted = await self.bill("ok")
            return self._cost_headers(self.quoted.charged)
        charged = self._price(count_call(reported, self.prompt_tokens, 0, self._quiet()))[1]
        return self._cost_headers(charged)

    def free_headers(self) -> dict[str, str]:
        """The cost headers of an answer that costs nothing (the upstream's own error)."""
        if not self.report_cost:
            return {}
        return self._cost_headers(0)

    def _cost_headers(self, charged: int) -> dict[str, str]:
        """What the call was charged, and the available balance once it is settled (as the
        ledger stood at admission: other calls of the account settled meanwhile are not in
        it)."""
        admission = self.admission
        headers = {COST_HEADER: format_micros(charged)}
        if admission is not None and admission.available is not None:
            available = admission.available + admission.held - charged
            headers[AVAILABLE_HEADER] = format_micros(available)
        return headers

    def settlement(self, bill: _Bill) -> Coroutine[Any, Any, None]:
        """The settlement's write, for the caller to await or track (the call counts as
        finished from now: nothing else settles it)."""
        self.finished = True
        return self._write(bill)

    async def _write(self, bill: _Bill) -> None:
        """Through the journal: on disk before the store is asked, so a store that does not
        answer now (or a gateway stopped meanwhile) loses nothing; the journal replays it,
        idempotently per request, when the store answers again."""
        admission = self.admission
        await self.services.journal.submit(
            Entry(
                self.key.account_id,
                self.request_id,
                cost=bill.charged,
                now_ms=bill.record.time,
                record=bill.record.fields(),
                charge=admission.charge if admission is not None else None,
                actual_tokens=bill.actual_tokens,
            )
        )

    async def _settle(self, status: CallStatus) -> None:
        await self._write(await self.bill(status))

    def release(self) -> Coroutine[Any, Any, None]:
        """The release of the hold (nothing charged), for the caller to await or track."""
        self.finished = True
        return self.services.journal.submit(
            Entry(self.key.account_id, self.request_id, release=True)
        )

    def end_unfinished(self) -> Coroutine[Any, Any, None]:
        """The settlement of a call cut short, for the caller to shield and track. One rule
        for every such call, streamed or not: a client that left is billed the prompt and
        what was relayed to it (`client_disconnected`); a call the gateway cut itself
        (shutdown) what was produced (`interrupted`); a call that failed before the client
        got a byte (release) nothing."""
        if self.status is None and not self.meter.texts:
            return self.release()
        self.finished = True
        return self._settle(self.status or "interrupted")

    def forget_answer(self) -> None:
        """A whole answer the client's connection did not take was never seen: the call is
        billed for its prompt only."""
        self.meter = type(self.meter)()
