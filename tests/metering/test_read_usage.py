"""The token classes of an upstream's `usage`, in each spelling upstreams send them."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.metering.usage import read_usage
from gateway.pricing import TokenUsage

BASE: dict[str, Any] = {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, TokenUsage(100, 40)),
        # OpenAI's API
        ({"prompt_tokens_details": {"cached_tokens": 64}}, TokenUsage(100, 40, 64)),
        (
            {"completion_tokens_details": {"reasoning_tokens": 30, "audio_tokens": 0}},
            TokenUsage(100, 40, reasoning_tokens=30),
        ),
        # OpenAI's Python SDK (3.x) names a cache write `cache_write_tokens`
        (
            {"prompt_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 20}},
            TokenUsage(100, 40, 10, 20),
        ),
        ({"prompt_tokens_details": {"cache_creation_tokens": 20}}, TokenUsage(100, 40, 0, 20)),
        # LiteLLM's proxy passing Anthropic's fields on
        (
            {"cache_read_input_tokens": 50, "cache_creation_input_tokens": 25},
            TokenUsage(100, 40, 50, 25),
        ),
        # vLLM with prefix caching: details may be null
        ({"prompt_tokens_details": None}, TokenUsage(100, 40)),
        # a bad class count is no class, not a reason to drop the usage
        ({"prompt_tokens_details": {"cached_tokens": -1}}, TokenUsage(100, 40)),
        ({"prompt_tokens_details": {"cached_tokens": 5.0}}, TokenUsage(100, 40)),
        ({"completion_tokens_details": {"reasoning_tokens": True}}, TokenUsage(100, 40)),
    ],
    ids=[
        "plain",
        "openai-cached",
        "openai-reasoning",
        "sdk-cache-write",
        "cache-creation-detail",
        "litellm-anthropic",
        "null-details",
        "negative",
        "float",
        "bool",
    ],
)
def test_classes_are_read_in_every_spelling(extra: dict[str, Any], expected: TokenUsage) -> None:
    assert read_usage({**BASE, **extra}) == expected


def test_details_take_precedence_over_litellm_fields() -> None:
    """Both spellings of cached tokens in one usage: OpenAI's detail wins (LiteLLM sends the
    same number twice, as both)."""
    usage = {**BASE, "prompt_tokens_details": {"cached_tokens": 7}, "cache_read_input_tokens": 9}
    assert read_usage(usage) == TokenUsage(100, 40, 7)
