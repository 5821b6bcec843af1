"""Scale-out: two gateway instances on a 3-primary Valkey cluster keep every invariant."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from tests.admin_client import Admin
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
    messages = [{"role": "user", "content": "scale out"}]
    probe_id, probe_key = admin.funded(["m"], amount="1.00")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {probe_key}"}) as s:
        body = {"model": "m", "messages": messages, "max_tokens": MAX_TOKENS}
        async with s.post(gateways[1].url + "/v1/chat/completions", data=orjson.dumps(body)) as r:
            prompt = orjson.loads(await r.read())["usage"]["prompt_tokens"]
    hold = prompt + 2 * MAX_TOKENS
    balance = 25 * hold + hold // 3
    account_id = admin.create_account()
    admin.topup(account_id, f"{balance // 1_000_000}.{balance % 1_000_000:06d}")
    admin.subscribe(account_id, "m")
    key = admin.new_key(account_id)
    body = {"model": "m", "messages": messages, "max_tokens": MAX_TOKENS}
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}", "x-mock-ttft": "0.05"},
        connector=aiohttp.TCPConnector(limit=100),
    ) as session:
        statuses = await asyncio.gather(
            *(_post(session, gateways[i % 2], body) for i in range(100))
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
    ]
    assert len({key_slot(name.encode()) for name in names}) == 1
