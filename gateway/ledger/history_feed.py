"""What the history exporter reads from the store, and how it trims what it has exported.

The ledger's scripts append each account's usage records and top-ups to its streams
atomically with the money; the exporter (gateway/history/exporter.py) copies them to the
database and, once they are there and older than `history.keep_in_store`, trims them here.
Reads are pipelined per page of accounts; a trim only ever removes entries at or below the
exported cursor (`MINID` is exclusive), never one the database lacks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from gateway.ledger.keys import (
    ACCOUNTS,
    AccountField,
    account_keys,
    stream_id_after,
    valid_account_id,
)
from gateway.ledger.ledger import Ledger
from gateway.ledger.transport import guard, stream_entries, text

__all__ = ["BACKLOG_MAX", "Entries", "HistoryFeed"]

# Store entries read after a cursor at most (the unexported backlog: normally seconds of it).
BACKLOG_MAX = 1_000_000
# Entries one XRANGE reads of one stream (see `new_entries`).
READ_SLICE = 64
# (entry id, fields) of one stream entry, as text.
Entries = list[tuple[str, dict[str, str]]]


class HistoryFeed:
    """The store's side of the export."""

    __slots__ = ("client", "ledger")

    # The most entries one trim script removes (its reply and its XDEL stay small).
    TRIM_STEP = 1000

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.client = ledger.client

    async def accounts(self, after: str | None, limit: int) -> tuple[list[str], str | None]:
        """Up to `limit` account ids from the accounts index after member `after`, and the
        member to continue from (None at the end)."""
        async with guard("history: accounts"):
            raw: Any = await self.client.zrangebylex(
                ACCOUNTS, f"({after}" if after else "-", "+", start=0, num=limit
            )
        members = [text(m) for m in raw]
        ids = [m.partition(":")[2] for m in members]
        return [i for i in ids if valid_account_id(i)], (
            members[-1] if len(members) == limit else None
        )

    async def new_entries(
        self, streams: Sequence[tuple[str, str, str | None]], count: int
    ) -> list[Entries]:
        """For each (account id, `usage` | `topups`, last exported id or None), up to `count`
        entries after it, oldest first. Read READ_SLICE at a time (one pipeline of an XRANGE
        for each stream still short), with the loop's other work between: the loop serves
        calls too, and one read of thousands of entries stalled them."""
        out: list[Entries] = [[] for _ in streams]
        starts = [stream_id_after(last) if last else "-" for _, _, last in streams]
        todo = list(range(len(streams)))
        while todo:
            wanted = {i: min(READ_SLICE, count - len(out[i])) for i in todo}
            async with guard("history: read"):
                pipe = self.client.pipeline(transaction=False)
                for i in todo:
                    account_id, stream, _ = streams[i]
                    keys = account_keys(account_id)
                    key = keys.usage if stream == "usage" else keys.topups
                    pipe.xrange(key, min=starts[i] or "+", max="+", count=wanted[i])
                replies = await pipe.execute()
            more = []
            for i, reply in zip(todo, replies, strict=True):
                entries = stream_entries(reply)
                out[i].extend(entries)
                if len(entries) == wanted[i] and len(out[i]) < count:
                    starts[i] = stream_id_after(entries[-1][0])
                    more.append(i)
            todo = more
            await asyncio.sleep(0)
        return out

    async def cleared_at(self, account_ids: Sequence[str]) -> dict[str, int]:
        """When each account that has been cleared was cleared (ms)."""
        if not account_ids:
            return {}
        async with guard("history: clearings"):
            pipe = self.client.pipeline(transaction=False)
            for account_id in account_ids:
                pipe.hget(account_keys(account_id).account, AccountField.CLEARED_AT)
            replies = await pipe.execute()
        return {
            account_id: int(text(reply))
            for account_id, reply in zip(account_ids, replies, strict=True)
            if reply
        }

    async def trim(self, trims: Sequence[tuple[str, str]]) -> int:
        """For each (account id, exclusive id bound), drop its usage entries below the bound,
        their costs moved to the account's `cleared_spent` in the same script
        (lua/trim_usage.lua); the entries dropped."""
        dropped = 0
        for account_id, bound in trims:
            keys = account_keys(account_id)
            while True:
                reply = await self.ledger.scripts.run_upkeep(
                    "trim_usage", [keys.usage, keys.account], [bound, self.TRIM_STEP]
                )
                dropped += int(reply[0])
                if not int(reply[1]):
                    break
        return dropped
