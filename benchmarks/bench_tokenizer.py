"""Tokenizer throughput: tokens per second of the gateway's offline encodings.

Counting is on the hot path of every call, so its speed bounds the gateway's; this prints it
for both encodings, on English prose, code and mixed-script text, for small and large inputs.
Run: python benchmarks/bench_tokenizer.py
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import tiktoken

from gateway.metering.prompt import count_prompt_sync
from gateway.metering.tokenizers import get_encoding

SAMPLES = {
    "prose": "The quick brown fox jumps over the lazy dog while the sea keeps its own counsel. ",
    "code": "def f(x: int) -> int:\n    return sum(i * i for i in range(x)) // 3\n\n",
    "mixed": "Grüße aus München! 日本語のテキスト、中文和한국어 😀 naïve café — ¿qué tal? ",
}


def _text(kind: str, size: int, rng: random.Random) -> str:
    base = SAMPLES[kind]
    words = base.split(" ")
    out: list[str] = []
    total = 0
    while total < size:
        word = rng.choice(words)
        out.append(word)
        total += len(word) + 1
    return " ".join(out)[:size]


def _measure(encoding: tiktoken.Encoding, text: str, min_seconds: float) -> tuple[float, int]:
    tokens = len(encoding.encode_ordinary(text))
    runs = 0
    started = time.perf_counter()
    while True:
        encoding.encode_ordinary(text)
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return tokens * runs / elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=0.5, help="time per cell")
    args = parser.parse_args()
    rng = random.Random(1)
    print(f"python {platform.python_version()}, tiktoken {tiktoken.__version__}")
    print()
    print("| encoding | text | chars | tokens | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in ("o200k_base", "cl100k_base"):
        encoding = get_encoding(name)
        for kind in SAMPLES:
            for size in (1_000, 100_000):
                rate, tokens = _measure(encoding, _text(kind, size, rng), args.seconds)
                print(f"| {name} | {kind} | {size:,} | {tokens:,} | {rate:,.0f} |")
    encoding = get_encoding("o200k_base")
    payload = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": _text("prose", 1_000, rng)},
        ]
    }
    runs = 0
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        count_prompt_sync("chat", payload, encoding)
        runs += 1
    per_call = (time.perf_counter() - started) / runs * 1e6
    print()
    print(f"chat prompt count (1 KB user message, o200k_base): {per_call:.1f} µs per call")


if __name__ == "__main__":
    main()
