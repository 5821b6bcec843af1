"""The ledger: every money rule as one atomic Lua script per operation, on Redis.

`ledger` has the operations, `records` what they take and answer, `indexes` the store-wide
indexes and locks, `transport` how scripts run and store errors map, `keys` every name.
"""

from gateway.ledger.ledger import Ledger
from gateway.ledger.records import (
    AccountRecord,
    Admission,
    KeyLimits,
    KeySpend,
    Reservation,
    SettleResult,
    TokenCharge,
    TopupResult,
)

__all__ = [
    "AccountRecord",
    "Admission",
    "KeyLimits",
    "KeySpend",
    "Ledger",
    "Reservation",
    "SettleResult",
    "TokenCharge",
    "TopupResult",
]
