"""The usage CSV (`Accept: text/csv`) writes each value as the JSON view does: `true` / `false`
for booleans (not Python's `True` / `False`), integers in digits, null as an empty cell."""

from __future__ import annotations

import csv
import io
from typing import Any

import aiohttp
import orjson

from gateway.admin.views import USAGE_FIELDS
from tests.admin_client import Admin
from tests.procs import Proc

CSV = {"Accept": "text/csv"}


async def _calls(gateway: Proc, key: str, streams: list[bool]) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        for i, stream in enumerate(streams):
            body = {
                "model": "mock-model",
                "messages": [{"role": "user", "content": f"csv call {i}"}],
                "max_tokens": 3,
                "stream": stream,
            }
            async with session.post(
                gateway.url + "/v1/chat/completions", data=orjson.dumps(body)
            ) as resp:
                assert resp.status == 200, await resp.read()
                await resp.read()


def _as_json_writes_it(value: Any) -> str:
    """A JSON value as a CSV cell: JSON's own spelling for literals, strings unquoted."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()  # true, false, 12


def _csv(admin: Admin, path: str) -> tuple[list[str], list[dict[str, str]], dict[str, str]]:
    reply = admin.call("GET", path, headers=CSV)
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/csv")
    reader = csv.DictReader(io.StringIO(reply.body.decode(), newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows, reply.headers


async def test_csv_cells_are_the_json_values_as_json_writes_them(
    admin: Admin, gateway: Proc
) -> None:
    """Every cell of every row equals the JSON view's value for that record and field: the
    `stream` column reads `true` / `false`, token counts are digits, absent values are empty."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    await _calls(gateway, key, [False, True, False, True])
    path = f"/admin/accounts/{account_id}/usage"
    records = admin.ok("GET", path)["data"]
    header, rows, _ = _csv(admin, path)
    assert header == list(USAGE_FIELDS)
    assert len(rows) == len(records) == 4
    for row, record in zip(rows, records, strict=True):
        assert set(row) == set(record)
        for field, value in record.items():
            assert row[field] == _as_json_writes_it(value), (field, row[field], value)
    assert [row["stream"] for row in rows] == ["false", "true", "false", "true"]
    assert all(row["prompt_tokens"].isdigit() for row in rows)
    assert all(row["channel"] == "" and row["event"] == "" for row in rows)


async def test_csv_pages_follow_x_next_cursor_and_match_the_json_pages(
    admin: Admin, gateway: Proc
) -> None:
    """CSV pages, followed through `X-Next-Cursor`, hold the JSON pages' records in the same
    order, each once; the last page, whose JSON `next` is null, has no `X-Next-Cursor`."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    await _calls(gateway, key, [True, False, True, False, True])
    path = f"/admin/accounts/{account_id}/usage?limit=2"
    json_rows: list[dict[str, Any]] = []
    csv_rows: list[dict[str, str]] = []
    after = ""
    for _ in range(5):
        page = admin.ok("GET", path + after)
        _, rows, headers = _csv(admin, path + after)
        json_rows.extend(page["data"])
        csv_rows.extend(rows)
        if page["next"] is None:
            assert "X-Next-Cursor" not in headers
            break
        assert headers["X-Next-Cursor"] == page["next"]
        after = f"&after={page['next']}"
    assert len(json_rows) == len(csv_rows) == 5
    for row, record in zip(csv_rows, json_rows, strict=True):
        assert row == {field: _as_json_writes_it(value) for field, value in record.items()}
