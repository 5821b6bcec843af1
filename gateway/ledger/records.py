"""The ledger's plain records: what its operations take and answer.

Frozen values that do no I/O, kept apart from the operations so that what a call carries
(an admission's twelve terms, a script's answer) reads as one type, and the ledger's callers
(handlers, sweepers, the journal) can hold and pass them on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.ledger.keys import AccountField
from gateway.ledger.transport import text

__all__ = [
    "AccountRecord",
    "Admission",
    "AdvanceResult",
    "KeyBudgetState",
    "KeyLimits",
    "KeySpend",
    "Reservation",
    "SettleResult",
    "TokenCharge",
    "TopupResult",
]


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """An account as stored: amounts in micro-units, times in ms since the epoch."""

    id: str
    name: str
    balance: int
    held: int
    state: str
    period: str
    arrears_since: int | None
    created_at: int
    topped_up: int
    spent: int
    cleared_spent: int  # costs of the usage records deleted when the account was cleared
    subscriptions: tuple[str, ...]

    @classmethod
    def from_hash(cls, data: Mapping[bytes, bytes], subs: set[bytes]) -> AccountRecord:
        """The record of an account hash's fields (HGETALL) and its subscriptions set."""
        f = AccountField
        fields = {text(k): text(v) for k, v in data.items()}
        since = fields.get(f.ARREARS_SINCE)
        return cls(
            id=fields[f.ID],
            name=fields.get(f.NAME, ""),
            balance=int(fields[f.BALANCE]),
            held=int(fields[f.HELD]),
            state=fields[f.STATE],
            period=fields.get(f.PERIOD, ""),
            arrears_since=int(since) if since else None,
            created_at=int(fields[f.CREATED_AT]),
            topped_up=int(fields.get(f.TOPPED_UP, 0)),
            spent=int(fields.get(f.SPENT, 0)),
            cleared_spent=int(fields.get(f.CLEARED_SPENT) or 0),
            subscriptions=tuple(sorted(text(s) for s in subs)),
        )


@dataclass(frozen=True, slots=True)
class TokenCharge:
    """What admission charged to the token limits, for settlement to correct."""

    model: str
    tokens: int
    # Where the charge landed in the account's, the account+model's and the key's token
    # counters, as the reserve script answered it (opaque here, see rl_landed in _prelude.lua;
    # '' = no rule).
    windows: tuple[str, str, str] = ("", "", "")


@dataclass(frozen=True, slots=True)
class Admission:
    """The reserve script's answer: `ok` with the amount held, or the refusal's code."""

    code: str
    held: int = 0
    # The balance less every open hold: once this call's is placed (`ok`), or what did not
    # cover it (`insufficient_balance`).
    available: int | None = None
    charge: TokenCharge | None = None
    rate: tuple[str, ...] = ()  # the x-ratelimit-* values (see ratelimit.headers_of)
    retry_after_ms: int = 0  # rate_limited: when the call would fit
    refused: str = ""  # rate_limited: the rules that refused it
    # ok: the key has a budget, so the call may be charged no more than it holds
    bounded: bool = False
    budget: KeyBudgetState | None = None  # key_budget_exceeded: where the key's budget stands
    expired_ms: int | None = None  # key_expired: when


@dataclass(frozen=True, slots=True)
class KeyBudgetState:
    """A key's budget against its spend in the current period and its open holds."""

    budget: int
    spent: int
    held: int
    period_end_ms: int | None  # None: a budget over the key's life


@dataclass(frozen=True, slots=True)
class SettleResult:
    code: str  # ok | duplicate | account_not_found
    cost: int
    balance: int | None = None
    state: str | None = None
    frozen_now: bool = False
    events: int = 0


@dataclass(frozen=True, slots=True)
class AdvanceResult:
    code: str  # idle | frozen | cleared
    period: str
    next_due_ms: int
    events: int


@dataclass(frozen=True, slots=True)
class TopupResult:
    code: str  # ok | replay | idempotency_conflict | account_not_found
    id: str = ""
    amount: int = 0
    balance: int = 0
    created_at: int = 0
    events: int = 0


@dataclass(slots=True)  # not frozen: slower to make, and one is made per call
class Reservation:
    """One call's admission, as `Ledger.reserve` takes it: authenticate key `key_id` (whose
    hash is `key_hash`) of the account, check and charge its rate limits (`rules`: the four
    limit specs of ratelimit.RateRules; `tokens`: the token limits' charge, the hold's
    estimate), and hold `hold` micro-units for `request_id` until `lease_until_ms`.
    `dedicated`: a dedicated-capacity model; `hold_info`: what settling the call without its
    gateway needs (see keys.AccountKeys.hold_info)."""

    account_id: str
    key_id: str
    key_hash: str
    model: str
    hold: int
    request_id: str
    lease_until_ms: int
    dedicated: bool
    hold_info: str
    now_ms: int
    tokens: int
    rules: Sequence[str]  # a tuple: the record stays frozen


@dataclass(frozen=True, slots=True)
class KeySpend:
    """What a key has spent and holds, as admission sees it now (`Ledger.key_spend`)."""

    spent: int  # in the current budget period
    held: int  # by its open calls
    total: int  # over its life
    period_start_ms: int  # 0 for a budget over the key's life (or none)
    period_end_ms: int | None  # None: the period never ends


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's own limits, as admission enforces them (`Ledger.write_key`)."""

    budget: int | None = None  # micro-units; None: no budget
    period: str = ""  # day | week | month | a length in ms | '': the key's life
    expires_ms: int | None = None
    models: tuple[str, ...] | None = None  # None: every subscribed model
    requests_spec: str = ""  # ratelimit.rule_spec of its request limit ('' = none)
    tokens_spec: str = ""

    def fields(self) -> list[str]:
        """The values write_key.lua stores ('' = none)."""
        return [
            "" if self.budget is None else str(self.budget),
            self.period,
            "" if self.expires_ms is None else str(self.expires_ms),
            "" if self.models is None else "\n".join(self.models),
            self.requests_spec,
            self.tokens_spec,
        ]
