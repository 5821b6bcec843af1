"""A chat image is held for: the call's hold counts it as the prompt counter does (SPEC
section 3), with the estimate the operator configured, through a running gateway."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import orjson

from tests.admin_client import Admin
from tests.conftest import model_entry
from tests.procs import Proc

# An image of unknown size (an http URL): held at billing.image_tokens.
BODY = {
    "model": "m",
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in it?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        }
    ],
    "max_tokens": 5,
}


async def _status(gw: Proc, key: str) -> tuple[int, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps(BODY),
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        return resp.status, (await resp.json()).get("error") or {}


async def test_the_configured_image_estimate_sizes_the_hold(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """At 1 per token, an image held at 2,000,000 tokens needs a hold of 2 units: an
    account with 1 is refused 402 `insufficient_balance`; held at the default estimate the same
    call is admitted. (The mock bills what it saw: the text alone.)"""
    entry = model_entry("m", mock_a.url, upstream_model="mock-model")
    entry["pricing"] = {"input_per_million": "1", "output_per_million": "1"}
    dear = make_gateway(
        [entry],
        billing={"image_tokens": 2_000_000, "max_tokens_per_call": 10**7},
        rate_limits={"requests": "600/minute", "tokens": "100000000/minute"},
    )
    _, key = Admin(dear.url).funded(["m"], amount="1.00")
    status, error = await _status(dear, key)
    assert status == 402
    assert error["code"] == "insufficient_balance"
    assert "2.0" in error["message"]  # the hold it could not cover: about 2.000020
    default = make_gateway([entry])
    _, key = Admin(default.url).funded(["m"], amount="1.00")
    assert (await _status(default, key))[0] == 200
