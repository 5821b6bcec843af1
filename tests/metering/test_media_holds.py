"""A chat prompt's images and audio are held for: images by OpenAI's published vision formula
when their size is known, else by the configured estimates.

The oracle is the table below: the worked examples of OpenAI's vision guide ("Images and vision",
"Calculating costs", gpt-4o-class models). The images are built here, byte by byte: PNG and GIF
whole and valid, JPEG and WebP with valid headers (their compressed data is filler: only the
header is read).
"""

from __future__ import annotations

import base64
import binascii
import functools
import struct
import zlib
from typing import Any

import pytest

from gateway.config import parse_settings
from gateway.config.schema import BillingConfig
from gateway.metering import images
from gateway.metering.images import data_url_size, image_tokens, tile_tokens
from gateway.metering.prompt import OFFLOAD_BYTES, MediaEstimates, count_prompt, count_prompt_sync
from gateway.metering.tokenizers import get_encoding

ENCODING = get_encoding("o200k_base")

# (width, height, detail, the tokens the guide gives)
PUBLISHED: list[tuple[int, int, str, int]] = [
    (1024, 1024, "high", 765),
    (2048, 4096, "high", 1105),
    (4096, 8192, "low", 85),
]


# --- images, built here -------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    """A whole PNG: 1-bit grayscale, every pixel black."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = (b"\x00" * (1 + (width + 7) // 8)) * height  # filter byte 0, then the row's bits
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def gif(width: int, height: int) -> bytes:
    """A whole GIF89a: a logical screen of this size holding one 1x1 black image."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0)  # a 2-color global table
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
    pixels = b"\x02\x02\x44\x01\x00"  # LZW, minimum code size 2: clear, 0, end
    return b"GIF89a" + screen + b"\x00\x00\x00\xff\xff\xff" + frame + pixels + b"\x3b"


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def jpeg(width: int, height: int, *, sof: int = 0xC0, exif: int = 0, fill: bool = False) -> bytes:
    """A baseline (or `sof`) JPEG's headers: JFIF, an EXIF of `exif` bytes, a quantization
    table, a Huffman table (DHT, whose marker sits among the SOFn ones) before the frame
    header, then the scan."""
    frame = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return b"".join(
        [
            b"\xff\xd8",
            _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            *([_segment(0xE1, b"Exif\x00\x00" + b"\x00" * exif)] if exif else []),
            _segment(0xDB, b"\x00" + bytes(range(1, 65))),
            _segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00"),
            b"\xff" if fill else b"",  # a fill byte before a marker
            _segment(sof, frame),
            _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"),
            b"\x00" * 16,
            b"\xff\xd9",
        ]
    )


def _riff(chunk: bytes, data: bytes) -> bytes:
    body = chunk + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def webp_lossy(width: int, height: int) -> bytes:
    """A VP8 key frame's header: frame tag, start code, 14-bit sizes (scale 0)."""
    tag = b"\x10\x02\x00"  # key frame, version 0, shown, first partition of 16 bytes
    return _riff(b"VP8 ", tag + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + bytes(16))


def webp_lossless(width: int, height: int) -> bytes:
    """A VP8L header: the signature, then width - 1 and height - 1 in 14 bits each."""
    bits = (width - 1) | (height - 1) << 14
    return _riff(b"VP8L", b"\x2f" + struct.pack("<I", bits) + bytes(8))


def webp_extended(width: int, height: int) -> bytes:
    """A VP8X header (the canvas, 24-bit width - 1 and height - 1), then a 1x1 VP8L image."""
    canvas = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little")
    canvas += (height - 1).to_bytes(3, "little")
    inner = _riff(b"VP8L", b"\x2f" + bytes(4) + bytes(8))[12:]
    body = b"VP8X" + struct.pack("<I", len(canvas)) + canvas + inner
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


BUILDERS = {
    "png": png,
    "gif": gif,
    "jpeg": jpeg,
    "jpeg-progressive": lambda w, h: jpeg(w, h, sof=0xC2),
    "jpeg-exif-fill": lambda w, h: jpeg(w, h, exif=60_000, fill=True),
    "webp-vp8": webp_lossy,
    "webp-vp8l": webp_lossless,
    "webp-vp8x": webp_extended,
}
MEDIA_TYPES = {"png": "image/png", "gif": "image/gif", "jpeg": "image/jpeg", "webp": "image/webp"}


@functools.cache
def data_url(kind: str, width: int, height: int) -> str:
    media_type = MEDIA_TYPES[kind.split("-")[0]]
    encoded = base64.b64encode(BUILDERS[kind](width, height)).decode()
    return f"data:{media_type};base64,{encoded}"


def _chat(*parts: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What?"}, *parts]}]}


def added(*parts: Any, media: MediaEstimates | None = None) -> int:
    """The tokens `parts` add to a one-message prompt."""
    base = count_prompt_sync("chat", _chat(), ENCODING, media=media)
    return count_prompt_sync("chat", _chat(*parts), ENCODING, media=media) - base


def image(url: Any, detail: str | None = None) -> dict[str, Any]:
    inner = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": inner}


AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}


# --- the published figures ------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "detail", "figure"), PUBLISHED)
def test_published_examples(width: int, height: int, detail: str, figure: int) -> None:
    """The formula gives each of the guide's examples its figure."""
    if detail == "high":
        assert tile_tokens(width, height) == figure
    assert image_tokens(data_url("png", width, height), detail, unknown=0) == figure


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize(("width", "height", "detail", "figure"), PUBLISHED)
def test_published_examples_as_data_urls(
    kind: str, width: int, height: int, detail: str, figure: int
) -> None:
    """An image of each format, sent as a base64 data: URL in a chat message, adds the guide's
    figure to the prompt count: its size read from its header."""
    assert data_url_size(data_url(kind, width, height)) == (width, height)
    assert added(image(data_url(kind, width, height), detail)) == figure


def test_auto_and_absent_detail_are_held_as_high() -> None:
    url = data_url("png", 1024, 1024)
    assert added(image(url, "auto")) == added(image(url)) == added(image(url, "high")) == 765
    assert added({"type": "image_url", "image_url": url}) == 765  # image_url as a plain URL


@pytest.mark.parametrize(
    ("width", "height", "tiles"),
    [
        (1, 1, 1),
        (512, 512, 1),  # a small image is not enlarged to 768
        (513, 512, 2),
        (768, 768, 4),
        (2048, 2048, 4),  # 2048 -> 768x768
        (1000, 3000, 8),  # 2048 -> 682.7x2048: 2 by 4, the formula's most
        (768, 2049, 8),
        (100, 10_000, 4),  # 2048 -> 20.5x2048: 1 by 4
        (2**32 - 1, 1, 4),  # a PNG's largest side
    ],
)
def test_tiles(width: int, height: int, tiles: int) -> None:
    """The scalings shrink only, keep the aspect ratio, and are exact (no pixel rounding)."""
    assert tile_tokens(width, height) == tile_tokens(height, width) == 170 * tiles + 85


# --- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize(("width", "height"), [(1, 1), (640, 480), (16383, 9)])
def test_each_format_gives_its_size(kind: str, width: int, height: int) -> None:
    assert data_url_size(data_url(kind, width, height)) == (width, height)


def test_padding_left_out_and_a_media_type_with_parameters() -> None:
    encoded = base64.b64encode(gif(300, 200)[:10]).decode()
    assert encoded.endswith("==")
    encoded = encoded.rstrip("=")
    assert data_url_size(f"DATA:image/gif;name=a.gif;BASE64,{encoded}") == (300, 200)
    assert data_url_size(f"data:;base64,{encoded}") == (300, 200)  # the format is the bytes'


def test_only_the_header_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 6 MB JPEG whose frame header follows a 60 KB EXIF segment and 2 MB of ICC profile
    chunks, and a 1 MB PNG, are sized from a few dozen decoded bytes each."""
    decoded: list[int] = []
    real = binascii.a2b_base64

    def counting(data: str | bytes, *, strict_mode: bool = False) -> bytes:
        decoded.append(len(data))
        return real(data, strict_mode=strict_mode)

    monkeypatch.setattr(images, "a2b_base64", counting)
    big = jpeg(4000, 3000, exif=60_000)
    icc = b"".join(_segment(0xE2, b"ICC_PROFILE\x00" + bytes(65_000)) for _ in range(32))
    big = big[:2] + icc + big[2:] + bytes(4_000_000)
    url = "data:image/jpeg;base64," + base64.b64encode(big).decode()
    assert data_url_size(url) == (4000, 3000)
    assert sum(decoded) < 64 * 40, decoded
    decoded.clear()
    noisy = png(8, 8)[:-12] + struct.pack(">I", 1_000_000) + b"tEXt" + bytes(1_000_004)
    assert data_url_size("data:image/png;base64," + base64.b64encode(noisy).decode()) == (8, 8)
    assert sum(decoded) <= 64, decoded


# --- estimates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.png",
        "http://example.com/cat.jpg",
        "data:image/bmp;base64," + base64.b64encode(b"BM" + bytes(60)).decode(),
        "data:image/svg+xml,<svg width='10' height='10'/>",  # not base64
        "data:image/png," + "iVBORw0KGgo" * 4,  # base64, but not said to be
        "data:image/png;x=" + "y" * 2000 + ";base64," + data_url("png", 9, 9)[22:],  # too far
        "ftp://example.com/a.png",
        "",
    ],
)
def test_unknown_size_is_the_estimate(url: str) -> None:
    """An image whose size is not in a readable header is held at billing.image_tokens, at
    high, auto or no detail; at low detail, 85 whatever it is."""
    assert added(image(url)) == added(image(url, "auto")) == added(image(url, "high")) == 1445
    assert added(image(url, "low")) == 85


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": 42},
        {"type": "image_url", "image_url": None},
        {"type": "image_url", "image_url": ["https://example.com/a.png"]},
        {"type": "image_url"},
        {"type": "image_url", "image_url": {}},
        {"type": "image_url", "image_url": {"detail": "high"}},
        {"type": "image_url", "image_url": {"url": 7}},
        image("data:image/png;base64,!!!!not base64!!!!"),
        image("data:image/png;base64,iVBORw0KGgo"),  # the PNG signature, cut short
        image("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAA"),  # cut inside IHDR
        image(data_url("png", 4, 4)[:30] + " " + data_url("png", 4, 4)[30:]),  # a space
        image("data:image/gif;base64," + base64.b64encode(gif(3, 2)[:10]).decode()[:13]),  # 4n+1
        image(data_url("png", 1, 1).replace(",iVBOR", ",AAAAiVBOR")),  # shifted: not a PNG
        image("data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\xda\x00\x02").decode()),
        image("data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\xe0\x00\x01").decode()),
        image("data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8" + b"\xff" * 600).decode()),
        image("data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\x00").decode()),
        image("data:image/jpeg;base64,"),  # no bytes
        image("data:image/gif;base64," + base64.b64encode(b"GIF89a\x00\x00\x05\x00").decode()),
        image("data:image/webp;base64," + base64.b64encode(b"RIFF\x00\x00\x00\x00WEBP").decode()),
        image("data:image/webp;base64," + base64.b64encode(webp_lossy(4, 4)[:25]).decode()),
    ],
)
def test_malformed_parts_are_the_estimate(part: dict[str, Any]) -> None:
    """A part that is not a well-formed image of a readable size never raises: it is held at
    the estimate, as an image of unknown size."""
    assert added(part) == 1445
    assert added(part, media=MediaEstimates(image_tokens=3, audio_tokens=0)) == 3


def test_a_zero_sized_header_is_unknown() -> None:
    assert data_url_size(data_url("png", 0, 5)) is None
    assert data_url_size(data_url("jpeg", 5, 0)) is None  # height defined later (DNL): unknown
    assert added(image(data_url("gif", 0, 0))) == 1445


def test_audio_is_the_estimate() -> None:
    assert added(AUDIO) == 600
    assert added(AUDIO, AUDIO) == 1200
    assert added({"type": "input_audio"}) == 600  # malformed: still audio, still held
    assert added(AUDIO, media=MediaEstimates(image_tokens=0, audio_tokens=45)) == 45


def test_the_configured_estimates_change_the_count() -> None:
    """billing.image_tokens and billing.audio_tokens, through MediaEstimates.of, are what an
    image of unknown size and an audio part count; an image of known size keeps its figure."""
    billing = parse_settings({"billing": {"image_tokens": 2000, "audio_tokens": 50}}).billing
    media = MediaEstimates.of(billing)
    assert media == MediaEstimates(image_tokens=2000, audio_tokens=50)
    unknown = image("https://example.com/a.png")
    known = image(data_url("webp-vp8", 2048, 4096))
    assert added(unknown, AUDIO, known, media=media) == 2000 + 50 + 1105
    assert added(unknown, AUDIO, known, media=MediaEstimates(0, 0)) == 1105


def test_the_defaults_are_the_configs() -> None:
    """No `media` counts with the config's defaults."""
    assert MediaEstimates() == MediaEstimates.of(BillingConfig())
    assert MediaEstimates() == MediaEstimates.of(parse_settings(None).billing)
    call = _chat(image("https://example.com/a.png"), AUDIO)
    assert count_prompt_sync("chat", call, ENCODING) == count_prompt_sync(
        "chat", call, ENCODING, media=MediaEstimates.of(BillingConfig())
    )


def test_text_around_media_is_still_counted() -> None:
    """Text parts count their text as before; other part types add nothing."""
    text = {"type": "text", "text": "Describe both pictures in French, please."}
    tokens = len(ENCODING.encode_ordinary(text["text"]))
    url = data_url("jpeg", 1024, 1024)
    assert added(text, image(url), text, {"type": "file", "file": {"file_id": "f"}}) == (
        2 * tokens + 765
    )


async def test_the_estimates_reach_the_worker_thread() -> None:
    """A big body is counted off the loop with the same estimates."""
    media = MediaEstimates(image_tokens=77, audio_tokens=11)
    call = _chat(image("https://example.com/a.png"), AUDIO, image(data_url("png", 1024, 1024)))
    expected = count_prompt_sync("chat", call, ENCODING, media=media)
    assert await count_prompt("chat", call, ENCODING, OFFLOAD_BYTES + 1, media=media) == expected
    assert await count_prompt("chat", call, ENCODING, 10, media=media) == expected
    assert expected == count_prompt_sync("chat", _chat(), ENCODING) + 77 + 11 + 765
