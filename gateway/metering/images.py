"""Prompt tokens of a chat image, by OpenAI's published vision formula for gpt-4o-class models.

The vision guide ("Images and vision", section "Calculating costs") publishes: an image with
`detail: "low"` costs 85 tokens whatever its size; otherwise it is scaled to fit within
2048x2048 (keeping its aspect ratio), then so that its shortest side is 768px, and costs 170
tokens per 512px tile needed to cover it, plus 85. Its worked examples: 1024x1024 high, 765;
2048x4096 high, 1105; 4096x8192 low, 85. Here `auto`, an absent detail and any other value are
held as `high` (the larger of the two), the scalings only shrink an image (one within bounds is
not enlarged), and the scaled sides are kept exact (fractions, not rounded pixels), so a side
just above a tile's edge takes the extra tile: never fewer tiles than any rounding would give.

The size is known only for a `data:` URL in base64 (PNG, JPEG, GIF, WebP): it is read from the
image's header, decoding just the few bytes each field needs where it lies (base64 maps every 3
bytes to 4 characters, so a byte's offset is its characters' offset), never the whole image: a
JPEG's segments before its frame header (EXIF, ICC profiles) are skipped by their lengths, not
decoded. An http(s) URL, another format, malformed base64 or a header that does not parse has
no known size: the caller's estimate is used (or 85 for low detail).
"""

from __future__ import annotations

import math
import struct
from binascii import a2b_base64
from fractions import Fraction

__all__ = [
    "LOW_DETAIL_TOKENS",
    "base64_size",
    "data_url_size",
    "image_tokens",
    "tile_tokens",
]

LOW_DETAIL_TOKENS = 85
BASE_TOKENS = 85
TILE_TOKENS = 170
TILE_SIDE = 512
FIT_SIDE = 2048  # first scaled to fit within FIT_SIDE x FIT_SIDE ...
SHORT_SIDE = 768  # ... then so that its shortest side is SHORT_SIDE

# Where the base64 after the comma starts: a media type with its parameters is short.
HEADER_CHARS = 1024
# The most JPEG segments (and fill bytes) walked before the frame header: a camera's JPEG has
# about a dozen (APPn, DQT, DHT); one in many pieces (an ICC profile split in 64 KB chunks) a
# few dozen more.
JPEG_STEPS = 256
_PNG = b"\x89PNG\r\n\x1a\n"
# The frame headers (SOF0-SOF15) but DHT (C4), JPG (C8) and DAC (CC), which share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM and RST0-RST7.
_JPEG_BARE = frozenset({0x01, *range(0xD0, 0xD8)})


def tile_tokens(width: int, height: int) -> int:
    """A high-detail image of this size, by the published formula."""
    w, h = Fraction(width), Fraction(height)
    longest = max(w, h)
    if longest > FIT_SIDE:
        w, h = w * FIT_SIDE / longest, h * FIT_SIDE / longest
    shortest = min(w, h)
    if shortest > SHORT_SIDE:
        w, h = w * SHORT_SIDE / shortest, h * SHORT_SIDE / shortest
    tiles = math.ceil(w / TILE_SIDE) * math.ceil(h / TILE_SIDE)
    return TILE_TOKENS * tiles + BASE_TOKENS


def image_tokens(url: str, detail: object, unknown: int) -> int:
    """An image part's tokens: 85 at low detail, else the formula for its size when its header
    gives one, else `unknown` (the configured estimate)."""
    if detail == "low":
        return LOW_DETAIL_TOKENS
    size = data_url_size(url)
    if size is None:
        return unknown
    return tile_tokens(*size)


class _Base64:
    """The bytes of the base64 text `url[start:]`, decoded a few at a time where asked."""

    __slots__ = ("start", "url")

    def __init__(self, url: str, start: int) -> None:
        self.url, self.start = url, start

    def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset` (fewer at the end); ValueError if not base64."""
        first, last = offset // 3, -(-(offset + size) // 3)
        chars = self.url[self.start + 4 * first : self.start + 4 * last]
        chars += "=" * (-len(chars) % 4)  # at the end: padding some encoders leave out
        data = a2b_base64(chars, strict_mode=True) if chars else b""
        skip = offset - 3 * first
        return data[skip : skip + size]


def data_url_size(url: str) -> tuple[int, int] | None:
    """(width, height) of a base64 `data:` URL's PNG, JPEG, GIF or WebP image, else None."""
    if url[:5].lower() != "data:":
        return None
    comma = url.find(",", 5, HEADER_CHARS)
    if comma < 0 or not url[5:comma].lower().endswith(";base64"):
        return None
    return _sized(_Base64(url, comma + 1))


def base64_size(data: str) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, GIF or WebP image given as base64 text (an Anthropic
    image block's `source.data`), else None."""
    return _sized(_Base64(data, 0))


def _sized(image: _Base64) -> tuple[int, int] | None:
    try:
        size = _size(image)
    except (ValueError, struct.error):  # not base64 (binascii.Error is a ValueError), cut short
        return None
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _size(image: _Base64) -> tuple[int, int] | None:
    head = image.read(0, 30)
    if head.startswith(_PNG):
        if head[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    if head.startswith(b"\xff\xd8"):
        return _jpeg(image)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack("<HH", head[6:10])
        return width, height
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(head)
    return None


def _webp(head: bytes) -> tuple[int, int] | None:
    """The first chunk: VP8 (lossy), VP8L (lossless) or VP8X (extended, the canvas)."""
    chunk = head[12:16]
    if chunk == b"VP8 ":  # a key frame: 3 bytes of tag, the start code, 14-bit sizes
        if head[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # the signature 0x2F, then 14 bits of width - 1, 14 of height - 1
        if head[20:21] != b"\x2f":
            return None
        (bits,) = struct.unpack("<I", head[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # flags and reserved (4 bytes), then 24-bit width - 1, height - 1
        if len(head) < 30:
            return None
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    return None


def _jpeg(image: _Base64) -> tuple[int, int] | None:
    """The frame header's size, walking the segments from the start of image to it."""
    offset = 2
    for _ in range(JPEG_STEPS):
        marker = image.read(offset, 4)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0xFF:  # a fill byte before the marker
            offset += 1
            continue
        if kind in _JPEG_BARE:
            offset += 2
            continue
        if kind in (0x00, 0xD9, 0xDA):  # not a marker; the end, or the scan, before any frame
            return None
        (length,) = struct.unpack(">H", marker[2:4])
        if length < 2:
            return None
        if kind in _JPEG_SOF:  # length, precision (1 byte), height, width
            height, width = struct.unpack(">HH", image.read(offset + 5, 4))
            return width, height
        offset += 2 + length
    return None
