"""An answered call is billed exactly once, whatever fails: the store away for longer than any
retry and any lease, the gateway stopped or killed meanwhile (the settlement journal)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from gateway.accounts.apikeys import parse_api_key
from gateway.ledger import Ledger, Reservation, TokenCharge
from gateway.ledger.journal import Entry
from gateway.ledger.keys import HOLDS_DUE
from gateway.store.channel import channel_for
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, expected_cost, micros
from tests.conftest import GATEWAY_ENV, gateway_config, model_entry
from tests.procs import Proc, start_gateway

BILLING = {"hold_lease": "1s", "sweep_interval": "100ms", "checkpoint_tokens": 1000}


async def _call(
    session: aiohttp.ClientSession, gw: Proc, stream: bool, ttft: float
) -> tuple[str, int, dict[str, int]]:
    """One call answered slowly; returns (x-request-id, status, the usage the client saw)."""
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": f"journal {stream}"}],
        "max_tokens": 12,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with session.post(
        gw.url + "/v1/chat/completions",
        data=orjson.dumps(body),
        headers={"x-mock-ttft": str(ttft)},
    ) as resp:
        raw = await resp.read()
        request_id = resp.headers["x-request-id"]
        if resp.status != 200:
            return request_id, resp.status, {}
        if not stream:
            return request_id, 200, orjson.loads(raw)["usage"]
        assert raw.endswith(b"data: [DONE]\n\n")
        events = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e and e != b"data: [DONE]"]
        return request_id, 200, events[-1]["usage"]


async def _answered_during_outage(
    gw: Proc, key: str, store: EmbeddedStore, calls: int = 6
) -> list[tuple[str, int, dict[str, int]]]:
    """Admit `calls` calls, stop the store while the upstream thinks, and collect the answers
    (every one complete: the client has what it paid for while the store is away)."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        pending = [
            asyncio.ensure_future(_call(session, gw, stream=i % 2 == 0, ttft=0.8))
            for i in range(calls)
        ]
        await asyncio.sleep(0.4)
        store.stop()
        answers = await asyncio.gather(*pending)
    assert [status for _, status, _ in answers] == [200] * calls
    return answers


def _records_by_request(admin: Admin, account_id: str, want: int, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        reply = admin.call("GET", f"/admin/accounts/{account_id}/usage?limit=1000")
        records = reply.json()["data"] if reply.status == 200 else []
        if len(records) >= want or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _check_once_each(
    admin: Admin,
    store: EmbeddedStore,
    account_id: str,
    answers: list[tuple[str, int, dict[str, int]]],
) -> None:
    """Each answered call has exactly one usage record, for the usage its client saw (not a
    sweeper's orphaned guess), and the ledger adds up."""
    records = _records_by_request(admin, account_id, len(answers))
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_id.setdefault(record["request_id"], []).append(record)
    assert sorted(by_id) == sorted(request_id for request_id, _, _ in answers), records
    for request_id, _, usage in answers:
        (record,) = by_id[request_id]
        assert record["status"] == "ok", record
        assert record["prompt_tokens"] == usage["prompt_tokens"]
        assert record["completion_tokens"] == usage["completion_tokens"]
        assert micros(record["cost"]) == expected_cost(
            usage["prompt_tokens"], usage["completion_tokens"], "0.15", "0.60"
        )
    client = redis.Redis.from_url(store.url)
    try:
        assert_invariant(admin, client, account_id, micros("5.00"))
    finally:
        client.close()


def _journal_config(store: EmbeddedStore, mock_url: str, data_dir: Path) -> dict[str, Any]:
    config = gateway_config(
        store, [model_entry("m", mock_url, upstream_model="mock-model")], billing=BILLING
    )
    config["store"]["data_dir"] = str(data_dir)
    return config


async def test_outage_longer_than_retries_and_leases_bills_each_answer_once(
    tmp_path: Path, mock_a: Proc, own_store: EmbeddedStore
) -> None:
    """The store goes away for 9 s while six calls are with the upstream: longer than the
    old in-memory retries (~6 s) and than the holds' 1 s leases. Every client gets its whole
    answer; when the store returns, each call has exactly one `ok` record billed for what the
    client saw: the journal replayed them before any sweeper could take the ended leases."""
    gw = start_gateway(
        tmp_path, _journal_config(own_store, mock_a.url, tmp_path / "data"), GATEWAY_ENV
    )
    try:
        admin = Admin(gw.url)
        account_id, key = admin.funded(["m"], amount="5.00")
        answers = await _answered_during_outage(gw, key, own_store)
        await asyncio.sleep(9)
        own_store.start()
        await asyncio.to_thread(_check_once_each, admin, own_store, account_id, answers)
    finally:
        gw.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_gateway_stopped_during_outage_settles_after_restart(
    tmp_path: Path, mock_a: Proc, own_store: EmbeddedStore, sig: signal.Signals
) -> None:
    """The gateway is stopped (SIGTERM: drained) or killed (SIGKILL) while the store is away
    and six answered calls are unsettled. A gateway started later on the same data dir adopts
    the dead one's journal when the store is back: every answered call has exactly one record
    (none lost: the bound of what a SIGKILL during an outage loses, measured here, is zero)."""
    config = _journal_config(own_store, mock_a.url, tmp_path / "data")
    gw = start_gateway(tmp_path, config, GATEWAY_ENV)
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="5.00")
    answers = await _answered_during_outage(gw, key, own_store)
    await asyncio.sleep(0.3)
    assert gw.stop(sig, timeout=30) in (0, -signal.SIGKILL)
    segments = list((tmp_path / "data" / "journal").glob("settle-*.jsonl"))
    assert segments, "the owed settlements must be on disk"
    own_store.start()
    again = start_gateway(tmp_path, config, GATEWAY_ENV)
    try:
        await asyncio.to_thread(_check_once_each, Admin(again.url), own_store, account_id, answers)
    finally:
        again.stop()
    assert not list((tmp_path / "data" / "journal").glob("settle-*.jsonl"))


async def test_non_streamed_call_whose_gateway_died_is_billed_its_prompt(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """SIGKILL of the gateway while a non-streamed call waits on the upstream: the surviving
    instance's sweeper settles the hold for the prompt alone, as an `orphaned` record (the
    same rule as a client that leaves before the first byte), instead of releasing it free."""
    models = [model_entry("m", mock_a.url, upstream_model="mock-model")]
    victim = make_gateway(models, billing=BILLING)
    survivor = make_gateway(models, billing=BILLING)
    admin = Admin(survivor.url)
    account_id, key = admin.funded(["m"], amount="5.00")
    body = {"model": "m", "messages": [{"role": "user", "content": "never answered"}]}

    async def call() -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
            try:
                async with s.post(
                    victim.url + "/v1/chat/completions",
                    data=orjson.dumps(body),
                    headers={"x-mock-ttft": "5"},
                ) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                return

    pending = asyncio.ensure_future(call())
    await asyncio.sleep(0.5)
    victim.stop(signal.SIGKILL)
    await pending
    records = await asyncio.to_thread(_records_by_request, admin, account_id, 1)
    (record,) = records
    assert record["status"] == "orphaned"
    assert record["completion_tokens"] == 0
    assert record["prompt_tokens"] > 0
    assert micros(record["cost"]) == expected_cost(record["prompt_tokens"], 0, "0.15", "0.60")
    assert_invariant(admin, redis_client, account_id, micros("5.00"))


async def test_admission_indexes_the_hold_before_its_script(
    valkey: EmbeddedStore, admin: Admin, redis_client: redis.Redis
) -> None:
    """When admission returns, the account is already in the hold index: the entry went out
    ahead of the script (in the same write), not in a batch after it, so a gateway that dies
    right after admitting leaves no hold that only a full scan could find."""
    account_id, key = admin.funded(["mock-model"], amount="1.00")
    parsed = parse_api_key(f"Bearer {key}")
    assert parsed is not None
    client = aioredis.Redis.from_url(valkey.url)
    ledger = Ledger(client, channel_for(valkey.url))
    redis_client.zrem(HOLDS_DUE, account_id)
    try:
        lease = int(time.time() * 1000) + 60_000
        admission = await ledger.reserve(
            Reservation(
                account_id,
                parsed.key_id,
                parsed.key_hash,
                "mock-model",
                100,
                "req_index_first",
                lease,
                False,
                "",
                int(time.time() * 1000),
                10,
                ("", "", "", ""),
            )
        )
        assert admission.code == "ok", admission
        assert redis_client.zscore(HOLDS_DUE, account_id) == lease
        await ledger.release(account_id, "req_index_first")
    finally:
        if ledger.channel is not None:
            await ledger.channel.aclose()
        await client.aclose()


async def test_adopted_settlement_older_than_the_settled_marker_is_set_aside(
    tmp_path: Path, valkey: EmbeddedStore, admin: Admin, redis_client: redis.Redis
) -> None:
    """A dead gateway's segment is adopted: its fresh settlement is sent and the segment
    removed, while one older than the store remembers settled request ids is not replayed (it
    could be charged twice) but set aside in `<segment>.stale`."""
    from gateway.ledger.journal import Entry, SettlementJournal
    from gateway.ledger.keys import SETTLED_TTL_SECONDS

    account_id, _ = admin.funded(["mock-model"], amount="1.00")
    now = int(time.time() * 1000)
    old = now - SETTLED_TTL_SECONDS * 1000

    def entry(request_id: str, at: int) -> Entry:
        record = {"request_id": request_id, "time": at, "kind": "inference", "cost": 1000}
        return Entry(account_id, request_id, cost=1000, now_ms=at, record=record)

    directory = tmp_path / "journal"
    directory.mkdir()
    segment = directory / "settle-s1-999999-1-1.jsonl"
    lines = [entry("req_fresh", now).encode(), entry("req_stale", old).encode()]
    segment.write_bytes(b"\n".join(lines) + b"\n")
    client = aioredis.Redis.from_url(valkey.url)
    try:
        journal = SettlementJournal(Ledger(client), directory, "s1")
        assert await journal.adopt() == 1
        assert not segment.exists()
        stale = segment.with_suffix(".stale").read_bytes().splitlines()
        assert [Entry.decode(line).request_id for line in stale] == ["req_stale"]
    finally:
        await client.aclose()
    records = admin.usage(account_id)
    assert [r["request_id"] for r in records] == ["req_fresh"]
    assert admin.account(account_id)["balance"] == "0.999000"


def test_an_entry_of_the_earlier_format_replays_with_no_key_window() -> None:
    """A journal written before keys had token limits holds two token windows; it still
    decodes (the key's window empty), and a current entry round-trips all three."""
    old = orjson.dumps(
        {
            "a": "acct",
            "r": "req_1",
            "x": False,
            "c": 42,
            "t": 1,
            "rec": {"key_id": "key_1"},
            "ch": ["m", 10, "5", "7"],
            "n": 12,
        }
    )
    assert Entry.decode(old).charge == TokenCharge("m", 10, ("5", "7", ""))
    entry = Entry("acct", "req_2", cost=1, charge=TokenCharge("m", 3, ("1", "", "9")))
    assert Entry.decode(entry.encode()) == entry
