"""How many settlements a second does the history export keep up with?

Issue 16 asks for at least 3,000 settlements/s on this machine. This writes usage records
into a real Valkey (the embedded one, `appendfsync everysec`: the store's fsync is not what is
measured) the way the settlement script writes them (one entry per call in each account's
stream, the fields of a typical chat call), across many accounts, then runs the product's
exporter (gateway/history/exporter.py) against a real PostgreSQL (the embedded one) until
every record is in the database, and reports records exported per second of wall time.

    python benchmarks/bench_export.py [--records 60000] [--accounts 500] [--batch 5000]

It prints one line per run and exits 1 if the rate is below 3,000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from gateway.config.schema import HistoryConfig
from gateway.history.embedded import EmbeddedPostgres
from gateway.history.exporter import Exporter
from gateway.ledger import Ledger
from gateway.ledger.history_feed import HistoryFeed
from gateway.ledger.keys import ACCOUNTS, account_index_member, account_keys
from gateway.store.embedded import EmbeddedStore
from gateway.usage_record import UsageRecord

TARGET = 3000.0


async def seed(client: aioredis.Redis, records: int, accounts: int) -> None:
    """`records` usage records spread over `accounts` accounts, as settlements write them."""
    now = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for a in range(accounts):
        account_id = f"bench-{a:05d}"
        pipe.zadd(ACCOUNTS, {account_index_member(account_id, now - accounts + a): 0})
        pipe.hset(account_keys(account_id).account, mapping={"id": account_id, "balance": 0})
    await pipe.execute()
    for start in range(0, records, 5000):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(records, start + 5000)):
            account_id = f"bench-{n % accounts:05d}"
            record = UsageRecord(
                request_id=f"req_{n:032x}",
                time=now,
                kind="inference",
                cost=129 + n % 50,
                status="ok",
                usage_source="upstream",
                model="gpt-4o-mini",
                prompt_tokens=310 + n % 40,
                completion_tokens=64,
                price_version="ps_0123456789ab",
                gateway_prompt_tokens=312,
                gateway_completion_tokens=64,
                key_id="k1",
                upstream="127.0.0.1:9000",
            )
            pipe.xadd(account_keys(account_id).usage, record.fields())  # type: ignore[arg-type]
        await pipe.execute()


async def run(records: int, accounts: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddedStore(Path(tmp) / "store", appendfsync="everysec")
        pg = EmbeddedPostgres(Path(tmp) / "history")
        store.start()
        pg.start()
        client = aioredis.Redis.from_url(store.url)
        pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=2)
        try:
            await seed(client, records, accounts)
            config = HistoryConfig(url=pg.url, batch_size=batch, keep_in_store=3600.0)
            exporter = Exporter(HistoryFeed(Ledger(client)), pool, config)
            async with pool.acquire() as conn:
                from gateway.history.schema import migrate

                await migrate(conn)
            exporter.migrated = True
            started = time.perf_counter()
            exported = 0
            while exported < records:
                done = await exporter.export_pass()
                exported += done.usage
                if not done.usage:
                    break
            elapsed = time.perf_counter() - started
            async with pool.acquire() as conn:
                stored = await conn.fetchval("SELECT count(*) FROM usage_records")
            assert stored == records, (stored, records)
        finally:
            await pool.close()
            await client.aclose()
            pg.stop()
            store.stop()
    return records / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()
    rate = asyncio.run(run(args.records, args.accounts, args.batch))
    verdict = "ok" if rate >= TARGET else "BELOW TARGET"
    print(
        f"exported {args.records} records of {args.accounts} accounts in batches of "
        f"{args.batch}: {rate:,.0f} records/s (target {TARGET:,.0f}/s: {verdict})"
    )
    return 0 if rate >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
