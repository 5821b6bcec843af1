"""The durability bound of admission without fsync (issue 19): the store fsyncs once a second
(`appendfsync everysec`, the default), admissions do not wait for the disk, and settlements,
releases and top-ups are acknowledged only once the store's fsync covers them (WAITAOF,
gateway/store/durability.py).

The bound, tested here: a SIGKILL of the store, of the gateway, or of both at once loses no
answered call's settlement and no answered top-up; and a store that comes back without what it
had not yet fsynced (a power loss) gets those settlements and releases again from the journal.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from gateway.accounts.apikeys import parse_api_key
from gateway.ledger import Ledger, Reservation
from gateway.ledger.journal import Entry, SettlementJournal
from gateway.ledger.keys import account_keys
from gateway.store.channel import channel_for
from gateway.store.client import connect_store
from gateway.store.durability import FsyncConfirmer, confirmer_for
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, micros, records_by_request
from tests.conftest import GATEWAY_ENV, model_entry
from tests.procs import Proc, free_port, start_gateway, store_pid

COST = 1000  # micro-units a hand-made settlement charges


@pytest.fixture
def fsync_store(tmp_path: Path) -> Any:
    """A store of the test's own with the default fsync policy (once a second)."""
    store = EmbeddedStore(tmp_path / "store", port=free_port(), appendfsync="everysec")
    store.start()
    yield store
    store.stop()


def _aof(store: EmbeddedStore) -> Path:
    (path,) = list(Path(store.data_dir).glob("**/appendonlydir"))
    return path


def _restart_without_unsynced_writes(store: EmbeddedStore, snapshot: Path) -> None:
    """SIGKILL the store and start it from the append-only file as it was at `snapshot`: what
    a power loss does to writes the disk had not fsynced yet."""
    store.kill()
    aof = _aof(store)
    shutil.rmtree(aof)
    shutil.copytree(snapshot, aof)
    store.start()


async def _reserve(ledger: Ledger, account_id: str, key: str, request_id: str) -> None:
    parsed = parse_api_key(f"Bearer {key}")
    assert parsed is not None
    now = int(time.time() * 1000)
    admission = await ledger.reserve(
        Reservation(
            account_id, parsed.key_id, parsed.key_hash, "m", 5 * COST, request_id,
            now + 60_000, False, "", now, 10, ("", "", "", ""),
        )
    )  # fmt: skip
    assert admission.code == "ok", admission


@pytest.mark.parametrize("confirmed", [True, False], ids=["confirmed", "acknowledged-on-reply"])
@pytest.mark.parametrize("release", [False, True], ids=["settlement", "release"])
async def test_journal_keeps_an_entry_until_the_store_has_fsynced_it(
    tmp_path: Path,
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    fsync_store: EmbeddedStore,
    confirmed: bool,
    release: bool,
) -> None:
    """The store answers a settlement (or a release), then loses it: it comes back from its
    disk as of before that write. With confirmation the journal had not let the entry go (the
    fsync round failed with the store), so it sends it again and the call is charged once
    (the release drops the hold again). Acknowledged on the reply alone, as before this
    design, the entry is forgotten: the charge is lost, or the hold comes back for the
    sweeper to bill as orphaned. That second case is what the test tells apart."""
    gw = make_gateway([model_entry("m", mock_a.url)], store={"url": fsync_store.url})
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="1.00")
    client = connect_store(fsync_store.url)
    channel = channel_for(fsync_store.url)
    confirmer = FsyncConfirmer(client) if confirmed else None
    ledger = Ledger(client, channel, confirmer)
    journal = SettlementJournal(ledger, tmp_path / "journal", "t")
    sync = redis.Redis.from_url(fsync_store.url)
    k = account_keys(account_id)
    try:
        await _reserve(ledger, account_id, key, "req_durable")
        await FsyncConfirmer(client).confirm()  # the hold is on disk: the snapshot has it
        snapshot = tmp_path / "aof-before"
        shutil.copytree(_aof(fsync_store), snapshot)
        record = {"request_id": "req_durable", "kind": "inference", "cost": COST}
        entry = Entry(account_id, "req_durable", release=release, cost=COST, record=record)
        entry.now_ms = int(time.time() * 1000)
        await journal.submit(entry)  # answered; its fsync round has not run yet
        assert sync.hget(k.holds, "req_durable") is None
        fsync_store.kill()  # the round now fails: the store cannot say it has the entry
        deadline = time.monotonic() + 5
        while confirmed and journal.owed == 0:
            assert time.monotonic() < deadline, "the unconfirmed entry was not kept"
            await asyncio.sleep(0.02)
        _restart_without_unsynced_writes(fsync_store, snapshot)
        sync = redis.Redis.from_url(fsync_store.url)
        assert sync.hget(k.holds, "req_durable") is not None  # the store lost the entry
        assert not sync.exists(k.settled("req_durable"))
        deadline = time.monotonic() + 10
        while not await journal.replay_owed():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert journal.owed == 0
        held = sync.hget(k.holds, "req_durable")
        charged = [r["request_id"] for r in admin.usage(account_id)]
        balance = admin.account(account_id)["balance"]
    finally:
        await journal.close()
        if confirmer is not None:
            await confirmer.aclose()
        if channel is not None:
            await channel.aclose()
        await _close(client)
        sync.close()
    if not confirmed:  # the old rule: the store's reply was the acknowledgement
        assert held is not None  # the hold is back, for a sweeper to bill as orphaned
        assert charged == []
        return
    assert held is None
    if release:
        assert charged == []
        assert balance == "1.000000"
    else:
        assert charged == ["req_durable"]
        assert micros(balance) == micros("1.00") - COST


async def test_one_fsync_round_confirms_many_writes(fsync_store: EmbeddedStore) -> None:
    """Group commit: 300 writers on the scripts' channel asking at once share a few rounds
    (one WAITAOF each). That a round covers the writes answered before it is what the
    restore test above shows."""
    client = connect_store(fsync_store.url)
    channel = channel_for(fsync_store.url)
    assert channel is not None
    confirmer = FsyncConfirmer(client)
    try:

        async def write_then_confirm(i: int) -> None:
            await channel.execute("SET", f"gw:test:durable:{i}", i)
            await confirmer.confirm()

        await asyncio.gather(*(write_then_confirm(i) for i in range(300)))
        assert 1 <= confirmer.rounds <= 4, confirmer.rounds
        info = await client.info("persistence")
        assert info["aof_enabled"] == 1
    finally:
        await confirmer.aclose()
        await channel.aclose()
        await _close(client)


async def test_a_store_without_an_append_only_file_is_not_waited_on(
    fsync_store: EmbeddedStore,
) -> None:
    """A store that keeps no append-only file cannot be waited on: the confirmer marks it
    so and stops asking (acknowledged writes are then as durable as that store makes them)."""
    client = connect_store(fsync_store.url)
    await client.config_set("appendonly", "no")
    confirmer = FsyncConfirmer(client)
    try:
        await confirmer.confirm()
        assert confirmer.unsupported
        await confirmer.confirm()
        assert confirmer.rounds == 0
    finally:
        await client.config_set("appendonly", "yes")
        await confirmer.aclose()
        await _close(client)


async def test_unreachable_store_fails_the_confirmation(fsync_store: EmbeddedStore) -> None:
    """No answer, no acknowledgement: a confirmation the store cannot give raises (the
    journal then keeps the entry owed; a top-up answers 503 and is retried by its key)."""
    client = connect_store(fsync_store.url)
    ledger = Ledger(client, None, FsyncConfirmer(client))
    fsync_store.kill()
    try:
        with pytest.raises(Exception, match="unavailable"):
            await ledger.confirm()
    finally:
        fsync_store.start()
        await _close(client)


async def _close(client: Any) -> None:
    await client.aclose()
    await client.connection_pool.disconnect()


# -- the whole gateway under load --------------------------------------------------------------


def _config(data_dir: Path, mock: Proc) -> dict[str, Any]:
    return {
        "store": {"url": "embedded", "data_dir": str(data_dir)},
        "models": [model_entry("m", mock.url, upstream_model="mock-model")],
        "billing": {"hold_lease": "1s", "sweep_interval": "100ms"},
    }


class _Load:
    """Calls and top-ups from several clients at once; what each got answered."""

    def __init__(self, url: str, key: str, account_id: str, admin: Admin) -> None:
        self.url, self.key, self.account_id, self.admin = url, key, account_id, admin
        self.answered: list[str] = []  # x-request-id of every call answered 200, whole
        self.credited = 0  # micro-units of top-ups answered 201
        self.pending: str | None = None  # the Idempotency-Key of a top-up not yet answered
        self.stop = asyncio.Event()

    async def caller(self, n: int) -> None:
        stream = n % 2 == 1
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": f"durable {n}"}],
            "max_tokens": 4,
            "stream": stream,
        }
        headers = {"Authorization": f"Bearer {self.key}"}
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            while not self.stop.is_set():
                try:
                    async with session.post(
                        self.url + "/v1/chat/completions", data=orjson.dumps(body)
                    ) as resp:
                        raw = await resp.read()
                        whole = not stream or raw.endswith(b"data: [DONE]\n\n")
                        if resp.status == 200 and whole:
                            self.answered.append(resp.headers["x-request-id"])
                        elif resp.status != 200:
                            await asyncio.sleep(0.02)
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.05)

    async def topper(self) -> None:
        """A top-up every 50 ms; one not answered 200 is sent again with its key (as an admin
        client would), so each is credited once or the test fails."""
        i = 0
        while not self.stop.is_set():
            i += 1
            self.pending = f"durable-{i}"
            while not self.stop.is_set() and not await self.top_up(self.admin):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)

    async def top_up(self, admin: Admin) -> bool:
        """Send the pending top-up (through `admin`); True once it is answered 201."""
        if self.pending is None:
            return True
        try:
            reply = await asyncio.to_thread(
                admin.call,
                "POST",
                f"/admin/accounts/{self.account_id}/topups",
                {"amount": "0.010000"},
                {"Idempotency-Key": self.pending},
            )
        except OSError:
            return False
        if reply.status != 201:
            return False
        self.credited += micros("0.010000")
        self.pending = None
        return True


async def _run_load(load: _Load, seconds: float, fault: Callable[[], None]) -> None:
    tasks = [asyncio.create_task(load.caller(n)) for n in range(8)]
    tasks.append(asyncio.create_task(load.topper()))
    await asyncio.sleep(seconds / 2)
    fault()
    await asyncio.sleep(seconds / 2)
    load.stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)


async def test_store_killed_under_load_loses_no_answered_call(tmp_path: Path, mock_a: Proc) -> None:
    """SIGKILL of the embedded store (fsync once a second) while 8 clients call and top-ups
    run: the gateway restarts it, and once the journal has replayed, every call answered 200
    has exactly one usage record, no other call has one, every answered top-up is credited
    once, and the balance adds up."""
    data = tmp_path / "store"
    gw = start_gateway(tmp_path, _config(data, mock_a), GATEWAY_ENV)
    try:
        admin = Admin(gw.url)
        account_id, key = admin.funded(["m"], amount="10.00")
        load = _Load(gw.url, key, account_id, admin)

        def kill_store() -> None:
            pid = store_pid(data)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)

        await _run_load(load, 4.0, kill_store)
        while not await load.top_up(admin):
            await asyncio.sleep(0.1)
        assert len(load.answered) > 50, len(load.answered)
        await asyncio.to_thread(records_by_request, admin, account_id, load.answered, 30)
        client = redis.Redis.from_url((data / "store.url").read_text().split()[0])
        assert_invariant(admin, client, account_id, micros("10.00") + load.credited)
        client.close()
        assert "embedded store died; restarting" in gw.log()
    finally:
        gw.stop()


async def test_gateway_and_store_killed_together_lose_no_answered_call(
    tmp_path: Path, mock_a: Proc
) -> None:
    """SIGKILL of the gateway's whole process group (the gateway and its embedded store at
    once) under load. Started again on the same data directory, the new gateway adopts the
    journal: every call answered 200 before the kill has exactly one usage record (calls cut
    by the kill may have one too, billed as orphaned), and the balance adds up."""
    data = tmp_path / "store"
    gw = start_gateway(tmp_path, _config(data, mock_a), GATEWAY_ENV, new_session=True)
    try:
        admin = Admin(gw.url)
        account_id, key = admin.funded(["m"], amount="10.00")
        load = _Load(gw.url, key, account_id, admin)
        await _run_load(load, 3.0, lambda: os.killpg(gw.pid, signal.SIGKILL))
    finally:
        gw.stop(signal.SIGKILL)
    assert len(load.answered) > 20, len(load.answered)
    again = start_gateway(tmp_path, _config(data, mock_a), GATEWAY_ENV)
    try:
        admin = Admin(again.url)
        deadline = time.monotonic() + 30
        while not await load.top_up(admin):  # the one the kill cut, by its key
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        while True:
            seen = [r["request_id"] for r in admin.usage(account_id)]
            if set(load.answered) <= set(seen) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        for request_id in load.answered:
            assert seen.count(request_id) == 1, request_id
        assert len(seen) == len(set(seen))
        client = redis.Redis.from_url((data / "store.url").read_text().split()[0])
        assert_invariant(admin, client, account_id, micros("10.00") + load.credited)
        client.close()
    finally:
        again.stop()


async def test_a_cluster_store_gets_no_confirmer(fsync_store: EmbeddedStore) -> None:
    """WAITAOF would reach one node of a cluster, not the account's: a cluster client gets no
    confirmer (its nodes' own appendfsync holds), a single-node one does."""
    cluster = connect_store("redis+cluster://127.0.0.1:1")  # not connected until first used
    single = connect_store(fsync_store.url)
    try:
        assert confirmer_for(cluster) is None
        assert isinstance(confirmer_for(single), FsyncConfirmer)
    finally:
        await cluster.aclose()
        await _close(single)
