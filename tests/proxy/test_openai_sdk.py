"""The official OpenAI SDK works against the gateway unchanged, base_url aside."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from openai import AsyncOpenAI

from tests.procs import Proc


@pytest.fixture
async def client(gateway: Proc, api_key: str) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0)
    yield sdk
    await sdk.close()


async def test_chat_completion(client: AsyncOpenAI) -> None:
    """A non-streamed chat completion comes back typed, with usage."""
    answer = await client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 5
    assert answer.usage.prompt_tokens > 0


async def test_streamed_and_plain_texts_agree(client: AsyncOpenAI) -> None:
    """The streamed deltas concatenate to the non-streamed text of the same request."""
    messages = [{"role": "user", "content": "tell me a story"}]
    plain = await client.chat.completions.create(
        model="mock-model", messages=messages, max_tokens=9
    )  # type: ignore[arg-type]
    stream = await client.chat.completions.create(
        model="mock-model",
        messages=messages,
        max_tokens=9,
        stream=True,  # type: ignore[arg-type]
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == plain.choices[0].message.content


async def test_completions_and_embeddings(client: AsyncOpenAI) -> None:
    """Legacy completions and embeddings pass through with their usage."""
    completion = await client.completions.create(model="mock-model", prompt="Hello", max_tokens=4)
    assert completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4
    vectors = await client.embeddings.create(model="mock-model", input=["one", "two words"])
    assert len(vectors.data) == 2
    assert vectors.usage.prompt_tokens > 0


async def test_models_list_and_get(client: AsyncOpenAI) -> None:
    """/v1/models lists the configured models; /v1/models/{id} finds one and 404s others."""
    listed = [m.id async for m in client.models.list()]
    assert sorted(listed) == ["mapped", "mock-model"]
    model = await client.models.retrieve("mapped")
    assert model.id == "mapped"
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("gpt-nope")
    assert info.value.code == "model_not_found"


async def test_sdk_sees_gateway_errors_as_api_errors(client: AsyncOpenAI) -> None:
    """A gateway error reaches the SDK as an APIStatusError carrying the documented code."""
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.response.headers["x-request-id"].startswith("req_")
