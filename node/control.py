"""The node's control socket: JSON lines over a unix stream socket.

Each request is one line holding a JSON object with a ``cmd`` string; each
gets exactly one reply line, a JSON object with ``ok`` true or false (and
``error`` when false).  A connection may send several requests.  The
commands themselves (``ping``, ``stats``, ``flows``, ``reload``) are served
by the handler the daemon passes in; this module only frames, validates and
guards them.

The socket file is created mode 0600 (the node runs as root; its control
is root's), a stale file from a dead node is replaced, a live node's socket
is never stolen, and the file is removed on close if it is still ours.

:func:`request` is the blocking client the CLI uses; every failure to reach
the node is a :class:`ControlError` with a message naming the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from node.errors import DataplaneError, NodeError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # bytes per request line
MAX_REPLY = 64 * 1024 * 1024  # bytes per reply line the client accepts (flows can be big)

Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(DataplaneError):
    """The node's control socket could not be reached or answered badly."""


def jsonable(value: Any) -> Any:
    """Dataclasses (statistics snapshots), enums and tuples as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


class ControlServer:
    """Serves ``handler`` on a unix socket until :meth:`close`."""

    def __init__(self, path: str, handler: Handler) -> None:
        self._path = path
        self._handler = handler
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        self.requests_total = 0
        self.errors_total = 0

    @property
    def path(self) -> str:
        return self._path

    async def start(self) -> None:
        """Bind (replacing a stale socket file) and start serving."""
        _claim_path(self._path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is born 0600: no window where others may connect
        try:
            sock.bind(self._path)
        except OSError as e:
            sock.close()
            raise ControlError(f"control socket {self._path}: cannot bind: {e.strerror}") from e
        finally:
            os.umask(old_umask)
        self._inode = os.stat(self._path).st_ino
        self._server = await asyncio.start_unix_server(
            self._serve_client, sock=sock, limit=MAX_REQUEST
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self._path).st_ino == self._inode:
                os.unlink(self._path)
        self._inode = None

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await self._send(writer, _error(f"request longer than {MAX_REQUEST} bytes"))
                    return
                if not line:
                    return
                await self._send(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        self.requests_total += 1
        try:
            command = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return self._failed(f"not JSON: {e}")
        if not isinstance(command, dict) or not isinstance(command.get("cmd"), str):
            return self._failed('expected an object like {"cmd": "stats"}')
        try:
            reply = await self._handler(command)
        except NodeError as e:
            return self._failed(str(e))
        except Exception as e:  # a bug: keep serving, say so
            log.exception("control command %r failed", command.get("cmd"))
            return self._failed(f"internal error: {type(e).__name__}: {e}")
        reply.setdefault("ok", True)
        return reply

    def _failed(self, message: str) -> dict[str, Any]:
        self.errors_total += 1
        return _error(message)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(jsonable(reply), separators=(",", ":")).encode() + b"\n")
        await writer.drain()


def _claim_path(path: str) -> None:
    """Make ``path`` free to bind: remove a dead node's socket, refuse anything else."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"control socket {path}: exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: left behind by a node that died
        return
    finally:
        probe.close()
    raise ControlError(f"control socket {path}: another node is serving it")


def request(path: str, command: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """Send one command to a node and return its reply (blocking)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError as e:
            raise ControlError(f"no control socket at {path} (is the node running?)") from e
        except ConnectionRefusedError as e:
            raise ControlError(f"{path}: connection refused (node not running?)") from e
        except OSError as e:
            raise ControlError(f"{path}: cannot connect: {e.strerror or e}") from e
        try:
            sock.sendall(json.dumps(command).encode() + b"\n")
            data = _read_line(sock, path)
        except TimeoutError as e:
            raise ControlError(f"{path}: no reply within {timeout:g}s") from e
        except OSError as e:
            raise ControlError(f"{path}: connection failed: {e.strerror or e}") from e
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError as e:
        raise ControlError(f"{path}: reply is not JSON: {e}") from e
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: reply is not a JSON object")
    return reply


def _read_line(sock: socket.socket, path: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlError(f"{path}: node closed the connection without a reply")
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY:
            raise ControlError(f"{path}: reply longer than {MAX_REPLY} bytes")
