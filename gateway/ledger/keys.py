"""Every Redis key name, built in one place.

All keys of one account share the hash tag `{a:<id>}`, so every ledger script touches a single
Redis Cluster slot and runs atomically there. Nothing else in the code spells a key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, TypeGuard

__all__ = [
    "ACCOUNTS",
    "ACCOUNTS_BACKFILLED",
    "ACCOUNT_CURSOR",
    "ACCOUNT_IDS",
    "ACCOUNT_IDS_BACKFILLED",
    "ACCOUNT_KEY_PATTERN",
    "HOLDS_DUE",
    "ID_PATTERN",
    "ID_RULE",
    "LIFECYCLE_DUE",
    "OUTBOX_DUE",
    "AccountField",
    "AccountKeys",
    "account_id_of",
    "account_index_member",
    "account_keys",
    "console_session_key",
    "response_owner_key",
    "stream_id_after",
    "valid_account_id",
    "valid_id",
]

PREFIX = "gw"
# The one pattern of every id a client gives or is given: account ids, API key ids and
# Idempotency-Keys. Letters, digits, '_' and '-', 1 to 64 of them (a UUID fits): no braces
# (they would break the hash tag), no '.' (the separator inside API keys), no whitespace or
# control characters (a key holding a newline could never be sent in a header). Matched
# whole (`fullmatch`: a `$` would let a trailing newline through).
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ID_RULE = "1-64 ASCII letters, digits, '_' or '-'"

# How long a settled request id is remembered, so a repeated settlement charges nothing.
SETTLED_TTL_SECONDS = 7 * 86400
# How long a top-up's Idempotency-Key is remembered (Stripe keeps keys 24 hours).
IDEMPOTENCY_TTL_SECONDS = 86400

# The two global indexes (their own slots): which accounts have an arrears step due, and
# which have events waiting to be delivered, each scored by when (ms). They are written just
# after the settlement script that calls for them; a crash between the two is repaired by the
# hold sweeper, which looks at every account whose hold-index entry it drops (Ledger.reindex).
LIFECYCLE_DUE = f"{PREFIX}:index:lifecycle"
OUTBOX_DUE = f"{PREFIX}:index:outbox"
# Accounts with open holds, scored by the earliest time one of their leases may end. Written
# before the admission script (so no hold is ever unindexed) and dropped by the hold sweeper.
HOLDS_DUE = f"{PREFIX}:index:holds"

# Every account, for the admin listing (its own slot): one member per account,
# `<created_at ms, 15 digits>:<id>`, every score 0, so ZRANGEBYLEX walks the accounts by
# creation time, then id, and a page's last member is the exclusive start of the next page.
# An account's member never changes (created_at is written once) and is never removed, so a
# walk lists every account that existed when it began exactly once, whatever is created
# meanwhile. Written before create_account.lua, as HOLDS_DUE is before admission, so no
# account is ever missing from it: a crash in between leaves a member no account stands
# behind, which the listing skips, as it skips a member whose time is not its account's
# created_at (a creation that lost to another of the same id drops its member; a crash
# first leaves it). Accounts created before the index existed are added by a backfill
# (Ledger.backfill_accounts_index), which a listing runs while ACCOUNTS_BACKFILLED is
# absent; the backfill sets it when done.
ACCOUNTS = f"{PREFIX}:index:accounts"
ACCOUNTS_BACKFILLED = f"{PREFIX}:index:accounts:backfilled"
# Every account id, for a search by id prefix (its own slot, every score 0: ZRANGEBYLEX).
# Written with the ACCOUNTS member, before the account; built once from ACCOUNTS on a store
# from a version without it (ACCOUNT_IDS_BACKFILLED set when done).
ACCOUNT_IDS = f"{PREFIX}:index:account-ids"
ACCOUNT_IDS_BACKFILLED = f"{PREFIX}:index:account-ids:backfilled"
# An ACCOUNTS member, as the listing's cursor (matched whole).
ACCOUNT_CURSOR = re.compile(r"([0-9]{15}):([A-Za-z0-9_-]{1,64})")


def account_index_member(account_id: str, created_ms: int) -> str:
    """The ACCOUNTS member of the account created at `created_ms`."""
    return f"{created_ms:015d}:{account_id}"


ACCOUNT_KEY_PATTERN = f"{PREFIX}:{{a:*}}:account"  # SCAN pattern matching every account


def console_session_key(token_hash: str) -> str:
    """A console login (its own slot): role, account and CSRF token, expiring with it."""
    return f"{PREFIX}:console:session:{token_hash}"


def response_owner_key(response_id: str) -> str:
    """Who created a Responses API response (its own slot: read and written alone)."""
    return f"{PREFIX}:response:{response_id}"


def account_id_of(account_key: str) -> str:
    """The account id inside an account hash's key name (the inverse of `.account`)."""
    return account_key[len(f"{PREFIX}:{{a:") : -len("}:account")]


def stream_id_after(stream_id: str) -> str | None:
    """The first stream id after `stream_id` (an inclusive XRANGE start), None past the end."""
    ms, seq = (int(part) for part in stream_id.split("-"))
    if seq < _MAX_STREAM_PART:
        return f"{ms}-{seq + 1}"
    if ms < _MAX_STREAM_PART:
        return f"{ms + 1}-0"
    return None


_MAX_STREAM_PART = 2**64 - 1


def valid_id(value: object) -> TypeGuard[str]:
    """True for a string that matches the id pattern, whole."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def valid_account_id(account_id: str) -> bool:
    """True for ids that can name an account (and sit inside a hash tag)."""
    return valid_id(account_id)


@dataclass(frozen=True, slots=True)
class AccountKeys:
    """The names of one account's keys."""

    tag: str

    @property
    def account(self) -> str:
        """Hash: id, name, balance, held, state, period, arrears_since, totals (the fields
        of AccountField)."""
        return f"{PREFIX}:{self.tag}:account"

    @property
    def api_keys(self) -> str:
        """Hash: key id -> sha256 of the key, for keys that are not revoked."""
        return f"{PREFIX}:{self.tag}:keys"

    @property
    def api_key_meta(self) -> str:
        """Hash: key id -> JSON of the key's public metadata (never its secret)."""
        return f"{PREFIX}:{self.tag}:keymeta"

    @property
    def key_limits(self) -> str:
        """Hash: each key's own limits, as admission reads them (`<key id>:budget`, `:period`,
        `:expires`, `:models`, `:rq`, `:rt`; see key_limits in lua/_prelude.lua)."""
        return f"{PREFIX}:{self.tag}:keylimits"

    @property
    def key_spend(self) -> str:
        """Hash: each key's spend and holds (`<key id>:p` its budget period's start, `:s` its
        spend in it, `:h` its open holds, `:t` its spend over its life) and, for each open hold,
        `h:<request id>` -> the key it was held under (see key_state in lua/_prelude.lua)."""
        return f"{PREFIX}:{self.tag}:keyspend"

    def key_rate(self, key_id: str, kind: str) -> str:
        """Hash: a key's own rate-limit counter (as `rate`), `kind` requests or tokens."""
        return f"{PREFIX}:{self.tag}:rate:key:{key_id}:{kind}"

    @property
    def subscriptions(self) -> str:
        """Set of model names the account may call."""
        return f"{PREFIX}:{self.tag}:subs"

    @property
    def holds(self) -> str:
        """Hash: request id -> micro-units held for that call."""
        return f"{PREFIX}:{self.tag}:holds"

    @property
    def hold_leases(self) -> str:
        """Sorted set: request id scored by the time (ms) its hold's lease ends."""
        return f"{PREFIX}:{self.tag}:leases"

    @property
    def hold_info(self) -> str:
        """Hash: request id -> what settling it without its gateway needs (tab-separated model,
        prompt tokens, input and output price per million, key id, stream flag)."""
        return f"{PREFIX}:{self.tag}:holdinfo"

    @property
    def checkpoints(self) -> str:
        """Hash: request id -> completion tokens seen so far by the gateway serving it."""
        return f"{PREFIX}:{self.tag}:checkpoints"

    @property
    def usage(self) -> str:
        """Stream of usage records, oldest first."""
        return f"{PREFIX}:{self.tag}:usage"

    @property
    def topups(self) -> str:
        """Stream of top-ups, oldest first (the audit's other half)."""
        return f"{PREFIX}:{self.tag}:topups"

    @property
    def outbox(self) -> str:
        """Stream of events waiting for delivery, written by the scripts that cause them."""
        return f"{PREFIX}:{self.tag}:outbox"

    @property
    def deliveries(self) -> str:
        """Hash: `<event id>|<channel id>` -> `done`, or `<attempts>:<next try ms>`."""
        return f"{PREFIX}:{self.tag}:deliveries"

    @property
    def dead_letters(self) -> str:
        """Stream of deliveries that kept failing, for the admin API."""
        return f"{PREFIX}:{self.tag}:dead"

    @property
    def outbox_lock(self) -> str:
        """String: the instance delivering this account's events right now (with a TTL)."""
        return f"{PREFIX}:{self.tag}:outbox-lock"

    @property
    def notifications(self) -> str:
        """String: JSON of the account's own notification channels and chosen events."""
        return f"{PREFIX}:{self.tag}:notify"

    def rate(self, kind: str, model: str = "") -> str:
        """Hash: one rate-limit rule's sliding-window counter (`w`, `c`, `p`, see
        `_prelude.lua`); `kind` is requests or tokens; `model` names a model's own limit."""
        return (
            f"{PREFIX}:{self.tag}:rate:{kind}:{model}"
            if model
            else (f"{PREFIX}:{self.tag}:rate:{kind}")
        )

    def settled(self, request_id: str) -> str:
        """String: the cost a request was settled at (present once settled)."""
        return f"{PREFIX}:{self.tag}:settled:{request_id}"

    def idempotency(self, key: str) -> str:
        """Hash: what a top-up under this Idempotency-Key answered."""
        return f"{PREFIX}:{self.tag}:idem:{key}"


class AccountField:
    """The field names of an account's hash (`AccountKeys.account`). The Lua scripts spell
    the same names: a field renamed here must be renamed in every script of `lua/` too."""

    ID: Final = "id"
    NAME: Final = "name"
    # Money, in micro-units: what is left, what open holds keep back, the running totals.
    BALANCE: Final = "balance"
    HELD: Final = "held"
    TOPPED_UP: Final = "topped_up"
    SPENT: Final = "spent"
    # usage costs whose records are no longer in the store: deleted by clearing, or trimmed
    # once the history database has them (lua/trim_usage.lua)
    CLEARED_SPENT: Final = "cleared_spent"
    # The arrears lifecycle: active | frozen | cleared, its period (grace | retention | '')
    # and times in ms.
    STATE: Final = "state"
    PERIOD: Final = "period"
    ARREARS_SINCE: Final = "arrears_since"
    CREATED_AT: Final = "created_at"
    CLEARED_AT: Final = "cleared_at"
    # The account's own rate limits, as written and as the admission script reads them.
    RL_REQUESTS: Final = "rl_requests"
    RL_TOKENS: Final = "rl_tokens"
    RL_REQUESTS_SPEC: Final = "rl_requests_spec"
    RL_TOKENS_SPEC: Final = "rl_tokens_spec"
    # The low-balance notification: its threshold, and whether this crossing has fired.
    LOW_THRESHOLD: Final = "low_threshold"
    LOW_NOTIFIED: Final = "low_notified"


def account_keys(account_id: str) -> AccountKeys:
    """Key names of account `account_id` (which must be a valid id)."""
    return AccountKeys(tag="{a:" + account_id + "}")
