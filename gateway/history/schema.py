"""The history database's schema: numbered SQL files, applied in order at start, once each.

`gateway/history/migrations/NNNN_name.sql` are the schema's versions; `schema_migrations`
records which are applied. Each file runs in a transaction of its own, under an advisory lock,
so gateways starting together on one shared server apply each once, and a failed file leaves
nothing half done. A database newer than this code (a version it does not know) is refused.
"""

from __future__ import annotations

import re
from importlib.resources import files

import asyncpg

from gateway.observability.logging import get_logger

__all__ = ["MIGRATION_LOCK", "SchemaTooNew", "migrate", "migrations"]

log = get_logger("gateway.history")

# pg_advisory_lock keys of the gateway (any two 32-bit ints; these are its own).
MIGRATION_LOCK = (0x6761, 0x7701)
_NAME = re.compile(r"([0-9]{4})_[a-z0-9_]+\.sql")


class SchemaTooNew(RuntimeError):
    """The database has a schema version this gateway does not know."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped, in order."""
    found = []
    for entry in files("gateway.history").joinpath("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(connection: asyncpg.Connection) -> list[int]:
    """Apply the migrations the database lacks; the versions applied now."""
    await connection.execute("SELECT pg_advisory_lock($1, $2)", *MIGRATION_LOCK)
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM schema_migrations")
        }
        shipped = migrations()
        known = {version for version, _, _ in shipped}
        if applied - known:
            raise SchemaTooNew(
                f"the history database has schema versions {sorted(applied - known)} that this "
                "gateway does not know: it is older than the one that wrote them"
            )
        done = []
        for version, name, sql in shipped:
            if version in applied:
                continue
            async with connection.transaction():
                await connection.execute(sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("history schema migrated", version=version, name=name)
            done.append(version)
        return done
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1, $2)", *MIGRATION_LOCK)
