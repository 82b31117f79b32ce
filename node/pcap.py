"""Read and write capture files without third-party libraries.

Reading yields one :class:`PcapRecord` per captured frame, holding the IP
packet with its link-layer header removed, ready for ``node.packet.parse``.

Formats: classic libpcap (both byte orders, microsecond magic 0xA1B2C3D4 and
nanosecond magic 0xA1B23C4D) and pcapng (Section Header, Interface
Description, Enhanced Packet, Simple Packet and the obsolete Packet block;
other blocks are skipped; several sections may follow each other, each with
its own byte order and interfaces).  Sources: the pcap and pcapng IETF
drafts (draft-ietf-opsawg-pcap, draft-ietf-opsawg-pcapng) and
https://www.tcpdump.org/linktypes.html.

Link types: RAW (101), IPV4 (228), IPV6 (229): the frame is the packet;
ETHERNET (1): 14-byte header, then up to two 802.1Q/802.1ad tags;
LINUX_SLL (113, 16-byte header) and LINUX_SLL2 (276, 20-byte header), what
``tcpdump -i any`` writes, with the same tag handling.  Trailing link bytes
(Ethernet padding, FCS) stay in ``data``: the IP parser uses the IP length
fields and ignores them.

A frame that holds no IP packet is still yielded, with ``data=None`` and
``link_error`` set to a stable token, then ``": "`` and a detail:

* ``unsupported-linktype`` -- a link type not listed above.
* ``non-ip`` -- an ethertype other than IPv4 (0x0800) or IPv6 (0x86DD).
* ``link-truncated`` -- the frame is shorter than its link-layer header.
* ``vlan-too-deep`` -- more than two VLAN tags.

A file that is not a capture, or that is cut or corrupt inside a header or a
record, raises :class:`PcapError` (records before the damage are yielded
first; the message names the record).  ``OSError`` from opening or reading
the file propagates unchanged.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

from node.errors import BadInput, Misuse

__all__ = [
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_RAW",
    "PcapError",
    "PcapRecord",
    "iter_pcap",
    "link_payload",
    "read_pcap",
    "write_pcap",
]

LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
LINKTYPE_LINUX_SLL2: Final = 276

_IP_ETHERTYPES: Final = frozenset({0x0800, 0x86DD})
_VLAN_ETHERTYPES: Final = frozenset({0x8100, 0x88A8, 0x9100})  # 802.1Q, 802.1ad, legacy QinQ
MAX_VLAN_TAGS: Final = 2

# libpcap refuses records above its MAXIMUM_SNAPLEN (262144); so do we, so
# that a corrupt length cannot make us allocate gigabytes.
MAX_RECORD_BYTES: Final = 262144
MAX_BLOCK_BYTES: Final = 16 * 1024 * 1024  # pcapng blocks also hold options

_PCAP_MAGIC_US: Final = 0xA1B2C3D4
_PCAP_MAGIC_NS: Final = 0xA1B23C4D
_SHB_TYPE: Final = b"\x0a\x0d\x0d\x0a"  # same in both byte orders
_BOM_BIG: Final = b"\x1a\x2b\x3c\x4d"
_BOM_LITTLE: Final = b"\x4d\x3c\x2b\x1a"
_IDB, _PB, _SPB, _EPB = 1, 2, 3, 6

_ETHERTYPE: Final = struct.Struct("!H")


class PcapError(BadInput):
    """The file is not a capture file, or is truncated or corrupt."""


@dataclass(frozen=True, slots=True)
class PcapRecord:
    index: int  # 1-based frame number, as tcpdump -# and Wireshark count
    ts: float  # capture time, seconds since the epoch
    data: bytes | None  # the IP packet without link header; None if there is none
    link_error: str | None  # why data is None: "<token>: <detail>" (module docstring)


def read_pcap(path: str | os.PathLike[str]) -> Iterator[PcapRecord]:
    """Records of the pcap or pcapng file at ``path``, in file order."""
    with open(path, "rb") as stream:
        yield from iter_pcap(stream)


def iter_pcap(stream: BinaryIO) -> Iterator[PcapRecord]:
    """Records of a pcap or pcapng file read from a binary stream (e.g. stdin)."""
    magic = stream.read(4)
    if len(magic) < 4:
        raise PcapError(f"not a capture file: only {len(magic)} bytes")
    if magic == _SHB_TYPE:
        yield from _read_pcapng(stream)
        return
    for endian in "<>":
        value = struct.unpack(endian + "I", magic)[0]
        if value in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
            scale = 1e-6 if value == _PCAP_MAGIC_US else 1e-9
            yield from _read_classic(stream, endian, scale)
            return
    raise PcapError(f"not a pcap or pcapng file (magic {magic.hex()})")


def _read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise PcapError(f"truncated {what}: {len(data)} of {size} bytes")
    return data


# --- classic libpcap -----------------------------------------------------------


def _read_classic(stream: BinaryIO, endian: str, scale: float) -> Iterator[PcapRecord]:
    header = _read_exact(stream, 20, "file header")
    major, _minor, _zone, _sigfigs, _snaplen, network = struct.unpack(endian + "HHiIII", header)
    if major != 2:
        raise PcapError(f"unsupported pcap version {major}")
    linktype = network & 0xFFFF  # upper bits carry FCS information
    record = struct.Struct(endian + "IIII")
    index = 0
    while True:
        head = stream.read(16)
        if not head:
            return
        index += 1
        if len(head) < 16:
            raise PcapError(f"record {index}: truncated record header, {len(head)} of 16 bytes")
        sec, frac, caplen, _origlen = record.unpack(head)
        if caplen > MAX_RECORD_BYTES:
            raise PcapError(f"record {index}: captured length {caplen} > {MAX_RECORD_BYTES}")
        frame = _read_exact(stream, caplen, f"record {index} data")
        yield _record(index, sec + frac * scale, linktype, frame)


# --- pcapng --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Interface:
    linktype: int  # LINKTYPE_* of frames captured on this interface
    snaplen: int  # 0 means unlimited
    units_per_second: int  # from if_tsresol; default microseconds
    offset: int  # if_tsoffset: seconds added to every timestamp


def _read_pcapng(stream: BinaryIO) -> Iterator[PcapRecord]:
    """Blocks after the first Section Header Block type (already read)."""
    index = 0
    endian = ">"
    interfaces: list[_Interface] = []
    last_ts = 0.0
    block_type: bytes | None = _SHB_TYPE
    while True:
        if block_type is None:
            block_type = stream.read(4)
            if not block_type:
                return
            if len(block_type) < 4:
                raise PcapError(f"truncated block header after record {index}")
        where = f"block after record {index}"
        if block_type == _SHB_TYPE:
            endian, body = _section_header(stream, where)
            interfaces = []
        else:
            kind = struct.unpack(endian + "I", block_type)[0]
            body = _block_body(stream, endian, where)
            if kind == _IDB:
                interfaces.append(_interface(body, endian, where))
            elif kind in (_EPB, _SPB, _PB):
                index += 1
                ts, linktype, frame = _packet_block(kind, body, endian, interfaces, last_ts, index)
                last_ts = ts
                yield _record(index, ts, linktype, frame)
        block_type = None


def _section_header(stream: BinaryIO, where: str) -> tuple[str, bytes]:
    """Read an SHB after its type: (byte order, body after the byte-order magic)."""
    head = _read_exact(stream, 8, f"section header ({where})")
    bom = head[4:]
    if bom == _BOM_BIG:
        endian = ">"
    elif bom == _BOM_LITTLE:
        endian = "<"
    else:
        raise PcapError(f"bad pcapng byte-order magic {bom.hex()} ({where})")
    length = struct.unpack(endian + "I", head[:4])[0]
    body = _block_rest(stream, endian, length, 16, where)
    if len(body) < 12:
        raise PcapError(f"section header too short ({where})")
    major = struct.unpack_from(endian + "H", body)[0]
    if major != 1:
        raise PcapError(f"unsupported pcapng version {major} ({where})")
    return endian, body


def _block_body(stream: BinaryIO, endian: str, where: str) -> bytes:
    length = struct.unpack(endian + "I", _read_exact(stream, 4, f"block length ({where})"))[0]
    return _block_rest(stream, endian, length, 12, where)


def _block_rest(stream: BinaryIO, endian: str, length: int, minimum: int, where: str) -> bytes:
    """The rest of a block of total ``length`` whose first ``minimum - 4`` bytes are read."""
    if length % 4 or length < minimum or length > MAX_BLOCK_BYTES:
        raise PcapError(f"bad block length {length} ({where})")
    body = _read_exact(stream, length - minimum, f"block ({where})")
    trailer = struct.unpack(endian + "I", _read_exact(stream, 4, f"block trailer ({where})"))[0]
    if trailer != length:
        raise PcapError(f"block length {length} but trailer says {trailer} ({where})")
    return body


def _interface(body: bytes, endian: str, where: str) -> _Interface:
    if len(body) < 8:
        raise PcapError(f"interface description too short ({where})")
    linktype, _reserved, snaplen = struct.unpack_from(endian + "HHI", body)
    units, offset = 10**6, 0
    for code, value in _options(body, 8, endian, where):
        if code == 9 and len(value) >= 1:  # if_tsresol
            exponent = value[0] & 0x7F
            units = 2**exponent if value[0] & 0x80 else 10**exponent
        elif code == 14 and len(value) >= 8:  # if_tsoffset
            offset = struct.unpack_from(endian + "q", value)[0]
    return _Interface(linktype, snaplen, units, offset)


def _options(body: bytes, off: int, endian: str, where: str) -> Iterator[tuple[int, bytes]]:
    layout = struct.Struct(endian + "HH")
    while off + 4 <= len(body):
        code, size = layout.unpack_from(body, off)
        if code == 0:  # opt_endofopt
            return
        off += 4
        if off + size > len(body):
            raise PcapError(f"option {code} runs past its block ({where})")
        yield code, body[off : off + size]
        off += (size + 3) & ~3


def _packet_block(
    kind: int, body: bytes, endian: str, interfaces: list[_Interface], last_ts: float, index: int
) -> tuple[float, int, bytes]:
    """(timestamp, linktype, frame) of an EPB, SPB or obsolete PB."""
    if kind == _SPB:
        if len(body) < 4 or not interfaces:
            raise PcapError(f"record {index}: bad simple packet block")
        iface = interfaces[0]
        origlen = struct.unpack_from(endian + "I", body)[0]
        caplen = min(origlen, len(body) - 4)
        if iface.snaplen:
            caplen = min(caplen, iface.snaplen)
        # an SPB has no timestamp; keep time monotonic for replay
        return last_ts, iface.linktype, body[4 : 4 + caplen]
    if len(body) < 20:
        raise PcapError(f"record {index}: packet block too short")
    if kind == _EPB:
        if_id, ts_high, ts_low, caplen, _origlen = struct.unpack_from(endian + "IIIII", body)
    else:
        if_id, _drops, ts_high, ts_low, caplen, _origlen = struct.unpack_from(
            endian + "HHIIII", body
        )
    if if_id >= len(interfaces):
        raise PcapError(f"record {index}: unknown interface {if_id}")
    if caplen > len(body) - 20 or caplen > MAX_RECORD_BYTES:
        raise PcapError(f"record {index}: captured length {caplen} exceeds its block")
    iface = interfaces[if_id]
    ts = ((ts_high << 32) | ts_low) / iface.units_per_second + iface.offset
    return ts, iface.linktype, body[20 : 20 + caplen]


# --- link layer ----------------------------------------------------------------


def _record(index: int, ts: float, linktype: int, frame: bytes) -> PcapRecord:
    data, error = link_payload(linktype, frame)
    return PcapRecord(index, ts, data, error)


def link_payload(linktype: int, frame: bytes) -> tuple[bytes | None, str | None]:
    """(IP packet, None) from a captured frame, or (None, link error)."""
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return frame, None
    if linktype == LINKTYPE_ETHERNET:
        return _after_ethertype(frame, 12, 14)
    if linktype == LINKTYPE_LINUX_SLL:
        return _after_ethertype(frame, 14, 16)
    if linktype == LINKTYPE_LINUX_SLL2:
        return _after_ethertype(frame, 0, 20)
    return None, f"unsupported-linktype: {linktype}"


def _after_ethertype(
    frame: bytes, type_off: int, payload_off: int
) -> tuple[bytes | None, str | None]:
    """Payload after a link header whose ethertype is at ``type_off``; VLAN tags skipped."""
    if len(frame) < payload_off:
        return None, f"link-truncated: {len(frame)} bytes, header needs {payload_off}"
    ethertype = _ETHERTYPE.unpack_from(frame, type_off)[0]
    tags = 0
    while ethertype in _VLAN_ETHERTYPES:
        tags += 1
        if tags > MAX_VLAN_TAGS:
            return None, f"vlan-too-deep: more than {MAX_VLAN_TAGS} tags"
        if len(frame) < payload_off + 4:
            return None, f"link-truncated: {len(frame)} bytes, VLAN tag {tags} cut"
        ethertype = _ETHERTYPE.unpack_from(frame, payload_off + 2)[0]
        payload_off += 4
    if ethertype not in _IP_ETHERTYPES:
        return None, f"non-ip: ethertype 0x{ethertype:04x}"
    return frame[payload_off:], None


# --- writing -------------------------------------------------------------------


def write_pcap(
    path: str | os.PathLike[str],
    packets: Iterable[tuple[float, bytes]],
    linktype: int = LINKTYPE_RAW,
) -> int:
    """Write ``(timestamp, frame)`` pairs as a classic little-endian microsecond pcap.

    Returns the number of records written.  Frames are written as given (for
    ``LINKTYPE_RAW`` that is the IP packet).
    """
    count = 0
    with open(path, "wb") as stream:
        stream.write(
            struct.pack("<IHHiIII", _PCAP_MAGIC_US, 2, 4, 0, 0, MAX_RECORD_BYTES, linktype)
        )
        for ts, frame in packets:
            if len(frame) > MAX_RECORD_BYTES:
                raise Misuse(f"frame of {len(frame)} bytes exceeds {MAX_RECORD_BYTES}")
            sec, usec = divmod(round(ts * 1_000_000), 1_000_000)
            if not 0 <= sec < 2**32:
                raise Misuse(f"timestamp {ts!r} outside the pcap range")
            stream.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)))
            stream.write(frame)
            count += 1
    return count
