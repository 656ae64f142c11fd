"""What an HTTP request to ``mordasr-serve`` may carry, and the status each bad one gets.

Pure logic (no Ray, no web framework) so that the limits are tested on their own: a body over
``max_bytes`` is 413 before it is read in full, an image over ``max_pixels`` is 413 before its
pixels are decoded, an undecodable image is 422, a body that is not an image is 415.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from mordasr.errors import ImageError, ImageTooLarge, MordasrError
from mordasr.runtime.images import OUTPUT_FORMATS

DEFAULT_MAX_BYTES = 32 << 20
DEFAULT_MAX_PIXELS = 4_000_000  # LR pixels: the output has scale^2 as many
RAW_TYPES = ("application/octet-stream",)  # besides image/*
FORM_FIELDS = ("image", "file")  # multipart field names looked for, in this order
RESPONSE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "TIFF": "image/tiff",
                  "BMP": "image/bmp"}


class RequestError(MordasrError):
    """A request the service refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def body(self) -> dict:
        return {"error": str(self), "status": self.status}


@dataclass(frozen=True)
class RequestLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def check_declared_length(self, content_length: str | None) -> None:
        """Refuse from the Content-Length header alone, before reading the body."""
        if content_length is None:
            return
        try:
            length = int(content_length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length header {content_length!r}") from None
        if length > self.max_bytes:
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of {self.max_bytes} bytes")

    def check_length(self, received: int) -> None:
        if received > self.max_bytes:
            raise RequestError(413, f"request body exceeds the limit of {self.max_bytes} bytes")


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def image_bytes(content_type: str | None, body: bytes) -> bytes:
    """The encoded image in a request body: raw (image/*, application/octet-stream) or the
    ``image`` (else ``file``, else first) file field of multipart/form-data."""
    kind = media_type(content_type)
    if not body:
        raise RequestError(422, "empty request body: send the image's bytes or a multipart 'image' field")
    if kind.startswith("image/") or kind in RAW_TYPES:
        return body
    if kind == "multipart/form-data":
        return _form_file(content_type or "", body)
    raise RequestError(415, f"unsupported content type {kind or '(none)'!r}: send image/* or "
                            "application/octet-stream bytes, or multipart/form-data with an 'image' field")


def _form_file(content_type: str, body: bytes) -> bytes:
    from python_multipart import parse_form
    from python_multipart.exceptions import FormParserError

    files: dict[str, bytes] = {}

    def on_file(file) -> None:
        file.file_object.seek(0)
        files.setdefault((file.field_name or b"").decode(errors="replace"), file.file_object.read())

    try:
        parse_form({"Content-Type": content_type.encode(), "Content-Length": str(len(body)).encode()},
                   io.BytesIO(body), lambda field: None, on_file)
    except (FormParserError, ValueError) as err:
        raise RequestError(422, f"malformed multipart body ({err})") from None
    for name in FORM_FIELDS:
        if name in files:
            return files[name]
    if files:
        return next(iter(files.values()))
    raise RequestError(422, "multipart body has no file field (send the image as field 'image')")


def response_format(requested: str | None) -> str:
    """Pillow format name for ``?format=png|jpg|webp|tiff|bmp`` (PNG when not given)."""
    if not requested:
        return "PNG"
    fmt = OUTPUT_FORMATS.get("." + requested.lower().lstrip("."))
    if fmt is None:
        raise RequestError(422, f"unknown output format {requested!r}; choose png, jpg, webp, tiff or bmp")
    return fmt


def status_for(err: Exception) -> int:
    """The HTTP status of an error raised while serving a request."""
    if isinstance(err, RequestError):
        return err.status
    if isinstance(err, ImageTooLarge):
        return 413
    if isinstance(err, ImageError):
        return 422
    return 500
