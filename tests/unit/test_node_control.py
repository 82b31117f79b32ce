"""node.control: JSON-lines framing, socket file handling and the blocking client."""

from __future__ import annotations

import asyncio
import enum
import os
import socket
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from node.control import ControlError, ControlServer, jsonable, request
from node.errors import RulesError


@pytest.fixture
def sock_path() -> Iterator[str]:
    # Short directory: unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="stk-ctl-") as d:
        yield os.path.join(d, "node.sock")


async def handler(command: Mapping[str, Any]) -> dict[str, Any]:
    cmd = command["cmd"]
    if cmd == "echo":
        return {"echo": command.get("value")}
    if cmd == "refuse":
        return {"ok": False, "error": "refused"}
    if cmd == "bad-rules":
        raise RulesError("rules.yaml", 3, "unknown key 'acton'")
    raise KeyError(cmd)


def serve_and(path: str, *requests: Any) -> list[Any]:
    """Start a server, run blocking client calls in a thread, stop the server."""

    async def scenario() -> list[Any]:
        server = ControlServer(path, handler)
        await server.start()
        try:
            return [await asyncio.to_thread(r) for r in requests]
        finally:
            await server.close()

    return asyncio.run(scenario())


def test_a_command_gets_its_reply_with_ok_added(sock_path):
    [reply] = serve_and(sock_path, lambda: request(sock_path, {"cmd": "echo", "value": [1, 2]}))
    assert reply == {"echo": [1, 2], "ok": True}


def test_errors_are_replies_not_disconnects(sock_path):
    replies = serve_and(
        sock_path,
        lambda: request(sock_path, {"cmd": "refuse"}),
        lambda: request(sock_path, {"cmd": "bad-rules"}),
        lambda: request(sock_path, {"cmd": "crash"}),
        lambda: request(sock_path, {"nocmd": 1}),
    )
    assert replies[0] == {"ok": False, "error": "refused"}
    assert replies[1] == {"ok": False, "error": "rules.yaml:3: unknown key 'acton'"}
    assert replies[2]["ok"] is False and "internal error: KeyError" in replies[2]["error"]
    assert replies[3]["ok"] is False and "cmd" in replies[3]["error"]


def raw_exchange(path: str, payload: bytes, replies: int) -> list[bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        s.sendall(payload)
        data = b""
        while data.count(b"\n") < replies:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.splitlines()


def test_one_connection_carries_several_requests_and_survives_garbage(sock_path):
    payload = b'not json\n{"cmd": "echo", "value": 7}\n[1]\n'
    [lines] = serve_and(sock_path, lambda: raw_exchange(sock_path, payload, 3))
    assert b'"ok":false' in lines[0] and b"not JSON" in lines[0]
    assert lines[1] == b'{"echo":7,"ok":true}'
    assert b'"ok":false' in lines[2]


def test_socket_file_is_private_and_removed_on_close(sock_path):
    def mode() -> int:
        return stat.S_IMODE(os.stat(sock_path).st_mode)

    [m] = serve_and(sock_path, mode)
    assert m == 0o600
    assert not os.path.exists(sock_path)


def test_a_stale_socket_file_is_replaced(sock_path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # file stays, nobody listens
    [reply] = serve_and(sock_path, lambda: request(sock_path, {"cmd": "echo", "value": 1}))
    assert reply["echo"] == 1


def test_a_live_socket_and_a_regular_file_are_never_taken(sock_path):
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(sock_path)
    live.listen(1)
    try:
        with pytest.raises(ControlError, match="another node"):
            asyncio.run(ControlServer(sock_path, handler).start())
    finally:
        live.close()
    os.unlink(sock_path)
    with open(sock_path, "w") as f:
        f.write("precious")
    with pytest.raises(ControlError, match="not a socket"):
        asyncio.run(ControlServer(sock_path, handler).start())
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_client_errors_name_the_socket(sock_path):
    with pytest.raises(ControlError, match="is the node running"):
        request(sock_path, {"cmd": "ping"})
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()
    with pytest.raises(ControlError, match="refused"):
        request(sock_path, {"cmd": "ping"})


def test_client_gives_up_after_its_timeout(sock_path):
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(sock_path)
    mute.listen(1)
    try:
        with pytest.raises(ControlError, match=r"no reply within 0\.2s"):
            request(sock_path, {"cmd": "ping"}, timeout=0.2)
    finally:
        mute.close()


class Color(enum.Enum):
    RED = "red"


@dataclass(frozen=True)
class Snap:
    name: str
    pairs: tuple[tuple[str, int], ...]
    color: Color
    inner: Snap | None = None


def test_jsonable_turns_snapshots_into_plain_values():
    snap = Snap("a", (("x", 1),), Color.RED, Snap("b", (), Color.RED))
    assert jsonable(snap) == {
        "name": "a", "pairs": [["x", 1]], "color": "red",
        "inner": {"name": "b", "pairs": [], "color": "red", "inner": None},
    }  # fmt: skip
    assert jsonable({1: frozenset({3})}) == {"1": [3]}
