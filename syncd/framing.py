"""Framing of the local link between the filter and syncd (``local.proto``).

Each :class:`LocalFrame` travels as its serialized length (4 bytes,
big-endian, unsigned) followed by the serialized message.  A frame longer
than :data:`MAX_FRAME` (4 MiB) is a protocol error: the reader refuses it
before allocating anything, so a broken or hostile peer cannot make us hold
a huge buffer.

Both ends use this module:

* :func:`encode_frame` / :func:`decode_frame` turn one LocalFrame into bytes
  with its prefix and back (pure).
* :class:`FrameDecoder` takes bytes as they arrive (any split, partial reads)
  and returns whole frames (pure; for sans-I/O code and tests).
* :func:`read_frame` / :func:`write_frame` do the same over an asyncio
  stream.

Errors: bytes from the other end that are not a valid frame raise
:class:`syncd.errors.BadMessage` with reason ``frame-too-large``,
``bad-frame`` (protobuf refused it) or ``truncated-frame`` (the stream
ended inside a frame).  The caller counts the reason and closes the link.
Encoding a frame of our own that is too large is our bug
(:class:`syncd.errors.Misuse`): senders size their batches below the limit.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final

from google.protobuf.message import DecodeError

from syncd._pb.stockade.sync.v1 import local_pb2
from syncd.errors import BadMessage, Misuse

__all__ = [
    "MAX_FRAME",
    "PREFIX",
    "FrameDecoder",
    "decode_frame",
    "encode_frame",
    "parse_body",
    "read_frame",
    "write_frame",
]

MAX_FRAME: Final = 4 * 1024 * 1024  # bytes of one serialized LocalFrame (local.proto)
PREFIX: Final = 4  # bytes of the length prefix
_LENGTH: Final = struct.Struct(">I")

R_TOO_LARGE: Final = "frame-too-large"
R_BAD_FRAME: Final = "bad-frame"
R_TRUNCATED: Final = "truncated-frame"


def encode_frame(frame: local_pb2.LocalFrame) -> bytes:
    """The length prefix and the serialized ``frame``; Misuse beyond MAX_FRAME."""
    body = frame.SerializeToString()
    if len(body) > MAX_FRAME:
        raise Misuse(f"local frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(body)) + body


def parse_body(body: bytes) -> local_pb2.LocalFrame:
    """Parse one frame body (without its prefix); BadMessage if protobuf refuses it."""
    frame = local_pb2.LocalFrame()
    try:
        frame.ParseFromString(body)
    except DecodeError as exc:
        raise BadMessage(R_BAD_FRAME, str(exc)) from None
    return frame


def _body_length(prefix: bytes) -> int:
    (length,) = _LENGTH.unpack(prefix)
    if length > MAX_FRAME:
        raise BadMessage(R_TOO_LARGE, f"{length} bytes announced, limit {MAX_FRAME}")
    return int(length)


def decode_frame(data: bytes) -> local_pb2.LocalFrame:
    """Decode exactly one prefixed frame (the inverse of :func:`encode_frame`)."""
    if len(data) < PREFIX:
        raise BadMessage(R_TRUNCATED, f"{len(data)} bytes, no length prefix")
    length = _body_length(data[:PREFIX])
    if len(data) != PREFIX + length:
        raise BadMessage(R_TRUNCATED, f"{len(data) - PREFIX} body bytes, prefix says {length}")
    return parse_body(data[PREFIX:])


class FrameDecoder:
    """Reassembles frames from a byte stream cut anywhere.

    After a :class:`BadMessage` the stream is out of step for good: the
    decoder keeps raising and the caller must close the link.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed: BadMessage | None = None

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[local_pb2.LocalFrame]:
        """Add received bytes; return every frame they complete, in order."""
        if self._failed is not None:
            raise self._failed
        self._buffer += data
        frames: list[local_pb2.LocalFrame] = []
        try:
            while len(self._buffer) >= PREFIX:
                length = _body_length(bytes(self._buffer[:PREFIX]))
                end = PREFIX + length
                if len(self._buffer) < end:
                    break
                body = bytes(self._buffer[PREFIX:end])
                del self._buffer[:end]
                frames.append(parse_body(body))
        except BadMessage as exc:
            self._failed = exc
            raise
        return frames


async def read_frame(reader: asyncio.StreamReader) -> local_pb2.LocalFrame | None:
    """The next frame, or None when the stream ends cleanly between frames.

    Raises :class:`BadMessage` for an oversized, undecodable or cut frame;
    ``OSError`` from the socket passes through.
    """
    try:
        prefix = await reader.readexactly(PREFIX)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise BadMessage(R_TRUNCATED, "stream ended inside a length prefix") from None
    length = _body_length(prefix)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise BadMessage(R_TRUNCATED, f"{len(exc.partial)} of {length} bytes") from None
    return parse_body(body)


async def write_frame(writer: asyncio.StreamWriter, frame: local_pb2.LocalFrame) -> None:
    """Write one frame and wait until the transport accepted it (backpressure)."""
    writer.write(encode_frame(frame))
    await writer.drain()
