"""Usage history in PostgreSQL: the system of record beside the ledger's hot state."""
