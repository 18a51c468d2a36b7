"""HTTP media types and multipart/related bodies (RFC 2387, RFC 2046 5.1), for DICOMweb.

Written as a stream: each part's bytes are yielded as they are read, so a series goes out without
being held in memory. Read as a stream too: `read_parts` holds at most one part (plus a read
chunk) of a STOW-RS body at a time.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from pacsd.errors import PacsError

CHUNK = 1 << 20
SMALL = 1 << 16   # a first chunk shorter than this is sent with its part's headers

_TOKEN = re.compile(r'\s*([^;,=\s]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;,]*))?\s*')


@dataclass(frozen=True)
class MediaRange:
    """One media type of an Accept or Content-Type header, with its parameters (lower-case
    names). For multipart/related, `type` is the type of its parts."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def part_type(self) -> str:
        """The type a part must have: `type=` of multipart/related, else the type itself."""
        if self.media_type == "multipart/related":
            return self.params.get("type", "").lower() or "*/*"
        return self.media_type

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax") or None

    def matches(self, media_type: str) -> bool:
        want = self.part_type
        if want in ("*/*", media_type):
            return True
        return want.endswith("/*") and media_type.split("/")[0] == want[:-2]


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_media_type(text: str) -> MediaRange:
    pieces = _split_outside_quotes(text, ";")
    params = {}
    for piece in pieces[1:]:
        name, _, value = piece.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        if name.strip():
            params[name.strip().lower()] = value
    return MediaRange(pieces[0].strip().lower(), params)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, in order, without those refused (q=0). An absent
    or empty header accepts anything."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = []
    for item in _split_outside_quotes(header, ","):
        if not item.strip():
            continue
        r = parse_media_type(item)
        if r.params.get("q", "1").strip() in ("0", "0.0", "0.00", "0.000"):
            continue
        ranges.append(r)
    return ranges


def new_boundary() -> str:
    return "pacsd-" + secrets.token_hex(12)


def content_type(part_type: str, boundary: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def stream(parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """A multipart body from (part headers, chunks of its content). A small first chunk goes
    out together with its part's headers (one write instead of two); a big one is not copied
    for that."""
    delimiter = f"--{boundary}\r\n".encode()
    for headers, chunks in parts:
        head = delimiter + headers.encode("latin-1") + b"\r\n\r\n"
        delimiter = f"\r\n--{boundary}\r\n".encode()
        for chunk in chunks:
            if head:
                if len(chunk) < SMALL:
                    chunk = head + chunk
                else:
                    yield head
                head = b""
            yield chunk
        if head:
            yield head
    yield f"\r\n--{boundary}--\r\n".encode()


def stream_length(headers: Iterable[str], sizes: Iterable[int], boundary: str) -> int:
    """The length in bytes of what `stream` makes of parts with these headers and sizes."""
    n, first = 0, True
    for h, size in zip(headers, sizes, strict=True):
        n += len(f"{'' if first else chr(13) + chr(10)}--{boundary}\r\n".encode())
        n += len(h.encode("latin-1")) + 4 + size
        first = False
    return n + len(f"\r\n--{boundary}--\r\n".encode())


def file_chunks(f, size: int = CHUNK) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    while True:
        chunk = f.read(size)
        if not chunk:
            return
        yield chunk


class MalformedBody(PacsError, ValueError):
    """The body is not the multipart/related it says it is (HTTP 400; a ValueError too)."""

    http_status = 400


def read_parts(read: Callable[[int], bytes], length: int | None, boundary: str,
               max_header: int = 64 << 10) -> Iterator[tuple[dict[str, str], memoryview]]:
    """Yield (headers with lower-case names, content) for each part of a multipart body read
    with `read`, `length` bytes in all (None: until read returns nothing). The content is a
    view into the read buffer, valid until the next part is asked for."""
    delim = b"--" + boundary.encode("latin-1")
    buf = bytearray()
    remaining = [length]

    def fill() -> bool:
        n = CHUNK if remaining[0] is None else min(CHUNK, remaining[0])
        if n <= 0:
            return False
        chunk = read(n)
        if not chunk:
            return False
        if remaining[0] is not None:
            remaining[0] -= len(chunk)
        buf.extend(chunk)
        return True

    def need(n: int) -> None:
        while len(buf) < n:
            if not fill():
                raise MalformedBody("the body ends inside a part")

    # A preamble (often just CRLF) may precede the first delimiter.
    while (start := buf.find(delim)) < 0:
        if len(buf) > max_header or not fill():
            raise MalformedBody(f"no multipart boundary {boundary!r} in the body")
    del buf[:start + len(delim)]
    while True:
        need(2)
        if buf[:2] == b"--":
            return   # the close delimiter; anything after it is an epilogue
        while (eol := buf.find(b"\r\n")) < 0:   # transport padding up to the line end
            if len(buf) > max_header or not fill():
                raise MalformedBody("malformed multipart delimiter line")
        del buf[:eol + 2]
        need(2)
        headers: dict[str, str] = {}
        if buf[:2] == b"\r\n":
            del buf[:2]
        else:
            while (end := buf.find(b"\r\n\r\n")) < 0:
                if len(buf) > max_header or not fill():
                    raise MalformedBody("malformed multipart part headers")
            for line in bytes(buf[:end]).decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            del buf[:end + 4]
        close = b"\r\n" + delim
        searched = 0
        while (end := buf.find(close, searched)) < 0:
            searched = max(0, len(buf) - len(close) + 1)
            if not fill():
                raise MalformedBody("the body ends inside a part")
        view = memoryview(buf)[:end]
        try:
            yield headers, view   # no copy here: the caller copies what it keeps
        finally:
            view.release()
        del buf[:end + len(close)]
