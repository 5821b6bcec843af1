"""GET /admin/accounts?limit=&after=&state=: every account, oldest first, page by page.

The module's store is emptied before each test, so a listing's every account is one the test
made."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from gateway.ledger import Ledger
from gateway.ledger import indexes as indexes_module
from gateway.ledger.keys import (
    ACCOUNTS,
    ACCOUNTS_BACKFILLED,
    account_index_member,
    account_keys,
)
from gateway.store.embedded import EmbeddedStore
from gateway.timefmt import now_ms
from tests.admin_client import ADMIN_TOKEN, Admin, Reply
from tests.conftest import GATEWAY_ENV, gateway_config, model_entry
from tests.procs import Proc, free_port, start_gateway

ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def listing_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStore]:
    """The module's own store: emptied before each test (see `store`)."""
    store = EmbeddedStore(tmp_path_factory.mktemp("listing") / "store", port=free_port())
    store.start()
    yield store
    store.stop()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, listing_store: EmbeddedStore, mock_a: Proc
) -> Iterator[list[Proc]]:
    """Two gateway instances on the module's store."""
    tmp = tmp_path_factory.mktemp("listing-gateways")
    config = gateway_config(listing_store, [model_entry("mock-model", mock_a.url)])
    procs = [start_gateway(tmp, config, GATEWAY_ENV) for _ in range(2)]
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture
def store(listing_store: EmbeddedStore) -> Iterator[redis.Redis]:
    """A client on the module's store, emptied first: the test's accounts are all there is."""
    client = redis.Redis.from_url(listing_store.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def gateways(pair: list[Proc], store: redis.Redis) -> list[Proc]:
    """Two gateway instances on an empty store."""
    return pair


@pytest.fixture
def gateway_alone(pair: list[Proc], store: redis.Redis) -> Proc:
    """One gateway instance on an empty store."""
    return pair[0]


@pytest.fixture
async def ledger(listing_store: EmbeddedStore, store: redis.Redis) -> AsyncIterator[Ledger]:
    client = aioredis.Redis.from_url(listing_store.url)
    yield Ledger(client)
    await client.aclose()


def _error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return dict(error)


def _walk(admin: Admin, limit: int, query: str = "") -> list[dict[str, Any]]:
    """Every item of the listing, following `next` until it is null."""
    items: list[dict[str, Any]] = []
    after = ""
    for _ in range(10_000):
        page = admin.ok("GET", f"/admin/accounts?limit={limit}{query}{after}")
        assert set(page) == {"data", "next"}
        assert len(page["data"]) <= limit
        items.extend(page["data"])
        if page["next"] is None:
            return items
        after = f"&after={page['next']}"
    pytest.fail("the listing did not end")


def _order(item: dict[str, Any]) -> tuple[str, bytes]:
    """The listing's order: creation time (ISO, to the ms: sorts as text), then id by byte."""
    return item["created_at"], item["id"].encode()


async def _create(session: aiohttp.ClientSession, gw: Proc, account_id: str) -> int:
    body = orjson.dumps({"id": account_id})
    async with session.post(gw.url + "/admin/accounts", data=body, headers=ADMIN_HEADERS) as r:
        await r.read()
        return r.status


async def _create_many(gateways: list[Proc], ids: list[str]) -> None:
    """Create `ids` all at once, spread over the gateways."""
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(
            *(_create(session, gateways[i % len(gateways)], a) for i, a in enumerate(ids))
        )
    assert statuses == [201] * len(ids)


def _new_ids(n: int, prefix: str = "acct") -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:10]}" for _ in range(n)]


def old_version_account(
    store: redis.Redis | redis.RedisCluster, account_id: str, created_ms: int
) -> None:
    """An account as the create_account.lua of the version before the index wrote it."""
    store.hset(
        account_keys(account_id).account,
        mapping={
            "id": account_id,
            "name": "",
            "balance": 0,
            "held": 0,
            "topped_up": 0,
            "spent": 0,
            "state": "active",
            "period": "",
            "arrears_since": "",
            "created_at": created_ms,
        },
    )


# -- the route ------------------------------------------------------------------------------


def test_listing_needs_the_admin_token(gateway_alone: Proc) -> None:
    """GET /admin/accounts answers 401 `unauthorized` without the token or with a wrong one,
    and 200 with it."""
    for token in [None, "wrong-token"]:
        _error(
            Admin(gateway_alone.url, token=token).call("GET", "/admin/accounts"),
            401,
            "unauthorized",
        )
    assert Admin(gateway_alone.url).ok("GET", "/admin/accounts") == {"data": [], "next": None}


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=abc",
        "limit=",
        "limit=%C2%B2",
        "after=",
        "after=garbage",
        "after=1:acct",
        "after=000000000000001:a.b",
        "after=000000000000001:a%7Bb",
        "after=(000000000000001:a",
        "after=%2B",
        "state=",
        "state=bogus",
        "state=FROZEN",
        "state=active,frozen",
    ],
)
def test_bad_listing_query_is_400_with_its_param(admin: Admin, query: str) -> None:
    """A `limit` outside 1-1000, an `after` that is not a cursor this API gave (ZRANGEBYLEX's
    own `(`, `[`, `+`, `-` included) and a `state` other than active, frozen or cleared are 400
    `invalid_request` naming the parameter."""
    error = _error(admin.call("GET", f"/admin/accounts?{query}"), 400, "invalid_request")
    assert error["param"] == query.split("=")[0]
    assert error["type"] == "invalid_request_error"


def test_each_item_is_the_account_view(gateway_alone: Proc) -> None:
    """An item is exactly what GET /admin/accounts/{id} answers: balance, subscriptions and
    all; the default page holds up to 100 accounts."""
    admin = Admin(gateway_alone.url)
    funded, _ = admin.funded(["mock-model"], amount="12.50")
    plain = admin.create_account(name="plain")
    page = admin.ok("GET", "/admin/accounts")
    assert page["next"] is None
    assert page["data"] == [admin.account(funded), admin.account(plain)]
    assert page["data"][0]["subscriptions"] == ["mock-model"]
    assert page["data"][0]["balance"] == "12.500000"
    for _ in range(100):
        admin.create_account()
    page = admin.ok("GET", "/admin/accounts")
    assert len(page["data"]) == 100
    assert page["next"] is not None


# -- paging ---------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 7, 1000])
async def test_pages_hold_accounts_created_concurrently_each_once_in_order(
    gateways: list[Proc], limit: int
) -> None:
    """60 accounts created at once over two instances: following `next` lists each exactly
    once, in creation order (then id), and ends on `next: null`."""
    ids = _new_ids(60)
    await _create_many(gateways, ids)
    items = await asyncio.to_thread(_walk, Admin(gateways[1].url), limit)
    assert sorted(item["id"] for item in items) == sorted(ids)
    assert items == sorted(items, key=_order)


async def test_a_walk_neither_skips_nor_repeats_while_accounts_are_created(
    gateways: list[Proc], ledger: Ledger
) -> None:
    """While a walk pages with limit 3, accounts keep being created: now, through both
    instances, and also with earlier creation times (an instance whose clock is behind) that
    sort before the walk's cursor. Every account that existed when the walk started is listed
    exactly once, nothing twice, and the order never goes back."""
    before = _new_ids(30)
    await _create_many(gateways, before)
    admin = Admin(gateways[0].url)
    created_meanwhile: list[str] = []
    items: list[dict[str, Any]] = []
    after = ""
    start_ms = now_ms()
    for step in range(100):
        page = await asyncio.to_thread(admin.ok, "GET", f"/admin/accounts?limit=3{after}")
        items.extend(page["data"])
        now_ids, old_ids = _new_ids(2, "now"), _new_ids(2, "old")
        await _create_many(gateways, now_ids)
        for i, account_id in enumerate(old_ids):  # before everything listed so far
            assert await ledger.create_account(account_id, "", start_ms - 100_000 + step * 10 + i)
        created_meanwhile += now_ids + old_ids
        if page["next"] is None:
            break
        after = f"&after={page['next']}"
    else:
        pytest.fail("the walk did not end")
    seen = Counter(item["id"] for item in items)
    assert max(seen.values()) == 1
    assert all(seen[account_id] == 1 for account_id in before)
    assert set(seen) <= set(before) | set(created_meanwhile)
    assert not any(account_id.startswith("old-") for account_id in seen)
    assert items == sorted(items, key=_order)
    # A new walk finds them all.
    everything = await asyncio.to_thread(_walk, admin, 1000)
    assert sorted(i["id"] for i in everything) == sorted(before + created_meanwhile)


# -- the state filter -----------------------------------------------------------------------


def test_state_filter_lists_only_that_state_each_once(
    gateway_alone: Proc, store: redis.Redis
) -> None:
    """`state=active|frozen|cleared` lists the accounts in that state only, each once, in
    order, through pages of 2; without it every account is listed."""
    admin = Admin(gateway_alone.url)
    ids = [admin.create_account() for _ in range(12)]
    states = {
        account_id: ["active", "frozen", "cleared"][i % 3] for i, account_id in enumerate(ids)
    }
    for account_id, state in states.items():
        store.hset(account_keys(account_id).account, "state", state)
    for state in ["active", "frozen", "cleared"]:
        items = _walk(admin, 2, f"&state={state}")
        assert [i["id"] for i in items] == [a for a in ids if states[a] == state]
        assert {i["state"] for i in items} == {state}
    assert [i["id"] for i in _walk(admin, 5)] == ids


async def test_a_rare_state_pages_on_through_short_pages(
    ledger: Ledger, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page reads a bounded number of index members (LIST_EXAMINE_MAX): with a filter that
    few accounts match, a page may come back short, or empty, with a `next` to go on from; the
    walk still lists each match exactly once and ends on `next: None`."""
    monkeypatch.setattr(indexes_module, "LIST_EXAMINE_MAX", 7)
    ids = [f"acct-{i:03d}" for i in range(40)]
    for i, account_id in enumerate(ids):
        assert await ledger.create_account(account_id, "", 1_000 + i)
    frozen = [ids[3], ids[4], ids[25], ids[39]]
    for account_id in frozen:
        store.hset(account_keys(account_id).account, "state", "frozen")
    found: list[str] = []
    pages: list[int] = []
    after = None
    for _ in range(100):
        records, after = await ledger.list_accounts(2, after, "frozen")
        found += [r.id for r in records]
        pages.append(len(records))
        if after is None:
            break
    assert found == frozen
    assert 0 in pages  # a page may be empty and still not be the end
    monkeypatch.undo()
    records, after = await ledger.list_accounts(1000, None, None)
    assert [r.id for r in records] == ids
    assert after is None


# -- the index: crashes, races, accounts older than it --------------------------------------


async def test_accounts_from_before_the_index_are_backfilled(
    gateways: list[Proc], store: redis.Redis
) -> None:
    """Accounts an earlier version created (no index member, no backfill marker) are listed,
    in creation order among the new ones; the first listing backfills them and sets the
    marker, and a later listing does not scan again."""
    old = [f"old-{i}-{uuid.uuid4().hex[:6]}" for i in range(25)]
    base = now_ms() - 3_600_000
    for i, account_id in enumerate(old):
        old_version_account(store, account_id, base + i)
    store.delete(ACCOUNTS, ACCOUNTS_BACKFILLED)
    new = _new_ids(10)
    await _create_many(gateways, new)
    assert store.zcard(ACCOUNTS) == 10
    items = await asyncio.to_thread(_walk, Admin(gateways[1].url), 4)
    assert [i["id"] for i in items][:25] == old
    assert sorted(i["id"] for i in items[25:]) == sorted(new)
    assert store.exists(ACCOUNTS_BACKFILLED)
    assert store.zcard(ACCOUNTS) == 35
    # With the marker set no scan runs: an unindexed account stays out...
    old_version_account(store, "late-old", base + 100)
    assert "late-old" not in [i["id"] for i in _walk(Admin(gateways[0].url), 1000)]
    # ...until the marker is deleted (after a rolling upgrade) and the next listing scans.
    store.delete(ACCOUNTS_BACKFILLED)
    assert "late-old" in [i["id"] for i in _walk(Admin(gateways[0].url), 1000)]


def test_a_crash_before_the_script_leaves_nothing_listed(
    gateway_alone: Proc, store: redis.Redis
) -> None:
    """The index member goes in before create_account.lua: a gateway that dies in between
    leaves a member with no account, which the listing skips (pages of one still hold one
    account each); the id can still be created, and is then listed once."""
    admin = Admin(gateway_alone.url)
    first = admin.create_account()
    ghost = "ghost-" + uuid.uuid4().hex[:8]
    store.zadd(ACCOUNTS, {account_index_member(ghost, now_ms()): 0})
    last = admin.create_account()
    pages = []
    after = ""
    while True:
        page = admin.ok("GET", f"/admin/accounts?limit=1{after}")
        pages.append([i["id"] for i in page["data"]])
        if page["next"] is None:
            break
        after = f"&after={page['next']}"
    assert [ids for ids in pages if ids] == [[first], [last]]
    _error(admin.call("GET", f"/admin/accounts/{ghost}"), 404, "account_not_found")
    admin.create_account(ghost)
    assert [i["id"] for i in _walk(admin, 1)].count(ghost) == 1


async def test_concurrent_creations_of_one_id_leave_one_listed_account(
    gateways: list[Proc], store: redis.Redis
) -> None:
    """Ten concurrent creations of one id over two instances: one 201, nine 409, and the
    index keeps the winner's member only (each loser drops its own); a later duplicate POST
    adds none either."""
    account_id = "dup-" + uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(
            *(_create(session, gateways[i % 2], account_id) for i in range(10))
        )
    assert sorted(statuses) == [201] + [409] * 9
    _error(
        Admin(gateways[0].url).call("POST", "/admin/accounts", {"id": account_id}),
        409,
        "account_exists",
    )
    members = [m.decode() for m in store.zrangebylex(ACCOUNTS, "-", "+")]
    assert [m for m in members if m.endswith(":" + account_id)] == [
        account_index_member(
            account_id, int(store.hget(account_keys(account_id).account, "created_at") or 0)
        )
    ]
    assert [i["id"] for i in _walk(Admin(gateways[1].url), 3)] == [account_id]


async def test_a_duplicate_post_indexes_an_account_older_than_the_index(
    gateway_alone: Proc, store: redis.Redis
) -> None:
    """POST of an id an earlier version created (409) puts that account's own member in the
    index, and not the refused creation's."""
    Admin(gateway_alone.url).ok("GET", "/admin/accounts")  # the backfill has run: marker set
    account_id = "older-" + uuid.uuid4().hex[:8]
    old_version_account(store, account_id, 12_345)
    reply = Admin(gateway_alone.url).call("POST", "/admin/accounts", {"id": account_id})
    _error(reply, 409, "account_exists")
    members = [m.decode() for m in store.zrangebylex(ACCOUNTS, "-", "+")]
    assert members == [account_index_member(account_id, 12_345)]
