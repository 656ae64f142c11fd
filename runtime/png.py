"""PNG written a band of rows at a time, and 16-bit RGB/RGBA PNG read, which Pillow reads only
as 8-bit and cannot write.

``PngWriter`` streams 8- or 16-bit RGB/RGBA rows to a file as they are restored, so a tiled
restore never holds its whole output: each row takes the filter that minimises the sum of its
bytes as signed values (libpng's heuristic) and goes through one zlib stream into 64 KiB IDAT
chunks, with the ICC profile (iCCP) and EXIF (eXIf) before them. Every PNG the runtime writes
comes from it, so a file is byte-for-byte the same whether it was written whole or in bands.
The reader covers non-interlaced 16-bit colour types 2 and 6 with all five row filters.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import BinaryIO

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


IDAT_BYTES = 1 << 16  # compressed bytes per IDAT chunk
COMPRESS_LEVEL = 6  # zlib's default, as Pillow's PNG encoder
FILTER_BYTES = 1 << 18  # image bytes filtered at once (the five candidates take ~25x that)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _filtered_rows(rows: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """(R, 1 + stride) uint8: each row of ``rows`` (R, stride) behind its filter byte, the filter
    (None, Sub, Up, Average, Paeth) chosen per row by the smallest sum of absolute signed bytes.
    ``prev`` is the row above the first (zeros at the top of the image)."""
    raw = rows.astype(np.int16)
    up = np.concatenate([prev[None].astype(np.int16), raw[:-1]])
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    up_left = np.zeros_like(raw)
    up_left[:, bpp:] = up[:, :-bpp]
    p = left + up - up_left
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    candidates = np.stack([raw, raw - left, raw - up, raw - (left + up) // 2, raw - paeth]).astype(np.uint8)
    cost = np.abs(candidates.view(np.int8).astype(np.int16)).sum(axis=2, dtype=np.int64)  # (5, R)
    choice = cost.argmin(axis=0)
    out = np.empty((len(rows), rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = choice
    out[:, 1:] = candidates[choice, np.arange(len(rows))]
    return out


class PngWriter:
    """Write a PNG to ``stream`` a band of rows at a time: ``write(rows)`` with uint8 or uint16
    (R, width, channels) arrays, top to bottom, then ``close()``, which checks the row count."""

    COLOR_TYPES = {3: 2, 4: 6}  # channels -> colour type

    def __init__(self, stream: BinaryIO, width: int, height: int, channels: int = 3, bit_depth: int = 8,
                 icc_profile: bytes | None = None, exif: bytes | None = None) -> None:
        if channels not in self.COLOR_TYPES or bit_depth not in (8, 16):
            raise ValueError(f"PngWriter writes RGB or RGBA at 8 or 16 bits, not {channels} channels "
                             f"at {bit_depth}")
        if not (0 < width < 2**31 and 0 < height < 2**31):
            raise ValueError(f"PNG sides must be in [1, 2^31), not {width}x{height}")
        self.stream, self.width, self.height, self.channels = stream, width, height, channels
        self.dtype = np.dtype(">u2") if bit_depth == 16 else np.dtype(np.uint8)
        self.bpp = channels * self.dtype.itemsize
        self.rows_written = 0
        self.prev = np.zeros(width * self.bpp, dtype=np.uint8)
        self.compressor = zlib.compressobj(COMPRESS_LEVEL)
        self.pending = bytearray()
        header = struct.pack(">IIBBBBB", width, height, bit_depth, self.COLOR_TYPES[channels], 0, 0, 0)
        stream.write(SIGNATURE + _chunk(b"IHDR", header))
        if icc_profile:
            stream.write(_chunk(b"iCCP", b"icc\0\0" + zlib.compress(icc_profile)))
        if exif:
            # PNG's eXIf holds the TIFF data without JPEG's "Exif\0\0" preamble (as Pillow writes it)
            stream.write(_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\0\0") else exif))

    def write(self, rows: np.ndarray) -> None:
        if rows.ndim != 3 or rows.shape[1:] != (self.width, self.channels):
            raise ValueError(f"expected rows of shape (R, {self.width}, {self.channels}), got {rows.shape}")
        if self.rows_written + len(rows) > self.height:
            raise ValueError(f"more rows than the {self.height} the PNG header declares")
        if rows.dtype.itemsize != self.dtype.itemsize:
            raise ValueError(f"expected {self.dtype.itemsize * 8}-bit rows, got {rows.dtype}")
        data = np.ascontiguousarray(rows, dtype=self.dtype).view(np.uint8).reshape(len(rows), -1)
        if not len(data):
            return
        step = max(1, FILTER_BYTES // data.shape[1])
        for start in range(0, len(data), step):
            part = data[start:start + step]
            filtered = _filtered_rows(part, self.prev, self.bpp)
            self.prev = part[-1].copy()
            for line in filtered:  # one compress call per row: the stream does not depend on the banding
                self.pending += self.compressor.compress(line.tobytes())
                self._flush_idat(IDAT_BYTES)
        self.rows_written += len(rows)

    def _flush_idat(self, at_least: int) -> None:
        while len(self.pending) >= at_least and self.pending:
            body, self.pending = bytes(self.pending[:IDAT_BYTES]), self.pending[IDAT_BYTES:]
            self.stream.write(_chunk(b"IDAT", body))

    def close(self) -> None:
        if self.rows_written != self.height:
            raise ValueError(f"{self.rows_written} rows written of the {self.height} the PNG header declares")
        self.pending += self.compressor.flush()
        self._flush_idat(1)
        self.stream.write(_chunk(b"IEND", b""))


def encode_png(pixels: np.ndarray, icc_profile: bytes | None = None, exif: bytes | None = None) -> bytes:
    """PNG bytes of a uint8 or uint16 (H, W, 3 or 4) array (``PngWriter`` in one band): what the
    tests compare a band-by-band write with, byte for byte."""
    buffer = io.BytesIO()
    height, width, channels = pixels.shape
    writer = PngWriter(buffer, width, height, channels, pixels.dtype.itemsize * 8, icc_profile, exif)
    writer.write(pixels)
    writer.close()
    return buffer.getvalue()
