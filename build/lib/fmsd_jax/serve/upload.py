"""Reading an upload's body into memory under a byte cap, before anything else looks at it.

Why not FastAPI's `UploadFile`: Starlette spools a multipart file part to a temporary file on
disk past 1 MiB, and reads the whole body before the handler runs. Here the `Content-Length`
is checked before a byte is read, the body is streamed and counted chunk by chunk, and reading
stops at `serve.max_bytes` (a body without a length, chunked, is cut off there too), so an
oversized upload costs at most the cap in memory and never touches the disk.

Two ways to send a file, both kept in memory: a `multipart/form-data` body with one file part
(a browser's `FormData`, `curl -F file=@face.png`), or the file itself as the body
(`curl --data-binary @face.png`).
"""

from __future__ import annotations

import dataclasses
import re

from python_multipart.multipart import MultipartParser, parse_options_header

from fmsd_jax.serve.media import MediaRefused

# The multipart envelope (boundaries, part headers) on top of the file's own bytes.
MULTIPART_SLACK = 16 * 1024


@dataclasses.dataclass
class Upload:
    data: bytes
    filename: str | None


def check_length(headers, max_bytes: int) -> None:
    """413 from the declared length alone, before the body is read."""
    declared = headers.get("content-length")
    if declared is None:
        return
    try:
        n = int(declared)
    except ValueError:
        raise MediaRefused(400, f"Content-Length {declared!r} is not a number") from None
    if n > max_bytes + MULTIPART_SLACK:
        raise MediaRefused(413, f"the upload is {n} bytes, over serve.max_bytes={max_bytes}; "
                           "send a smaller file")


def check_filename(name: str | None) -> str | None:
    """A bare file name, or 400: a name holding a path (`../x.png`, `C:\\x.png`) is someone
    probing for a place to write; the service writes nothing, and says so by refusing it."""
    if name is None:
        return None
    if any(c in name for c in "/\\\x00") or name in (".", "..") or ":" in name:
        raise MediaRefused(400, f"the upload's filename {name[:80]!r} holds a path; send the "
                           "bare file name")
    return name[:255]


async def read_body(request, max_bytes: int) -> Upload:
    """The uploaded file's bytes and name, in memory, refused past `max_bytes`."""
    check_length(request.headers, max_bytes)
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    multipart = ctype == b"multipart/form-data"
    cap = max_bytes + (MULTIPART_SLACK if multipart else 0)
    parts = _Parts(params.get(b"boundary"), max_bytes) if multipart else None
    body = bytearray()
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise MediaRefused(413, f"the upload is over serve.max_bytes={max_bytes} bytes "
                               "(stopped reading there); send a smaller file")
        if parts is not None:
            parts.write(chunk)
        else:
            body += chunk
    if parts is None:
        return Upload(bytes(body), check_filename(request.headers.get("x-filename")))
    return parts.finish()


def _param(header: bytes, key: bytes) -> bytes | None:
    """A parameter of a Content-Disposition header exactly as sent. python-multipart's own
    parser keeps only the last path component of a filename (an old browser's habit), which
    would hide from the check that the sender put a path there."""
    found = re.search(rb"(?:^|;)\s*" + re.escape(key) + rb'\s*=\s*("((?:[^"\\]|\\.)*)"|[^;]*)',
                      header)
    if found is None:
        return None
    quoted = found.group(2)  # kept raw: browsers send a backslash unescaped
    return quoted if quoted is not None else found.group(1).strip()


class _Parts:
    """python-multipart's streaming parser with every part kept in memory (no spooling)."""

    def __init__(self, boundary: bytes | None, max_bytes: int):
        if not boundary:
            raise MediaRefused(400, "a multipart/form-data body needs a boundary in its "
                               "Content-Type")
        self.max_bytes = max_bytes
        self.files: list[tuple[str | None, bytearray]] = []
        self._header: tuple[bytearray, bytearray] = (bytearray(), bytearray())
        self._headers: dict[bytes, bytes] = {}
        self._data: bytearray | None = None
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._part_data,
            "on_part_end": self._end, "on_header_field": self._field,
            "on_header_value": self._value, "on_header_end": self._header_end})

    def _begin(self) -> None:
        self._headers, self._data = {}, bytearray()

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header[0].extend(data[start:end])

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header[1].extend(data[start:end])

    def _header_end(self) -> None:
        name, value = self._header
        self._headers[bytes(name).lower()] = bytes(value)
        self._header = (bytearray(), bytearray())

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.extend(data[start:end])
        if len(self._data) > self.max_bytes:
            raise MediaRefused(413, f"the uploaded file is over serve.max_bytes={self.max_bytes} "
                               "bytes; send a smaller file")

    def _end(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        field, name = _param(disposition, b"name"), _param(disposition, b"filename")
        if name is not None or field == b"file":
            shown = name.decode("utf-8", "replace") if name is not None else None
            self.files.append((shown, self._data))
        self._data = None

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MediaRefused:
            raise
        except Exception as e:  # python-multipart's MultipartParseError and kin
            raise MediaRefused(400, f"the multipart body does not parse ({e})") from None

    def finish(self) -> Upload:
        try:
            self.parser.finalize()
        except Exception as e:
            raise MediaRefused(400, f"the multipart body does not parse ({e})") from None
        if len(self.files) != 1:
            raise MediaRefused(400, f"the form holds {len(self.files)} files; send one file "
                               "per request, in a part named 'file'")
        name, data = self.files[0]
        return Upload(bytes(data), check_filename(name))
