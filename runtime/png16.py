"""16-bit RGB/RGBA PNG, which Pillow reads only as 8-bit and cannot write.

Just enough of the PNG format (non-interlaced, bit depth 16, colour types 2 and 6, the five row
filters, an optional iCCP chunk) to keep 16-bit photographs 16-bit through ``mordasr-run``.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {2: 3, 6: 4}  # colour type -> channels


def is_png16_color_data(data: bytes) -> bool:
    """True for PNG bytes whose header says 16-bit RGB or RGBA."""
    head = data[:29]
    if len(head) < 29 or not head.startswith(SIGNATURE) or head[12:16] != b"IHDR":
        return False
    depth, color = head[24], head[25]
    return depth == 16 and color in CHANNELS


def _chunks(data: bytes):
    pos = len(SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise ValueError("truncated PNG chunk")
        yield kind, body
        pos += 12 + length


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    rows = np.frombuffer(raw, dtype=np.uint8)
    if rows.size != height * (stride + 1):
        raise ValueError("PNG image data has the wrong size (truncated?)")
    rows = rows.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:  # Sub: running sum per byte lane, modulo 256
            cur = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up
            cur = line + prev
        elif kind in (3, 4):  # Average / Paeth depend on the byte just decoded: per pixel
            cur = np.zeros(stride, dtype=np.uint8)
            left = np.zeros(bpp, dtype=np.int32)
            up_left = np.zeros(bpp, dtype=np.int32)
            for x in range(0, stride, bpp):
                up = prev[x:x + bpp].astype(np.int32)
                if kind == 3:
                    pred = (left + up) // 2
                else:
                    p = left + up - up_left
                    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
                    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
                value = (line[x:x + bpp].astype(np.int32) + pred) & 0xFF
                cur[x:x + bpp] = value
                left, up_left = value, up
        else:
            raise ValueError(f"unknown PNG filter {kind}")
        out[y] = cur
        prev = cur
    return out


def read_png16(path: str | Path) -> tuple[np.ndarray, bytes | None]:
    """(uint16 (H, W, C) array, ICC profile or None) of a 16-bit RGB(A) PNG file."""
    return decode_png16(Path(path).read_bytes())


def decode_png16(data: bytes) -> tuple[np.ndarray, bytes | None]:
    """(uint16 (H, W, C) array, ICC profile or None) of 16-bit RGB(A) PNG bytes."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG file")
    header, idat, icc = None, [], None
    for kind, body in _chunks(data):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"iCCP":
            name_end = body.index(b"\0")
            icc = zlib.decompress(body[name_end + 2:])
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without a header")
    width, height, depth, color, _, _, interlace = header
    if depth != 16 or color not in CHANNELS:
        raise ValueError("not a 16-bit RGB/RGBA PNG")
    if interlace:
        raise ValueError("interlaced 16-bit PNG is not supported")
    channels = CHANNELS[color]
    raw = zlib.decompress(b"".join(idat))
    pixels = _unfilter(raw, height, width * channels * 2, channels * 2)
    return pixels.view(">u2").reshape(height, width, channels).astype(np.uint16), icc


def encode_png16(pixels: np.ndarray, icc_profile: bytes | None = None) -> bytes:
    """PNG bytes of a uint16 (H, W, 3 or 4) array, rows unfiltered, with an optional iCCP chunk."""
    height, width, channels = pixels.shape
    color = {3: 2, 4: 6}[channels]
    big = pixels.astype(">u2")
    raw = b"".join(b"\x00" + big[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    parts = [SIGNATURE, chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0))]
    if icc_profile:
        parts.append(chunk(b"iCCP", b"icc\0\0" + zlib.compress(icc_profile)))
    parts += [chunk(b"IDAT", zlib.compress(raw, 6)), chunk(b"IEND", b"")]
    return b"".join(parts)
