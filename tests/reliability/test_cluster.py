"""Scale-out: two gateway instances on a 3-primary Valkey cluster keep every invariant, also
through the crash (SIGKILL) and restart of a primary under load."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from gateway.ledger.keys import ACCOUNTS_BACKFILLED, account_keys
from gateway.timefmt import now_ms
from tests.admin.test_account_list import old_version_account
from tests.admin_client import ADMIN_TOKEN, Admin
from tests.billing.checks import assert_invariant, micros, wait_no_holds
from tests.cluster import ValkeyCluster
from tests.conftest import model_entry
from tests.lifecycle.receivers import WebhookReceiver
from tests.procs import Proc

OPS_SECRET = "cluster-ops-secret"
MAX_TOKENS = 50
FAILURES: list[bytes] = []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    started = ValkeyCluster(tmp_path_factory.mktemp("cluster"))
    started.start()
    yield started
    started.stop()


@pytest.fixture
def cluster_client(cluster: ValkeyCluster) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


def _model(url: str) -> dict[str, Any]:
    entry = model_entry("m", url, upstream_model="mock-model")
    entry["pricing"] = {"input_per_million": "1", "output_per_million": "2"}
    return entry


async def _post(session: aiohttp.ClientSession, gw: Proc, body: dict[str, Any]) -> int:
    async with session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp:
        answer = await resp.read()
        if resp.status == 503:
            FAILURES.append(answer)
        return resp.status


MESSAGES = [{"role": "user", "content": "scale out"}]
BODY = {"model": "m", "messages": MESSAGES, "max_tokens": MAX_TOKENS}


async def _probe_hold(admin: Admin, gw: Proc) -> tuple[str, int]:
    """A funded probe account, and what one call of BODY holds (and costs: it runs to its
    limit), from the upstream's own count of the prompt."""
    probe_id, probe_key = admin.funded(["m"], amount="1.00")
    headers = {"Authorization": f"Bearer {probe_key}"}
    async with (
        aiohttp.ClientSession(headers=headers) as s,
        s.post(gw.url + "/v1/chat/completions", data=orjson.dumps(BODY)) as r,
    ):
        prompt = orjson.loads(await r.read())["usage"]["prompt_tokens"]
    return probe_id, prompt + 2 * MAX_TOKENS


async def test_concurrency_invariant_across_instances(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    cluster: ValkeyCluster,
    cluster_client: redis.RedisCluster,
) -> None:
    """100 concurrent calls over two instances on the cluster, from an account whose balance
    covers exactly 25 holds: 25 are admitted, 75 get 402, and the ledger adds up exactly."""
    gateways = [make_gateway([_model(mock_a.url)], store={"url": cluster.url}) for _ in range(2)]
    admin = Admin(gateways[0].url)
    probe_id, hold = await _probe_hold(admin, gateways[1])
    balance = 25 * hold + hold // 3
    account_id = admin.create_account()
    admin.topup(account_id, f"{balance // 1_000_000}.{balance % 1_000_000:06d}")
    admin.subscribe(account_id, "m")
    key = admin.new_key(account_id)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}", "x-mock-ttft": "0.05"},
        connector=aiohttp.TCPConnector(limit=100),
    ) as session:
        statuses = await asyncio.gather(
            *(_post(session, gateways[i % 2], BODY) for i in range(100))
        )
    assert statuses.count(200) == 25, (sorted(set(statuses)), FAILURES[:3])
    assert statuses.count(402) == 75
    other = Admin(gateways[1].url)
    account, records = assert_invariant(other, cluster_client, account_id, balance)
    assert len(records) == 25
    assert micros(account["balance"]) == balance - 25 * hold
    assert_invariant(admin, cluster_client, probe_id, micros("1.00"))


async def test_lifecycle_and_events_once_across_instances(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    cluster: ValkeyCluster,
    cluster_client: redis.RedisCluster,
) -> None:
    """Accounts on different cluster slots go frozen -> retention -> cleared under two
    sweeping instances; the operator webhook gets each lifecycle event exactly once."""
    model = _model(mock_a.url)
    model["pricing"] = {"input_per_million": "1000", "output_per_million": "2000"}
    model["hold_output_tokens"] = 1
    async with WebhookReceiver(OPS_SECRET) as ops:
        sections: dict[str, Any] = {
            "store": {"url": cluster.url},
            "billing": {"grace_period": "1s", "retention_period": "1s", "sweep_interval": "50ms"},
            "notifications": {"webhooks": [{"url": ops.url, "secret_env": "CLUSTER_OPS_SECRET"}]},
        }
        env = {"CLUSTER_OPS_SECRET": OPS_SECRET}
        gateways = [make_gateway([model], env=env, **sections) for _ in range(2)]
        admin = Admin(gateways[0].url)
        accounts = [await asyncio.to_thread(admin.funded, ["m"], "0.020000") for _ in range(4)]
        async with aiohttp.ClientSession() as session:
            for i, (_, key) in enumerate(accounts):
                body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
                async with session.post(
                    gateways[i % 2].url + "/v1/chat/completions",
                    data=orjson.dumps(body),
                    headers={"Authorization": f"Bearer {key}"},
                ) as resp:
                    assert resp.status == 200
                    await resp.read()
        ids = {account_id for account_id, _ in accounts}
        for account_id in ids:
            await asyncio.to_thread(wait_no_holds, cluster_client, account_id)
        deadline = asyncio.get_running_loop().time() + 20
        while sum(1 for e in ops.events() if e["account"] in ids) < 4 * 4:
            assert asyncio.get_running_loop().time() < deadline, Counter(
                e["type"] for e in ops.events()
            )
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a duplicate would show up now
    counts = Counter((e["account"], e["type"]) for e in ops.events() if e["account"] in ids)
    for account_id in ids:
        assert counts[(account_id, "topup.succeeded")] == 1
        assert counts[(account_id, "account.frozen")] == 1
        assert counts[(account_id, "account.retention_started")] == 1
        assert counts[(account_id, "account.cleared")] == 1
    assert ops.bad_signatures() == []
    slots = {cluster_client.keyslot(f"gw:{{a:{a}}}:account") for a in ids}
    assert len(slots) == len(ids)


async def _create_accounts(gateways: list[Proc], ids: list[str]) -> None:
    """Create `ids` all at once, spread over the instances."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def create(session: aiohttp.ClientSession, gw: Proc, account_id: str) -> int:
        body = orjson.dumps({"id": account_id})
        async with session.post(gw.url + "/admin/accounts", data=body, headers=headers) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(
            *(create(session, gateways[i % len(gateways)], a) for i, a in enumerate(ids))
        )
    assert statuses == [201] * len(ids)


async def test_account_listing_across_primaries(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    cluster: ValkeyCluster,
    cluster_client: redis.RedisCluster,
) -> None:
    """GET /admin/accounts on the cluster: accounts an earlier version left out of the index,
    on every primary, are backfilled (the scan covers each primary), and a walk with limit 4
    through one instance, while both instances create more accounts between its pages, lists
    each account that existed when it began exactly once, nothing twice, in creation order."""
    gateways = [make_gateway([_model(mock_a.url)], store={"url": cluster.url}) for _ in range(2)]
    cluster_client.delete(ACCOUNTS_BACKFILLED)
    old: list[str] = []
    while any(
        sum(cluster.node_of(account_keys(a).account) == n for a in old) < 3 for n in range(3)
    ):
        old.append("old-" + uuid.uuid4().hex[:10])
    base = now_ms() - 86_400_000
    for i, account_id in enumerate(old):  # as create_account.lua wrote them before the index
        old_version_account(cluster_client, account_id, base + i)
    new = ["new-" + uuid.uuid4().hex[:10] for _ in range(30)]
    await _create_accounts(gateways, new)
    admin = Admin(gateways[1].url)
    items: list[dict[str, Any]] = []
    meanwhile: list[str] = []
    after = ""
    for _ in range(1000):
        page = await asyncio.to_thread(admin.ok, "GET", f"/admin/accounts?limit=4{after}")
        assert len(page["data"]) <= 4
        items.extend(page["data"])
        more = ["more-" + uuid.uuid4().hex[:10] for _ in range(2)]
        await _create_accounts(gateways, more)
        meanwhile += more
        if page["next"] is None:
            break
        after = f"&after={page['next']}"
    else:
        pytest.fail("the walk did not end")
    seen = Counter(item["id"] for item in items)
    assert max(seen.values()) == 1
    assert all(seen[a] == 1 for a in old + new)
    assert [i["id"] for i in items if i["id"] in old] == old
    assert items == sorted(items, key=lambda i: (i["created_at"], i["id"].encode()))
    assert cluster_client.exists(ACCOUNTS_BACKFILLED)
    for item in items[:3]:
        assert item == admin.account(item["id"])


async def test_key_budget_across_instances(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    cluster: ValkeyCluster,
    cluster_client: redis.RedisCluster,
) -> None:
    """On the cluster, 100 concurrent calls over two instances on a key whose budget covers
    10 holds: 10 are admitted, 90 get 402 `key_budget_exceeded`, the key's spend is its
    records' costs; a rotation there keeps the old secret for its grace on both instances."""
    gateways = [make_gateway([_model(mock_a.url)], store={"url": cluster.url}) for _ in range(2)]
    admin = Admin(gateways[0].url)
    _, hold = await _probe_hold(admin, gateways[1])
    budget = 10 * hold + hold // 3
    account_id, _ = admin.funded(["m"], amount="10.00")
    amount = f"{budget // 1_000_000}.{budget % 1_000_000:06d}"
    key = admin.new_key(account_id, budget={"amount": amount, "period": "month"})
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}", "x-mock-ttft": "0.3"},
        connector=aiohttp.TCPConnector(limit=100),
    ) as session:
        statuses = await asyncio.gather(
            *(_post(session, gateways[i % 2], BODY) for i in range(100))
        )
    assert statuses.count(200) == 10, (sorted(set(statuses)), FAILURES[:3])
    assert statuses.count(402) == 90
    other = Admin(gateways[1].url)
    _, records = assert_invariant(other, cluster_client, account_id, micros("10.00"))
    assert len(records) == 10
    view = other.key(account_id, key)
    assert micros(view["spend"]["spent"]) == sum(micros(r["cost"]) for r in records) == 10 * hold
    assert view["spend"]["held"] == "0.000000"
    key_id = key.split(".")[1]
    rotated = admin.ok("POST", f"/admin/accounts/{account_id}/keys/{key_id}/rotate")
    admin.ok("PATCH", f"/admin/accounts/{account_id}/keys/{key_id}", {"budget": None})
    async with aiohttp.ClientSession() as session:
        for secret in (key, rotated["key"]):
            for gw in gateways:
                async with session.post(
                    gw.url + "/v1/chat/completions",
                    data=orjson.dumps(BODY),
                    headers={"Authorization": f"Bearer {secret}"},
                ) as resp:
                    assert resp.status == 200, await resp.read()


def test_cluster_keys_share_one_slot_per_account(tmp_path: Path) -> None:
    """Every key the ledger builds for an account hashes to that account's one slot."""
    from redis.crc import key_slot

    from gateway.ledger.keys import account_keys

    k = account_keys("acme-42")
    names = [
        k.account,
        k.api_keys,
        k.api_key_meta,
        k.subscriptions,
        k.holds,
        k.hold_leases,
        k.hold_info,
        k.checkpoints,
        k.usage,
        k.topups,
        k.outbox,
        k.deliveries,
        k.dead_letters,
        k.outbox_lock,
        k.notifications,
        k.settled("req_1"),
        k.idempotency("idem-1"),
        k.key_limits,
        k.key_spend,
        k.key_rate("key_1", "requests"),
        k.key_rate("key_1", "tokens"),
    ]
    assert len({key_slot(name.encode()) for name in names}) == 1


# The primary-loss test's load: bounded in time and in calls.
LOAD_SECONDS = 12.0
KILL_AT = 3.0
DOWN_FOR = 3.0  # shorter than cluster-node-timeout: the other primaries keep serving
CLIENTS = 48
MAX_CALLS = 3500
ACCOUNTS_PER_NODE = 6


@dataclass(frozen=True, slots=True)
class _Answer:
    account: str
    status: int
    code: str | None
    request_id: str
    at: float  # monotonic, when the answer came


async def _load(
    i: int,
    session: aiohttp.ClientSession,
    gateways: list[Proc],
    accounts: list[tuple[str, str]],
    until: float,
    answers: list[_Answer],
) -> None:
    """One client: calls back to back, on its gateway, across every account, until `until`."""
    n = i
    while time.monotonic() < until and len(answers) < MAX_CALLS:
        account_id, key = accounts[n % len(accounts)]
        n += CLIENTS
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": f"load {n}"}],
            "max_tokens": 8,
            "stream": n % 4 == 0,
        }
        async with session.post(
            gateways[i % 2].url + "/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            raw = await resp.read()
            code = None if resp.status == 200 else orjson.loads(raw)["error"]["code"]
            rid = resp.headers["x-request-id"]
            answers.append(_Answer(account_id, resp.status, code, rid, time.monotonic()))


async def _readyz(gw: Proc) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/readyz") as resp:
        return resp.status, await resp.read()


async def test_primary_killed_under_load_answers_no_500(
    tmp_path: Path, make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A primary of a 3-primary cluster SIGKILLed under load from two gateways and restarted
    (with its nodes.conf and append-only file): no call gets 500; the calls that fail get 503
    ledger_unavailable; /readyz answers 503 naming the dead node while it is down; every call
    answered 200 has exactly one usage record and no other call has one; and once the holds
    are gone every account's balance is its top-ups minus its records' costs."""
    cluster = ValkeyCluster(tmp_path / "cluster")
    cluster.start()
    store = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        sections: dict[str, Any] = {
            "store": {"url": cluster.url},
            "billing": {"hold_lease": "3s", "sweep_interval": "200ms"},
        }
        gateways = [make_gateway([_model(mock_a.url)], **sections) for _ in range(2)]
        admin = Admin(gateways[0].url)
        victim = 0  # the node the gateways' URL names: the client must find the others
        by_node: dict[int, list[tuple[str, str]]] = {n: [] for n in range(cluster.size)}
        for _ in range(20 * ACCOUNTS_PER_NODE):
            if min(len(found) for found in by_node.values()) >= ACCOUNTS_PER_NODE:
                break
            account_id, key = await asyncio.to_thread(admin.funded, ["m"], "10.00")
            by_node[cluster.node_of(account_keys(account_id).account)].append((account_id, key))
        assert min(len(found) for found in by_node.values()) >= ACCOUNTS_PER_NODE
        accounts = [pair for found in by_node.values() for pair in found]

        answers: list[_Answer] = []
        readiness: list[tuple[str, int, bytes]] = []
        started = time.monotonic()
        restarted: list[float] = []

        async def outage() -> None:
            await asyncio.sleep(KILL_AT)
            await asyncio.to_thread(cluster.kill, victim)
            killed = time.monotonic()
            while time.monotonic() - killed < DOWN_FOR:
                readiness.append(("down", *await _readyz(gateways[1])))
                await asyncio.sleep(0.25)
            await asyncio.to_thread(cluster.restart, victim)
            restarted.append(time.monotonic())
            for _ in range(40):
                status, body = await _readyz(gateways[1])
                readiness.append(("back", status, body))
                if status == 200:
                    break
                await asyncio.sleep(0.25)

        timeout = aiohttp.ClientTimeout(total=20)
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(
                outage(),
                *(
                    _load(i, session, gateways, accounts, started + LOAD_SECONDS, answers)
                    for i in range(CLIENTS)
                ),
            )
        counts = Counter((a.status, a.code) for a in answers)
        print(f"calls={len(answers)} answers={dict(counts)}")  # the measurement, shown with -s

        assert not [a for a in answers if a.status == 500], counts
        assert {code for status, code in counts if status != 200} <= {"ledger_unavailable"}
        assert {status for status, _ in counts} <= {200, 503}, counts
        assert counts[(503, "ledger_unavailable")] > 0, "the outage was not seen"
        down = [(status, body) for phase, status, body in readiness if phase == "down"]
        assert down
        assert all(status == 503 for status, _ in down), readiness
        assert all(f"127.0.0.1:{cluster.ports[victim]}".encode() in body for _, body in down)
        assert readiness[-1][1] == 200, readiness[-1]
        # Once the node is back, every node's accounts are served again.
        node = {account_id: n for n, found in by_node.items() for account_id, _ in found}
        late = [a for a in answers if a.at > restarted[0] + 2 and a.status == 200]
        assert {node[a.account] for a in late} == set(range(cluster.size))

        answered = Counter(a.request_id for a in answers if a.status == 200)
        refused = {a.request_id for a in answers if a.status != 200}
        recorded: Counter[str] = Counter()
        kinds: dict[str, str] = {}
        for account_id, _ in accounts:
            # Settlements the outage delayed land late; a hold whose admission reply was lost
            # (the call answered 503) is left to its lease and the sweeper.
            await asyncio.to_thread(wait_no_holds, store, account_id, 30.0)
            _, records = await asyncio.to_thread(
                assert_invariant, admin, store, account_id, micros("10.00")
            )
            recorded.update(r["request_id"] for r in records)
            kinds.update((r["request_id"], r["status"]) for r in records)
        billed_refused = {rid: kinds[rid] for rid in refused & set(recorded)}
        assert not billed_refused, f"calls answered 503 have usage records: {billed_refused}"
        assert set(recorded) == set(answered)
        assert all(n == 1 for n in recorded.values())
    finally:
        store.close()
        cluster.stop()
