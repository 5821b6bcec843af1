"""The config file's shape (SPEC section 7), as frozen pydantic models.

The models are the immutable snapshot the gateway serves from: a reload validates a new one
and swaps a single reference, so a request never sees half of an edit.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config.types import Duration, Micros, RateLimit, parse_duration
from gateway.metering.encodings import ENCODINGS
from gateway.money import MAX_PRICE_PER_MILLION_MICROS, MAX_TOKENS_PER_CALL, format_micros

__all__ = [
    "DEFAULT_RESPONSE_HEADERS",
    "DURATION_CEILING",
    "SKIP_UNSET_SECRETS",
    "BillingConfig",
    "DurationRange",
    "HistoryConfig",
    "ModelConfig",
    "NotificationsConfig",
    "PricingConfig",
    "ProxyConfig",
    "RateLimitsConfig",
    "ServerConfig",
    "Settings",
    "StoreConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "format_duration",
]

# An upstream's answer headers reach the client only when named here (`proxy.response_headers`
# replaces the list; a name ending in `*` is a prefix), `content-type` always. What a client of
# OpenAI's API reads: caching, when and whether to retry (the OpenAI SDKs honour `retry-after`,
# `retry-after-ms` and `x-should-retry`), and OpenAI's own processing time and API version.
# Everything else stays behind: `x-litellm-key-spend` (the operator's spend), backend URLs,
# `openai-organization`, server banners.
DEFAULT_RESPONSE_HEADERS = (
    "cache-control",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
    "openai-processing-ms",
    "openai-version",
)
# RFC 9110 token characters, with an optional trailing `*` (a prefix).
_HEADER_NAME = re.compile(r"[!#$%&'+\-.^_`|~0-9A-Za-z]+\*?")

# The validation context key the loader sets (`require_secrets=False`) when a file is only being
# checked: a secret variable that is not set is then left unread, for `Settings.unset_secrets`
# to report, instead of failing validation. A snapshot so made must never be served.
SKIP_UNSET_SECRETS = "skip_unset_secrets"


def _skip_unset(info: ValidationInfo) -> bool:
    """True when the loader validates for a check only (see SKIP_UNSET_SECRETS)."""
    return isinstance(info.context, dict) and bool(info.context.get(SKIP_UNSET_SECRETS))


def _env_missing(name: str) -> bool:
    """A secret variable counts as unset when absent (an empty value is the operator's)."""
    return name not in os.environ


STORE_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
# The most tokens of each kind (prompt, completion) one call is billed for, by default: above
# the longest context windows served today, far below what would make a cost overflow.
DEFAULT_MAX_TOKENS_PER_CALL = 2_000_000


# The longest any duration may be (100 years): a time plus it, in milliseconds, stays an exact
# integer in the store's Lua doubles (2**53 ms is about 285,000 years), and `.inf` (which YAML
# reads from `.inf` or `1e999`) cannot reach a timer or an `int()`.
DURATION_CEILING = "36500d"

_UNITS = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0))


def format_duration(seconds: float) -> str:
    """Seconds in the config's units: 0.05 -> "50ms", 90 -> "90s", 5400 -> "90m", 0 -> "0s"."""
    if not math.isfinite(seconds):
        return str(seconds)
    for unit, size in _UNITS:
        if seconds >= size and round(seconds / size, 9).is_integer():
            return f"{seconds / size:.6g}{unit}"
    if seconds >= 1.0:
        return f"{seconds:.6g}s"
    if seconds == 0:
        return "0s"
    return f"{seconds * 1000:.6g}ms"


@dataclass(frozen=True)
class DurationRange:
    """What one duration field accepts: from `low` to `high`, both written in the config's
    units (`"50ms"`, `"1h"`). Called on the parsed seconds (an `AfterValidator`), it returns
    them or raises with the bound the value broke, in the same units."""

    low: str
    high: str = DURATION_CEILING
    minimum: float = field(init=False)
    maximum: float = field(init=False)

    def __post_init__(self) -> None:  # a bound that does not parse fails at import
        object.__setattr__(self, "minimum", parse_duration(self.low))
        object.__setattr__(self, "maximum", parse_duration(self.high))

    def __call__(self, seconds: float) -> float:
        if not math.isfinite(seconds):
            raise ValueError(f"expected a finite duration such as '2s' (got {seconds})")
        if seconds < self.minimum:
            got = format_duration(seconds)
            raise ValueError(f"must be at least {format_duration(self.minimum)} (got {got})")
        if seconds > self.maximum:
            got = format_duration(seconds)
            raise ValueError(f"must be at most {format_duration(self.maximum)} (got {got})")
        return seconds


def bounded(low: str, high: str = DURATION_CEILING) -> AfterValidator:
    """Metadata for `Annotated[Duration, bounded("50ms", "1h")]`: the duration, once parsed,
    must lie in [low, high]; the message names the path (the loader adds it) and the bound."""
    return AfterValidator(DurationRange(low, high))


def _price_at_most_max(value: int) -> int:
    """Prices feed the ledger's Lua arithmetic: bounded so a call's cost stays exact there
    (gateway/money.py has the arithmetic)."""
    if value > MAX_PRICE_PER_MILLION_MICROS:
        raise ValueError(f'a price is at most "{format_micros(MAX_PRICE_PER_MILLION_MICROS)}"')
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    # Not 0: that asks the system for any free port, a different one in each worker.
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=256)
    admin_token_env: str = "GATEWAY_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret
    # A body is held whole in memory (then parsed and counted): at most 1 GiB per request.
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=1024**3)
    # On SIGTERM: stop accepting, let calls in flight finish this long, then cut and settle them.
    # Not 0: aiohttp reads 0 as no limit at all (a stop waits for every call to end); at most
    # an hour, so a stop always ends.
    drain_timeout: Annotated[Duration, bounded("100ms", "1h")] = 30.0
    # A client must send its whole body within this: slow senders cannot hold a call open. At
    # 0 every body that did not come with the headers would be refused (408).
    read_timeout: Annotated[Duration, bounded("100ms")] = 30.0
    # A connection with no complete request for this long is closed: idle keep-alive ones, and
    # clients that trickle their headers in. At 0 aiohttp would never close a connection that
    # sends nothing, and would close kept-alive ones as each answer ends (clients reusing one
    # race the close).
    idle_timeout: Annotated[Duration, bounded("1s")] = 15.0
    # Reload the config when its file changes (SIGHUP and POST /admin/reload always work).
    watch_config: bool = True


def _store_url(value: str) -> str:
    if value == "embedded":
        return value
    scheme = urlsplit(value).scheme
    if scheme not in STORE_SCHEMES:
        raise ValueError(f"expected 'embedded' or a URL with scheme {', '.join(STORE_SCHEMES)}")
    return value


def _url_from_env(
    section: StoreConfig | HistoryConfig,
    info: ValidationInfo,
    check: Callable[[str], str],
    what: str,
) -> None:
    """A section's `url` replaced by the variable its `url_env` names, checked as `url` is."""
    if section.url_env is None:
        return
    value = os.environ.get(section.url_env)
    if not value:
        if _skip_unset(info):
            return
        raise ValueError(f"url_env: environment variable {section.url_env} is not set")
    try:
        check(value)
    except ValueError as exc:
        raise ValueError(f"url_env: {section.url_env} holds no {what} URL: {exc}") from None
    object.__setattr__(section, "url", value)


class StoreConfig(_Frozen):
    url: str = "embedded"
    # An environment variable holding the URL instead (it may carry a password, which then
    # stays out of the config file); it replaces `url`.
    url_env: str | None = None
    data_dir: str = "./var/store"
    # The embedded store's fsync policy. Either way an acknowledged top-up or settlement
    # survives a crash of the store: the gateway waits for the fsync of those (WAITAOF,
    # gateway/store/durability.py), so admissions need not (`always` makes every write wait).
    appendfsync: Literal["always", "everysec"] = "everysec"

    _url = field_validator("url")(_store_url)

    @model_validator(mode="after")
    def _read_url(self, info: ValidationInfo) -> StoreConfig:
        _url_from_env(self, info, _store_url, "store")
        return self


HISTORY_SCHEMES = ("postgresql", "postgres")


def _history_url(value: str) -> str:
    if value in ("embedded", "off"):
        return value
    if urlsplit(value).scheme not in HISTORY_SCHEMES:
        raise ValueError("expected 'embedded', 'off' or a postgresql:// URL")
    return value


class HistoryConfig(_Frozen):
    """Where usage history goes once the ledger has it: a private PostgreSQL beside the
    embedded store (`embedded`), a shared server (`postgresql://...`), or nowhere (`off`:
    the store keeps every record, as before history existed)."""

    url: str = "embedded"
    # An environment variable holding the URL instead (it may carry a password).
    url_env: str | None = None
    # Exported records stay in the store this long, then are trimmed from it.
    keep_in_store: Annotated[Duration, bounded("1s", "3650d")] = 86400.0
    # How often the exporter looks for records the database does not have yet.
    export_interval: Annotated[Duration, bounded("50ms", "1h")] = 1.0
    # The most records one export transaction writes.
    batch_size: int = Field(default=5000, ge=1, le=100_000)
    # How long the store remembers a settled request id (what makes a settlement idempotent),
    # with history on: a settlement replayed later is checked against the database instead.
    # With history off the store keeps them 7 days.
    settled_ttl: Annotated[Duration, bounded("10m", "7d")] = 3600.0

    _url = field_validator("url")(_history_url)

    @model_validator(mode="after")
    def _read_url(self, info: ValidationInfo) -> HistoryConfig:
        _url_from_env(self, info, _history_url, "history")
        return self


class ConsoleConfig(_Frozen):
    """The browser console at /console (gateway/console): its pages, and how long a login
    lasts."""

    enabled: bool = True
    session_ttl: Annotated[Duration, bounded("1m", "30d")] = 8 * 3600.0


class TimeoutsConfig(_Frozen):
    # At 0 aiohttp sets no connect timeout at all: a silent upstream is never failed over.
    connect: Annotated[Duration, bounded("100ms")] = 5.0
    # At 0 every call would be 504; real models need seconds, the floor only refuses nonsense.
    first_byte: Annotated[Duration, bounded("100ms")] = 120.0
    # At 0 every answer with a pause between two chunks would be cut.
    idle: Annotated[Duration, bounded("100ms")] = 60.0


_PASSTHROUGH_PATH = re.compile(r"/v1(/[A-Za-z0-9._~-]+)+")
# Routes of the gateway's own below these (a stored response's, a token count).
_OWN_PREFIXES = ("/v1/models", "/v1/responses/", "/v1/messages/")


class PassthroughRoute(_Frozen):
    """A route the gateway forwards without metering tokens: each call needs a key, goes to
    the upstreams of the model its body names (a subscription to it required) and is held
    and charged `price_per_call`, like any call. Only listed routes pass: any other is 404."""

    path: str
    price_per_call: Micros

    _bounded = field_validator("price_per_call")(_price_at_most_max)

    @field_validator("path")
    @classmethod
    def _own_route(cls, value: str) -> str:
        if not _PASSTHROUGH_PATH.fullmatch(value):
            raise ValueError("expected a path under /v1/, such as /v1/moderations")
        if value in API_ROUTES.values() or value.startswith(_OWN_PREFIXES):
            raise ValueError(f"{value} is a metered route of the gateway's own")
        return value


class ProxyConfig(_Frozen):
    timeouts: TimeoutsConfig = TimeoutsConfig()
    # Shorter than common upstream servers' keep-alive (uvicorn closes idle ones after 5 s), so
    # a pooled connection is never reused just as the upstream closes it. At 0 aiohttp reuses
    # no connection and never runs the cleanup of idle ones (they stay open until the next call
    # to that upstream): every call pays a new connection.
    keepalive: Annotated[Duration, bounded("100ms")] = 4.0
    max_connections: int = Field(default=1024, ge=1)
    # The upstream answer headers a client gets (the default, and why, above); a name ending
    # in `*` is a prefix. Content-Type always passes; the gateway's own
    # (x-request-id, x-ratelimit-*) never come from an upstream.
    response_headers: tuple[str, ...] = DEFAULT_RESPONSE_HEADERS
    # Routes forwarded at a flat price per call (nothing else passes unmetered).
    passthrough: tuple[PassthroughRoute, ...] = ()
    # How long the gateway remembers which account created a Responses API response (only
    # that account may read, delete or cancel it): as long as OpenAI keeps one, 30 days.
    response_ttl: Annotated[Duration, bounded("1s", "3650d")] = 30 * 86400.0

    @field_validator("response_headers")
    @classmethod
    def _header_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~, "
                    "optionally ending in * for a prefix)"
                )
        return tuple(name.lower() for name in names)

    @field_validator("passthrough")
    @classmethod
    def _one_route_each(cls, routes: tuple[PassthroughRoute, ...]) -> tuple[PassthroughRoute, ...]:
        paths = [route.path for route in routes]
        if len(set(paths)) != len(paths):
            raise ValueError("a path is listed twice")
        return routes

    def passthrough_route(self, path: str) -> PassthroughRoute | None:
        for route in self.passthrough:
            if route.path == path:
                return route
        return None


class BillingConfig(_Frozen):
    # False makes a pure proxy: no keys, no counting, no ledger. For measuring the proxy alone
    # or fronting free models; every call is then unauthenticated and unbilled.
    metering: bool = True
    currency: str = "USD"
    # At least 1s: 0 skips the period, and both at 0 clear an account (its subscriptions and
    # usage records deleted for good) at the first sweep after it goes into arrears. Tests run
    # the lifecycle with 1s-2s; production, days.
    grace_period: Annotated[Duration, bounded("1s")] = 15 * 86400.0
    retention_period: Annotated[Duration, bounded("1s")] = 15 * 86400.0
    # At least 1: a strict call without max_tokens is sent the max_tokens its hold covers, and
    # strict streams extend their hold in steps of this.
    hold_output_tokens: int = Field(default=1024, ge=1, le=MAX_TOKENS_PER_CALL)
    # The most prompt tokens, and the most completion tokens, one call is billed for: upstream
    # usage above it (or above the call's own max_tokens) is billed at the bound and counted as
    # an anomaly, and a request asking for more output is refused. It keeps every hold and
    # cost far below 2**53 micro-units, where the ledger's Lua arithmetic stops being exact.
    max_tokens_per_call: int = Field(
        default=DEFAULT_MAX_TOKENS_PER_CALL, ge=1, le=MAX_TOKENS_PER_CALL
    )
    enforcement: Literal["postpaid", "strict"] = "postpaid"
    # Every answer says what it cost: `x-gateway-cost` / `x-gateway-balance-available` on a
    # whole answer, `usage.cost` in a stream's usage chunk (when the client asked for usage).
    report_cost: bool = True
    # How often the arrears timer and the orphan sweeper run. At 0 they spin (one store round
    # trip after another: 70-95% of a CPU on an idle gateway); at 50ms an idle gateway uses
    # about 3%. At most an hour: the sleep under way ends before a reloaded value is read.
    sweep_interval: Annotated[Duration, bounded("50ms", "1h")] = 5.0
    # A live call renews its hold's lease every third of this; a hold whose lease ends belongs
    # to a dead gateway and is settled by a sweeper from its last checkpoint. At 0 the renewal
    # timer would spin and every call's hold would be taken for an orphan at once. 1s is for
    # tests (a renewal late by 0.67s lets the sweeper settle a live call as orphaned); keep
    # tens of seconds in production. At most an hour: a dead gateway's holds keep their funds
    # held that long.
    hold_lease: Annotated[Duration, bounded("1s", "1h")] = 60.0
    # A stream checkpoints its completion tokens at least this often (in tokens), which bounds
    # the billing lost when a gateway is killed mid-stream.
    checkpoint_tokens: int = Field(default=100, ge=1)
    # The prompt tokens held for a chat image whose size the gateway cannot read (an http(s)
    # URL, a malformed data: URL) at high or auto detail: 1445, the most OpenAI's published
    # formula gives a gpt-4o-class image (8 tiles, a long narrow one; a 2048x4096 image is 1105),
    # so the hold never under-covers one. 0 holds nothing for them; the upstream's usage is
    # billed either way.
    image_tokens: int = Field(default=1445, ge=0, le=MAX_TOKENS_PER_CALL)
    # The prompt tokens held for each input_audio part (the gateway does not decode audio):
    # OpenAI counts user audio at 1 token per 100 ms, so 600 is a one-minute clip.
    audio_tokens: int = Field(default=600, ge=0, le=MAX_TOKENS_PER_CALL)

    @model_validator(mode="after")
    def _hold_within_bound(self) -> BillingConfig:
        if self.hold_output_tokens > self.max_tokens_per_call:
            if "hold_output_tokens" not in self.model_fields_set:  # the default: follow the bound
                object.__setattr__(self, "hold_output_tokens", self.max_tokens_per_call)
                return self
            raise ValueError(
                f"hold_output_tokens ({self.hold_output_tokens}) is above max_tokens_per_call "
                f"({self.max_tokens_per_call})"
            )
        return self


class RateLimitsConfig(_Frozen):
    requests: RateLimit | None = None
    tokens: RateLimit | None = None


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return value


class WebhookSink(_Frozen):
    url: str
    secret_env: str | None = None

    _url = field_validator("url")(_check_http_url)


class SmtpConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    sender: str = "billing@example.com"


class SmsConfig(_Frozen):
    url: str
    token_env: str | None = None

    _url = field_validator("url")(_check_http_url)


class NotificationPrices(_Frozen):
    sms: Micros = 0
    email: Micros = 0
    http: Micros = 0
    traffic_per_gb: Micros = 0

    _bounded = field_validator("sms", "email", "http", "traffic_per_gb")(_price_at_most_max)


class NotificationsConfig(_Frozen):
    webhooks: tuple[WebhookSink, ...] = ()
    smtp: SmtpConfig | None = None
    sms: SmsConfig | None = None
    prices: NotificationPrices = NotificationPrices()
    # Delivery: at least once, retried with exponential backoff, then dead-lettered.
    max_attempts: int = Field(default=8, ge=1, le=100)
    # At 0 every retry would follow the failure at once: a sink down for a second would have
    # all its events dead-lettered. An account's later events wait behind a retry, so the
    # backoff is at most a day.
    retry_base: Annotated[Duration, bounded("100ms", "1d")] = 1.0
    # At least retry_base, which is checked even when retry_max is left at its default.
    retry_max: Annotated[Duration, bounded("100ms", "1d")] = Field(
        default=300.0, validate_default=True
    )
    # How often an idle deliverer looks for due events. At 0 it spins (90% of a CPU on an idle
    # gateway, which then ignored SIGTERM); 50ms costs about 3% (10ms: 9%). At most an hour,
    # for the same reason as billing.sweep_interval.
    poll_interval: Annotated[Duration, bounded("50ms", "1h")] = 0.5
    # One delivery's limit. At 0 aiohttp sets none (a hung sink holds the deliverer forever);
    # at most a minute, well inside the 120s lock an instance holds on an account's outbox.
    timeout: Annotated[Duration, bounded("100ms", "1m")] = 10.0

    @field_validator("retry_max")
    @classmethod
    def _max_not_below_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("retry_base")  # absent when retry_base itself was invalid
        if base is not None and value < base:
            raise ValueError(
                f"must be at least retry_base, {format_duration(base)} "
                f"(got {format_duration(value)})"
            )
        return value

    @model_validator(mode="after")
    def _secrets_present(self, info: ValidationInfo) -> NotificationsConfig:
        if _skip_unset(info):
            return self
        for i, sink in enumerate(self.webhooks):
            if sink.secret_env is not None and _env_missing(sink.secret_env):
                raise ValueError(
                    f"webhooks[{i}].secret_env: environment variable {sink.secret_env} is not set"
                )
        if self.sms is not None and self.sms.token_env and _env_missing(self.sms.token_env):
            raise ValueError(f"sms.token_env: environment variable {self.sms.token_env} is not set")
        return self


class PricingConfig(_Frozen):
    """One price sheet: what each class of token costs per one million, as integer micro-units
    once parsed, and from when (`effective_from`, ISO 8601 with a zone; absent: the model's
    base sheet, in force until a dated one starts). A class's price left out is its parent's:
    cached and cache-write input cost what input does, reasoning what output does."""

    effective_from: AwareDatetime | None = None
    input_per_million: Micros
    output_per_million: Micros
    cached_input_per_million: Micros | None = None
    cache_write_per_million: Micros | None = None
    reasoning_per_million: Micros | None = None

    _bounded = field_validator(
        "input_per_million",
        "output_per_million",
        "cached_input_per_million",
        "cache_write_per_million",
        "reasoning_per_million",
    )(_price_at_most_max)

    @property
    def effective_from_ms(self) -> int | None:
        if self.effective_from is None:
            return None
        return int(self.effective_from.timestamp() * 1000)


def _pricing_form(value: object) -> str:
    """A list is a schedule of sheets; anything else is read as the one sheet."""
    return PRICE_SCHEDULE if isinstance(value, list | tuple) else PRICE_SHEET


# The two forms of `pricing`, as pydantic tags its errors with them (the loader leaves such
# tags out of the paths it prints: they are not fields).
PRICE_SHEET = "<sheet>"
PRICE_SCHEDULE = "<schedule>"
Pricing = Annotated[
    Annotated[PricingConfig, Tag(PRICE_SHEET)]
    | Annotated[tuple[PricingConfig, ...], Tag(PRICE_SCHEDULE)],
    Discriminator(_pricing_form),
]


def _sheet_order(sheet: PricingConfig) -> tuple[bool, int]:
    """The base sheet first, then by start (a start at or before the epoch included)."""
    start = sheet.effective_from_ms
    return (start is not None, start or 0)


def _check_schedule(sheets: tuple[PricingConfig, ...]) -> None:
    """A schedule has at most one base sheet and one sheet per start time, and a sheet in
    force now: a call is always billed under exactly one."""
    if not sheets:
        raise ValueError("expected a price sheet, or a list of at least one")
    starts = [sheet.effective_from_ms for sheet in sheets]
    if starts.count(None) > 1:
        raise ValueError("at most one sheet may leave out effective_from (the base)")
    dated = [start for start in starts if start is not None]
    if len(set(dated)) != len(dated):
        raise ValueError("two sheets have the same effective_from")
    if None not in starts and min(dated) > int(time.time() * 1000):
        raise ValueError(
            "no sheet is in force now (every one starts later): add one without "
            "effective_from, or dated in the past"
        )


# The APIs an upstream may speak (a route of the data plane each; no translation between them).
Api = Literal["chat", "completions", "embeddings", "responses", "messages"]
API_ROUTES: dict[str, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}
DEFAULT_APIS: tuple[Api, ...] = ("chat", "completions", "embeddings")


class UpstreamConfig(_Frozen):
    url: str
    model: str | None = None  # the upstream's own name for the model; the public name if unset
    api_key_env: str | None = None
    weight: int = Field(default=1, ge=1, le=1000)
    # What the upstream serves: a call for an API none of a model's upstreams speaks is refused.
    apis: tuple[Api, ...] = DEFAULT_APIS
    # Resolved from `api_key_env` at load time; never printed (SecretStr shows stars).
    api_key: SecretStr | None = Field(default=None, exclude=True)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("expected an http:// or https:// URL such as http://127.0.0.1:9000/v1")
        return value.rstrip("/")

    @field_validator("apis")
    @classmethod
    def _some_apis(cls, value: tuple[Api, ...]) -> tuple[Api, ...]:
        if not value:
            raise ValueError(f"expected at least one of {', '.join(API_ROUTES)}")
        if len(set(value)) != len(value):
            raise ValueError("an API is listed twice")
        return value

    @model_validator(mode="after")
    def _read_api_key(self, info: ValidationInfo) -> UpstreamConfig:
        if self.api_key_env is None or self.api_key is not None:
            return self
        secret = os.environ.get(self.api_key_env)
        if secret is None:
            if _skip_unset(info):
                return self
            raise ValueError(f"environment variable {self.api_key_env} (api_key_env) is not set")
        object.__setattr__(self, "api_key", SecretStr(secret))
        return self


class ModelConfig(_Frozen):
    name: str = Field(min_length=1)
    tokenizer: str = "o200k_base"
    billing: Literal["tokens", "dedicated"] = "tokens"
    pricing: Pricing | None = None
    hold_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_PER_CALL)
    rate_limits: RateLimitsConfig | None = None
    upstreams: tuple[UpstreamConfig, ...]

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, value: str) -> str:
        if value not in ENCODINGS:
            raise ValueError(f"expected one of {', '.join(ENCODINGS)}")
        return value

    @field_validator("upstreams")
    @classmethod
    def _some_upstream(cls, value: tuple[UpstreamConfig, ...]) -> tuple[UpstreamConfig, ...]:
        if not value:
            raise ValueError("expected at least one upstream")
        return value

    @model_validator(mode="after")
    def _priced_if_billed(self) -> ModelConfig:
        if self.billing == "tokens" and self.pricing is None:
            raise ValueError("a model with billing 'tokens' needs pricing")
        return self

    @field_validator("pricing")
    @classmethod
    def _one_sheet_at_a_time(
        cls, value: PricingConfig | tuple[PricingConfig, ...] | None
    ) -> PricingConfig | tuple[PricingConfig, ...] | None:
        if isinstance(value, tuple):
            _check_schedule(value)
        elif value is not None:
            _check_schedule((value,))
        return value

    @property
    def price_sheets(self) -> tuple[PricingConfig, ...]:
        """Every sheet of the model, the base (if any) first, then by effective_from."""
        pricing = self.pricing
        if pricing is None:
            return ()
        if isinstance(pricing, PricingConfig):
            return (pricing,)
        return tuple(sorted(pricing, key=_sheet_order))

    def upstream_model(self, upstream: UpstreamConfig) -> str:
        """The name the upstream knows this model by."""
        return upstream.model or self.name


class Settings(_Frozen):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    proxy: ProxyConfig = ProxyConfig()
    billing: BillingConfig = BillingConfig()
    rate_limits: RateLimitsConfig = RateLimitsConfig(requests="600/minute", tokens="1000000/minute")
    notifications: NotificationsConfig = NotificationsConfig()
    history: HistoryConfig = HistoryConfig()
    console: ConsoleConfig = ConsoleConfig()
    models: tuple[ModelConfig, ...] = ()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} appears more than once")
            seen.add(model.name)
        return models

    @field_validator("models")
    @classmethod
    def _holds_within_bound(
        cls, models: tuple[ModelConfig, ...], info: ValidationInfo
    ) -> tuple[ModelConfig, ...]:
        billing = info.data.get("billing")  # absent when billing itself was invalid
        bound = billing.max_tokens_per_call if isinstance(billing, BillingConfig) else None
        for model in models:
            held = model.hold_output_tokens
            if bound is not None and held is not None and held > bound:
                raise ValueError(
                    f"model {model.name!r} has hold_output_tokens {held}, above "
                    f"billing.max_tokens_per_call ({bound})"
                )
        return models

    def unset_secrets(self) -> list[str]:
        """`path: variable is not set` for each secret variable the config names and the
        environment lacks: what `serve` would refuse, which a snapshot validated with the
        loader's `require_secrets=False` lets through (and only such a one can hold)."""
        found = []
        if self.store.url_env is not None and not os.environ.get(self.store.url_env):
            found.append(f"store.url_env: environment variable {self.store.url_env} is not set")
        for i, sink in enumerate(self.notifications.webhooks):
            if sink.secret_env is not None and _env_missing(sink.secret_env):
                found.append(
                    f"notifications.webhooks[{i}].secret_env: "
                    f"environment variable {sink.secret_env} is not set"
                )
        sms = self.notifications.sms
        if sms is not None and sms.token_env and _env_missing(sms.token_env):
            found.append(
                f"notifications.sms.token_env: environment variable {sms.token_env} is not set"
            )
        for i, model in enumerate(self.models):
            for j, upstream in enumerate(model.upstreams):
                if upstream.api_key_env is not None and upstream.api_key is None:
                    found.append(
                        f"models[{i}].upstreams[{j}].api_key_env: "
                        f"environment variable {upstream.api_key_env} is not set"
                    )
        return found

    def model(self, name: str) -> ModelConfig | None:
        """The configured model clients call `name`, if any."""
        for model in self.models:
            if model.name == name:
                return model
        return None
