"""The nf_tables set element codec of ``chaos.samplers`` (the ARP guard's ``alive`` set).

Messages are built here from the uapi layouts (linux/netfilter/nfnetlink.h,
nf_tables.h), independently of the module's encoder; one reply is bytes the
6.18 kernel sent (captured in tests/integration/test_nft_alive.py's setting).
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chaos.errors import ChaosError
from chaos.samplers import nft_setelem_dump_request, parse_setelem_messages

HDR = struct.Struct("=IHHII")
NEWSETELEM = (10 << 8) | 12  # NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWSETELEM
NESTED = 0x8000  # NLA_F_NESTED

# One keepalive's element (v0, timeout 500 ms, 500 ms left), an empty
# trailing message, NLMSG_DONE: a reply to `nft_setelem_dump_request(2)`.
KERNEL_DUMP = bytes.fromhex(
    "6c0000000c0a020002000000b8070000050000021200010073746f636b6164655f7669707300"
    "00000a000200616c69766500000038000300340001001800010014000100763000000000000000"
    "000000000000000c00040000000000000001f40c00050000000000000001f4380000000c0a0200"
    "02000000b8070000050000021200010073746f636b6164655f766970730000000a000200616c69"
    "766500000004000300140000000300020002000000b807000000000000"
)


def _attr(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def _msg(kind: int, body: bytes, seq: int = 1) -> bytes:
    return HDR.pack(HDR.size + len(body), kind, 2, seq, 0) + body


def _elem(name: str, expiration_ms: int | None = None, nested: int = NESTED) -> bytes:
    key = _attr(1 | nested, _attr(1, name.encode().ljust(16, b"\0")))  # KEY > DATA_VALUE
    attrs = key + _attr(4, (500).to_bytes(8, "big"))  # NFTA_SET_ELEM_TIMEOUT, ignored
    if expiration_ms is not None:
        attrs += _attr(5, expiration_ms.to_bytes(8, "big"))  # NFTA_SET_ELEM_EXPIRATION
    return _attr(1 | nested, attrs)  # NFTA_LIST_ELEM


def _elements(*elems: bytes, seq: int = 1) -> bytes:
    body = struct.pack("=BBH", 5, 0, 0)
    body += _attr(1, b"stockade_vips\0") + _attr(2, b"alive\0")
    body += _attr(3 | NESTED, b"".join(elems))  # NFTA_SET_ELEM_LIST_ELEMENTS
    return _msg(NEWSETELEM, body, seq)


def _done(seq: int = 1) -> bytes:
    return _msg(3, struct.pack("=i", 0), seq)


def _error(code: int, seq: int = 1) -> bytes:
    return _msg(2, struct.pack("=i", code) + HDR.pack(44, 0x0A0D, 0x301, seq, 0), seq)


def test_request_is_a_getsetelem_dump_of_the_alive_set() -> None:
    req = nft_setelem_dump_request(7)
    length, kind, flags, seq, pid = HDR.unpack_from(req)
    assert (length, kind, flags, seq, pid) == (len(req), 0x0A0D, 0x301, 7, 0)
    assert req[16:20] == bytes([5, 0, 0, 0])  # nfgenmsg: NFPROTO_NETDEV, V0, res_id 0
    assert req[20:] == _attr(1, b"stockade_vips\0") + _attr(2, b"alive\0")
    assert len(req) % 4 == 0


def test_request_for_another_family_table_and_set() -> None:
    req = nft_setelem_dump_request(1, family=2, table="t", set="s12")
    assert req[16] == 2 and req[20:] == _attr(1, b"t\0") + _attr(2, b"s12\0")


def test_parse_the_kernels_reply() -> None:
    assert parse_setelem_messages(KERNEL_DUMP) == ({"v0"}, True, None)
    assert parse_setelem_messages(KERNEL_DUMP, seq=2) == ({"v0"}, True, None)


def test_parse_elements_across_batches() -> None:
    first = _elements(_elem("up0", 300), _elem("up1")) + _elements(_elem("eth-a.10", 1))
    assert parse_setelem_messages(first) == ({"up0", "up1", "eth-a.10"}, False, None)
    assert parse_setelem_messages(_elements(_elem("up2")) + _done()) == ({"up2"}, True, None)
    assert parse_setelem_messages(_elements() + _done()) == (set(), True, None)


def test_flag_bits_on_attribute_types_are_ignored() -> None:
    plain = _elements(_elem("up0", nested=0)) + _done()
    assert parse_setelem_messages(plain) == ({"up0"}, True, None)


def test_an_expired_element_is_left_out() -> None:
    reply = _elements(_elem("gone", 0), _elem("kept", 1)) + _done()
    assert parse_setelem_messages(reply) == ({"kept"}, True, None)


def test_an_error_ends_the_dump_with_its_errno() -> None:
    assert parse_setelem_messages(_error(-errno.ENOENT)) == (set(), True, -errno.ENOENT)
    assert parse_setelem_messages(_error(-errno.EPERM)) == (set(), True, -errno.EPERM)


def test_messages_of_an_abandoned_dump_are_skipped() -> None:
    stale = _elements(_elem("old"), seq=4) + _done(seq=4)
    current = _elements(_elem("new"), seq=5)
    assert parse_setelem_messages(stale + current, seq=5) == ({"new"}, False, None)
    assert parse_setelem_messages(stale + _error(-2, seq=4), seq=5) == (set(), False, None)
    assert parse_setelem_messages(stale + current) == ({"old"}, True, None)  # no seq: first DONE


def test_a_key_that_is_no_interface_name_is_refused() -> None:
    ipv4_key = _attr(1, _attr(1 | NESTED, _attr(1, bytes([10, 0, 0, 1]))))
    with pytest.raises(ChaosError, match="4-byte key is no interface name"):
        parse_setelem_messages(_elements(ipv4_key))


def test_malformed_replies_are_refused() -> None:
    with pytest.raises(ChaosError, match="bad message length 500"):
        parse_setelem_messages(HDR.pack(500, NEWSETELEM, 0, 0, 0))
    with pytest.raises(ChaosError, match="bad attribute length"):
        parse_setelem_messages(_elements(struct.pack("=HH", 200, 1)))
    with pytest.raises(ChaosError, match="too short"):
        parse_setelem_messages(HDR.pack(16, 2, 0, 0, 0))


@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _returns_or_refuses(data)


@given(st.integers(0, len(KERNEL_DUMP) - 1), st.integers(0, 255), st.integers(1, len(KERNEL_DUMP)))
def test_fuzz_mutated_kernel_reply(pos: int, value: int, cut: int) -> None:
    mutated = bytearray(KERNEL_DUMP)
    mutated[pos] = value
    _returns_or_refuses(bytes(mutated[:cut]))


def _returns_or_refuses(data: bytes) -> None:
    try:
        names, done, error = parse_setelem_messages(data)
    except ChaosError:
        return
    assert isinstance(done, bool) and (error is None or isinstance(error, int))
    assert all(isinstance(n, str) and len(n) <= 16 for n in names)
