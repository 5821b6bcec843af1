"""The ledger: every money rule as one atomic Lua script per operation, on Redis."""

from gateway.ledger.ledger import (
    AccountRecord,
    Admission,
    Ledger,
    SettleResult,
    TokenCharge,
    TopupResult,
)

__all__ = ["AccountRecord", "Admission", "Ledger", "SettleResult", "TokenCharge", "TopupResult"]
