"""JPEG written a band of rows at a time, through Pillow's encoder.

libjpeg takes a whole image, but a baseline JPEG with a restart marker after every MCU row
(``restart_marker_rows=1``) is a sequence of independently coded rows: each restart resets the
DC predictions and byte-aligns the bit stream, and 4:2:0 chroma is averaged within each 16-row
MCU row. So each band of rows (a multiple of 16, except the last) is encoded on its own with the
same quality and the standard Huffman tables, and the scans are joined: the first band's header
with the image's full height in its frame header, then each band's entropy-coded rows, with the
restart markers renumbered (RST0..RST7 cycle over the whole image) and one between bands. The
file is byte-for-byte what Pillow writes for the whole image with the same options, and what a
tiled restore holds is one band, not the output.
"""

from __future__ import annotations

import io
import logging
import struct
from typing import BinaryIO

import numpy as np
from PIL import Image

log = logging.getLogger("mordasr.runtime")

QUALITY = 95
MAX_EXIF = 65533  # EXIF lives in one APP1 segment (Pillow refuses more)
MCU_ROWS = 16  # 4:2:0: an MCU is 16x16 pixels
MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION
SOI, EOI, SOS, DRI = b"\xff\xd8", b"\xff\xd9", 0xDA, 0xDD
SOF_MARKERS = (0xC0, 0xC1)  # baseline and extended sequential Huffman frames
RST0 = 0xD0


def _save_options(icc_profile: bytes | None, exif: bytes | None) -> dict:
    options: dict = {"quality": QUALITY, "subsampling": 2, "restart_marker_rows": 1}
    if icc_profile:
        options["icc_profile"] = icc_profile
    if exif:
        options["exif"] = exif
    return options


def _split(data: bytes) -> tuple[bytes, int, bytes]:
    """A Pillow JPEG's header (through SOS), the offset of its frame's height, and its scan."""
    if not data.startswith(SOI) or not data.endswith(EOI):
        raise RuntimeError("Pillow's JPEG encoder wrote no SOI/EOI")
    pos, height_at, has_dri = 2, -1, False
    while True:
        if data[pos] != 0xFF:
            raise RuntimeError("unexpected byte between JPEG segments")
        marker, (length,) = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in SOF_MARKERS:
            height_at = pos + 5  # FF Cx, length (2), precision (1), height (2)
        elif marker in range(0xC2, 0xD0) and marker not in (0xC4, 0xC8, 0xCC):
            raise RuntimeError(f"JPEG frame type {marker:#x} cannot be written in bands")
        has_dri |= marker == DRI
        pos += 2 + length
        if marker == SOS:
            break
    if height_at < 0 or not has_dri:  # Pillow < 10.2 ignores restart_marker_rows
        raise RuntimeError("Pillow wrote no restart markers (restart_marker_rows needs Pillow >= 10.2)")
    return data[:pos], height_at, data[pos:-2]


class JpegWriter:
    """``write`` 8-bit RGB rows (top to bottom, any number at a time) and ``close`` once: a
    baseline 4:2:0 JPEG at quality 95 with a restart marker every 16 rows, on ``stream``."""

    def __init__(self, stream: BinaryIO, width: int, height: int, icc_profile: bytes | None = None,
                 exif: bytes | None = None):
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            raise ValueError(f"a JPEG is at most {MAX_SIDE} pixels a side, not {width}x{height}")
        if exif and len(exif) > MAX_EXIF:
            log.warning("the EXIF block (%d bytes) is larger than a JPEG holds (%d): the JPEG is written "
                        "without it (PNG keeps it)", len(exif), MAX_EXIF)
            exif = None
        self.stream, self.width, self.height = stream, width, height
        self.icc_profile, self.exif = icc_profile, exif
        self.rows_written = 0
        self.pending = np.empty((0, width, 3), np.uint8)
        self.tables: bytes | None = None  # the first band's header past its APPn segments

    def write(self, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8 or rows.ndim != 3 or rows.shape[1:] != (self.width, 3):
            raise ValueError(f"expected uint8 rows of shape (n, {self.width}, 3), got {rows.dtype} {rows.shape}")
        if self.rows_written + len(self.pending) + len(rows) > self.height:
            raise ValueError(f"more than the {self.height} rows the JPEG was opened for")
        pending = np.concatenate([self.pending, rows]) if len(self.pending) else rows
        last = self.rows_written + len(pending) == self.height
        ready = len(pending) if last else len(pending) // MCU_ROWS * MCU_ROWS
        if ready:
            self._encode(pending[:ready])
        self.pending = pending[ready:].copy()  # fewer than 16 rows wait for the next band

    def close(self) -> None:
        if self.rows_written != self.height:
            raise ValueError(f"the JPEG got {self.rows_written + len(self.pending)} of its {self.height} rows")
        self.stream.write(EOI)

    def _encode(self, rows: np.ndarray) -> None:
        first = self.rows_written == 0
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rows), "RGB").save(
            buffer, "JPEG", **_save_options(self.icc_profile if first else None, self.exif if first else None))
        header, height_at, scan = _split(buffer.getvalue())
        tables = _tables(header)
        if first:
            self.tables = tables
            self.stream.write(header[:height_at] + struct.pack(">H", self.height) + header[height_at + 2:])
        elif tables != self.tables:
            raise RuntimeError("Pillow's JPEG tables changed between bands")
        first_mcu_row = self.rows_written // MCU_ROWS
        if not first:  # the restart between the previous band's last MCU row and this band's first
            self.stream.write(bytes([0xFF, RST0 + (first_mcu_row - 1) % 8]))
        self.stream.write(_renumber(scan, first_mcu_row))
        self.rows_written += len(rows)


def _tables(header: bytes) -> bytes:
    """The header's segments that must agree between bands: all but APPn and COM, and the frame
    header without its height."""
    kept, pos = [], 2
    while pos < len(header):
        marker, (length,) = header[pos + 1], struct.unpack(">H", header[pos + 2:pos + 4])
        segment = header[pos:pos + 2 + length]
        if marker in SOF_MARKERS:
            segment = segment[:5] + segment[7:]
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE):
            kept.append(segment)
        pos += 2 + length
    return b"".join(kept)


def _renumber(scan: bytes, first_mcu_row: int) -> bytes:
    """The scan with its k-th restart marker renumbered as the marker after MCU row
    ``first_mcu_row + k`` of the whole image. In entropy-coded data 0xFF is followed only by a
    stuffed 0x00 or a marker, so every 0xFF D0-D7 pair is a restart marker."""
    if first_mcu_row % 8 == 0:
        return scan
    data = np.frombuffer(scan, np.uint8).copy()
    at = np.flatnonzero((data[:-1] == 0xFF) & ((data[1:] & 0xF8) == RST0)) + 1
    data[at] = RST0 + (first_mcu_row + np.arange(len(at))) % 8
    return data.tobytes()
