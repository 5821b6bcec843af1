"""Every rule that turns tokens into money, in one place (SPEC section 2).

Which sheet bills a call, what a call may cost at most (its hold), what it did cost (by token
class), what a client's cost cap leaves room for, and what a notification costs. Nothing else
in the gateway multiplies a token count by a price.

A call's tokens fall into exactly one class each (`TokenUsage`): uncached input, cached input
(read from a prompt cache), cache-write input, output, and reasoning output. Its cost is
`ceil(sum over classes of tokens * price / 1_000_000)` micro-units, computed in integers and
rounded up once per call. Every price is at most MAX_PRICE_PER_MILLION_MICROS and a call is
billed for at most `billing.max_tokens_per_call` tokens of input and of output, so a cost stays
far below 2**53, where the ledger's Lua arithmetic stops being exact (gateway/money.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

from gateway.config.schema import ModelConfig, NotificationsConfig, PricingConfig, Settings
from gateway.money import MICROS
from gateway.timefmt import iso_ms

__all__ = [
    "Prices",
    "TokenUsage",
    "billed",
    "delivery_price",
    "history_violations",
    "in_force",
    "prices_at",
    "schedule_of",
    "sheet_prices",
]


@dataclass(slots=True)
class TokenUsage:
    """A call's tokens as OpenAI reports them: `prompt_tokens` counts every input token (the
    cached and cache-write ones among them) and `completion_tokens` every output token (the
    reasoning ones among them). A value: never changed once made (not frozen only because a
    frozen dataclass is slower to make, and a call makes several)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens

    @property
    def output_tokens(self) -> int:
        """Output that is not reasoning."""
        return self.completion_tokens - self.reasoning_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _ceil_micros(total: int) -> int:
    return -(-total // MICROS)


@dataclass(frozen=True, slots=True)
class Prices:
    """One price sheet, every class's price resolved (micro-units per million tokens)."""

    version: str  # stable id of the sheet: the same sheet has the same id on every instance
    effective_from_ms: int | None  # None: the base sheet
    input: int
    output: int
    cached_input: int
    cache_write: int
    reasoning: int

    @classmethod
    def plain(cls, version: str, input_price: int, output_price: int) -> Prices:
        """A sheet of two prices, every input class at `input_price`, every output class at
        `output_price` (how a call billed from the gateway's own count is priced)."""
        return cls(version, None, input_price, output_price, input_price, input_price, output_price)

    @property
    def dearest_input(self) -> int:
        return max(self.input, self.cached_input, self.cache_write)

    @property
    def dearest_output(self) -> int:
        return max(self.output, self.reasoning)

    def cost(self, usage: TokenUsage) -> int:
        """What `usage` costs: each token at its class's price, rounded up once."""
        return _ceil_micros(
            usage.uncached_tokens * self.input
            + usage.cached_tokens * self.cached_input
            + usage.cache_write_tokens * self.cache_write
            + usage.output_tokens * self.output
            + usage.reasoning_tokens * self.reasoning
        )

    def hold(self, prompt_tokens: int, output_tokens: int) -> int:
        """The most a call of `prompt_tokens` and up to `output_tokens` can cost, whatever
        classes the upstream puts its tokens in: each at its dearest class."""
        return _ceil_micros(
            prompt_tokens * self.dearest_input + output_tokens * self.dearest_output
        )

    def output_cost(self, tokens: int) -> int:
        """What `tokens` more output can cost at most (a strict stream's hold extension)."""
        return _ceil_micros(tokens * self.dearest_output)

    def output_within(self, amount: int, prompt_tokens: int) -> int:
        """How many output tokens a call of `prompt_tokens` can have and still cost at most
        `amount` (a client's cost cap); negative when the prompt alone may cost more."""
        room = amount * MICROS - prompt_tokens * self.dearest_input
        if room < 0:
            return -1
        if self.dearest_output == 0:
            return 2**62  # free output: any amount of it fits
        return room // self.dearest_output


@lru_cache(maxsize=4096)
def sheet_prices(sheet: PricingConfig) -> Prices:
    """A configured sheet with each class's price resolved and its version id (a hash of
    when it starts and what it charges, so reloading the same sheet keeps its id)."""
    cached = sheet.input_per_million
    if sheet.cached_input_per_million is not None:
        cached = sheet.cached_input_per_million
    write = sheet.input_per_million
    if sheet.cache_write_per_million is not None:
        write = sheet.cache_write_per_million
    reasoning = sheet.output_per_million
    if sheet.reasoning_per_million is not None:
        reasoning = sheet.reasoning_per_million
    start = sheet.effective_from_ms
    parts = (start, sheet.input_per_million, sheet.output_per_million, cached, write, reasoning)
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
    return Prices(
        f"ps_{digest}",
        start,
        sheet.input_per_million,
        sheet.output_per_million,
        cached,
        write,
        reasoning,
    )


def billed(model: ModelConfig) -> bool:
    """Whether the model's calls cost anything (token billing with a price sheet)."""
    return model.billing == "tokens" and model.pricing is not None


def schedule_of(model: ModelConfig) -> tuple[Prices, ...]:
    """The model's sheets, resolved, the base first, then by start; () when not billed.
    Built once per config snapshot (state.Snapshot), not per call."""
    if not billed(model):
        return ()
    return tuple(sheet_prices(sheet) for sheet in model.price_sheets)


def in_force(schedule: tuple[Prices, ...], at_ms: int) -> Prices | None:
    """The sheet of `schedule` in force at `at_ms`: the latest dated sheet started by then,
    else the base sheet; None for an empty schedule (or, before its first sheet, none)."""
    found = None
    for prices in schedule:
        start = prices.effective_from_ms
        if start is None or start <= at_ms:
            found = prices
        else:
            break
    return found


def prices_at(model: ModelConfig, at_ms: int) -> Prices | None:
    """The model's sheet in force at `at_ms` (None for a model that is not billed)."""
    return in_force(schedule_of(model), at_ms)


def history_violations(old: Settings, new: Settings, now_ms: int) -> list[str]:
    """What a reload from `old` to `new` would change in prices already used: every sheet
    that was in force for past calls stays as it was (history is immutable). A dated sheet
    started by `now_ms` may not change, go, or appear; the base sheet may change (a new base
    is in force from the reload on, like a sheet dated now) only while no dated sheet has
    started. One `path: message` line per fault, the path into the new config."""
    problems: list[str] = []
    for index, model in enumerate(new.models):
        before = old.model(model.name)
        if before is None or not billed(before) or not billed(model):
            continue
        past_old, past_new = _started(before, now_ms), _started(model, now_ms)
        where = f"models[{index}].pricing"
        for start in sorted(set(past_old) | set(past_new), key=lambda t: -1 if t is None else t):
            was, now = past_old.get(start), past_new.get(start)
            if was == now or (start is None and was is None):
                continue  # a base added under started sheets re-prices nothing billed
            sheet = (
                "the base sheet" if start is None else f"the sheet effective from {iso_ms(start)}"
            )
            if now is None:
                what = f"{sheet} was removed, but it billed calls until a later one started"
            elif was is None:
                what = f"{sheet} is new, but it starts in the past: it would re-price calls billed"
            else:
                what = f"{sheet} has billed calls already and cannot change"
            problems.append(
                f"{where}: {what} (price history is immutable); schedule new prices as a sheet "
                "with a later effective_from"
            )
    return problems


def _started(model: ModelConfig, now_ms: int) -> dict[int | None, Prices]:
    """The model's sheets that have been in force by `now_ms`, by start (None: the base,
    counted only once a dated sheet has replaced it)."""
    sheets = {sheet.effective_from_ms: sheet_prices(sheet) for sheet in model.price_sheets}
    started: dict[int | None, Prices] = {
        start: prices for start, prices in sheets.items() if start is not None and start <= now_ms
    }
    if started and None in sheets:
        started[None] = sheets[None]
    return started


def delivery_price(kind: str, nbytes: int, config: NotificationsConfig) -> int:
    """What one notification delivery costs: the channel's price (an SMS its own; email and
    webhooks theirs plus their traffic at `traffic_per_gb`, rounded up to the micro-unit)."""
    prices = config.prices
    if kind == "sms":
        return prices.sms
    base = prices.email if kind == "email" else prices.http
    return base + -(-nbytes * prices.traffic_per_gb // 1_000_000_000)
