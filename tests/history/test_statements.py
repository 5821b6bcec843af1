"""Monthly statements and usage summaries, after a month of synthetic history.

November 2026 is written into an account's streams as the ledger's scripts write them (its
top-ups, 600 usage records of two models, notification charges, each moving the account's
totals as the scripts do), then December adds real calls and a real top-up through the
gateway. The oracle is the synthetic data itself, summed here: November's statement lists
exactly its top-ups and its usage by model, its closing balance is December's opening one, and
what the history adds up to reconciles with the ledger's balance to the micro-unit."""

from __future__ import annotations

import csv
import datetime as dt
import io
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import redis

from gateway.ledger.keys import account_keys
from gateway.money import format_micros
from gateway.usage_record import UsageRecord
from tests.admin_client import Admin
from tests.billing.checks import micros, wait_no_holds
from tests.history.test_export import _calls, _wait_rows
from tests.procs import Proc

pytestmark = pytest.mark.timeout(120)

NOV = int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp() * 1000)
DAY = 86_400_000
MODELS = ("m", "other-model")


def _synthetic_november(client: redis.Redis, account_id: str) -> dict[str, Any]:
    """Write the month into the account's streams and totals; what it adds up to."""
    keys = account_keys(account_id)
    rng = random.Random(11)
    topups = [
        (NOV + d * DAY + 3_600_000, micros(a))
        for d, a in ((0, "50.00"), (9, "20.00"), (19, "5.25"), (28, "1.000001"))
    ]
    for n, (at, amount) in enumerate(topups):
        client.xadd(keys.topups, {"id": f"nov-{n}", "amount": amount, "time": at}, id=f"{at}-0")
    by_model: dict[str, list[int]] = defaultdict(
        lambda: [0, 0, 0, 0]
    )  # calls, prompt, completion, cost
    notifications = [0, 0]
    spent = 0
    for n in range(600):
        at = NOV + (n // 20) * DAY + (n % 20) * 60_000 + 7
        if n % 50 == 49:
            record = UsageRecord(
                request_id=f"note-{n}",
                time=at,
                kind="notification",
                cost=25,
                channel="webhook",
                event="account.frozen",
            )
            notifications[0] += 1
            notifications[1] += 25
        else:
            model = MODELS[n % 2]
            prompt, completion = rng.randint(10, 900), rng.randint(1, 300)
            cost = rng.randint(1, 5000)
            record = UsageRecord(
                request_id=f"nov-{n}",
                time=at,
                kind="inference",
                cost=cost,
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                usage_source="upstream",
            )
            line = by_model[model]
            line[0] += 1
            line[1] += prompt
            line[2] += completion
            line[3] += cost
        spent += record.cost
        client.xadd(keys.usage, record.fields(), id=f"{at}-0")  # type: ignore[arg-type]
    topped_up = sum(amount for _, amount in topups)
    client.hincrby(keys.account, "balance", topped_up - spent)
    client.hincrby(keys.account, "topped_up", topped_up)
    client.hincrby(keys.account, "spent", spent)
    return {
        "topups": topups,
        "by_model": dict(by_model),
        "notifications": notifications,
        "closing": topped_up - spent,
    }


async def test_a_statement_reconciles_after_a_month_of_synthetic_history(
    history_gateway: Callable[..., Proc], db: asyncpg.Connection, redis_client: redis.Redis
) -> None:
    gw = history_gateway()
    admin = Admin(gw.url)
    account_id = admin.create_account()
    admin.subscribe(account_id, "m")
    key = admin.new_key(account_id)
    november = _synthetic_november(redis_client, account_id)
    admin.topup(account_id, "3.00", key="december")
    answered = await _calls(gw, key, 8)
    assert len(answered) == 8
    wait_no_holds(redis_client, account_id)
    await _wait_rows(db, account_id, 608)
    balance = micros(admin.account(account_id)["balance"])

    nov = admin.ok("GET", f"/admin/accounts/{account_id}/statements/2026-11")
    assert nov["opening_balance"] == "0.000000"
    assert [micros(t["amount"]) for t in nov["topups"]] == [a for _, a in november["topups"]]
    assert micros(nov["topups_total"]) == sum(a for _, a in november["topups"])
    lines = {line["model"]: line for line in nov["usage"]}
    assert set(lines) == set(MODELS)
    for model, (calls, prompt, completion, cost) in november["by_model"].items():
        line = lines[model]
        assert (line["calls"], line["prompt_tokens"], line["completion_tokens"]) == (
            calls,
            prompt,
            completion,
        )
        assert micros(line["cost"]) == cost
    assert nov["notifications"] == {
        "count": november["notifications"][0],
        "cost": format_micros(november["notifications"][1]),
    }
    assert micros(nov["closing_balance"]) == november["closing"]

    dec = admin.ok("GET", f"/admin/accounts/{account_id}/statements/2026-12")
    assert dec["opening_balance"] == nov["closing_balance"]
    assert micros(dec["topups_total"]) == micros("3.00")
    assert [line["calls"] for line in dec["usage"]] == [8]
    assert micros(dec["closing_balance"]) == balance
    for month in (nov, dec):
        assert month["reconciliation"] == {
            "history_balance_now": format_micros(balance),
            "ledger_balance_now": format_micros(balance),
            "reconciles": True,
        }
    october = admin.ok("GET", f"/admin/accounts/{account_id}/statements/2026-10")
    assert october["opening_balance"] == october["closing_balance"] == "0.000000"

    reply = admin.call(
        "GET", f"/admin/accounts/{account_id}/statements/2026-11", headers={"Accept": "text/csv"}
    )
    rows = list(csv.DictReader(io.StringIO(reply.body.decode())))
    assert rows[0] == {
        **dict.fromkeys(rows[0], ""),
        "line": "opening_balance",
        "amount": "0.000000",
    }
    assert rows[-1]["line"] == "closing_balance"
    assert micros(rows[-1]["amount"]) == november["closing"]
    assert sum(micros(r["amount"]) for r in rows if r["line"] == "topup") == micros(
        nov["topups_total"]
    )
    assert admin.call("GET", f"/admin/accounts/{account_id}/statements/2026-13").status == 400


async def test_the_summary_sums_tokens_and_cost_by_day_model_and_key(
    history_gateway: Callable[..., Proc], db: asyncpg.Connection, redis_client: redis.Redis
) -> None:
    gw = history_gateway()
    admin = Admin(gw.url)
    account_id = admin.create_account()
    admin.subscribe(account_id, "m")
    key = admin.new_key(account_id)
    november = _synthetic_november(redis_client, account_id)
    await _calls(gw, key, 4)
    wait_no_holds(redis_client, account_id)
    await _wait_rows(db, account_id, 604)
    month = "since=2026-11-01T00:00:00Z&until=2026-12-01T00:00:00Z"
    by_model = admin.ok("GET", f"/admin/accounts/{account_id}/usage/summary?group_by=model&{month}")
    lines = {line["model"]: line for line in by_model["data"]}
    for model, (calls, prompt, completion, cost) in november["by_model"].items():
        assert (lines[model]["calls"], lines[model]["prompt_tokens"]) == (calls, prompt)
        assert lines[model]["completion_tokens"] == completion
        assert micros(lines[model]["cost"]) == cost
    assert lines[""]["calls"] == november["notifications"][0]  # notification charges: no model
    by_day = admin.ok("GET", f"/admin/accounts/{account_id}/usage/summary?group_by=day&{month}")
    assert [line["day"] for line in by_day["data"]] == [f"2026-11-{d:02d}" for d in range(1, 31)]
    assert sum(line["calls"] for line in by_day["data"]) == 600
    assert by_day["total"] == by_model["total"]
    everything = admin.ok("GET", f"/admin/accounts/{account_id}/usage/summary?group_by=key")
    assert everything["total"]["calls"] == 604
    keys = {line["key"]: line["calls"] for line in everything["data"]}
    assert keys[""] == 600
    assert sum(keys.values()) == 604
    reply = admin.call("GET", f"/admin/accounts/{account_id}/usage/summary?group_by=week")
    assert reply.status == 400
