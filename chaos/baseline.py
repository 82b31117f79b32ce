"""The comparison system: keepalived (VRRP) + conntrackd (FTFW) on the same lab.

Failover figures mean little alone; issue #5 asks for the same trials, on
the same topology and in the same run, with the tools people use today.
This module writes their configuration (pure: values in, text out); the
lab starts them in the firewall namespaces instead of ``stockade node run``.

The set-up mirrors what a careful operator would deploy:

* **VRRP per VIP.**  Each of the lab's VIPs is one ``vrrp_instance`` whose
  highest priority is the VIP's home node, so placement matches Stockade's
  (one outside and one inside VIP per node, both on the home node).  The
  two VIPs of a home are in one ``vrrp_sync_group`` so they move together.
  ``advert_int`` is the knob that sets detection time (VRRPv2/v3: master
  down after 3 x advert_int + skew, RFC 5798 section 6.1); keepalived
  accepts fractions with VRRPv3.
* **conntrackd, FTFW, no external cache.**  Every node's conntrackd sends
  its kernel's conntrack events to the others over multicast on the
  management segment (FTFW: sequence numbers and NACK-driven resends) and,
  with ``DisableExternalCache``, writes the peers' entries straight into its
  own kernel table.  So a node that takes a VIP already holds the flows:
  nothing to commit in a notify script, which is the fastest conntrackd can
  be.  Each instance needs its own lock file and unix socket (they share a
  filesystem).
* **Stateful kernel rules.**  ESTABLISHED/RELATED accepted, INVALID dropped,
  NEW only from the client side, and ``nf_conntrack_tcp_loose = 0``: with
  loose pick-up a node accepts a mid-stream segment without any synced
  state, which would measure the routers, not the state sync.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BaselineNode",
    "BaselineVip",
    "conntrackd_conf",
    "iptables_rules",
    "keepalived_conf",
]

MULTICAST_GROUP: Final = "225.0.0.50"
MULTICAST_PORT: Final = 3780
_PRIORITY_HOME: Final = 150
_PRIORITY_OTHER: Final = 100


@dataclass(frozen=True, slots=True)
class BaselineVip:
    address: str  # "10.231.10.101/24"
    interface: str  # interface name on every node ("out0")
    home: str  # node that should hold it while up

    def __post_init__(self) -> None:
        ipaddress.ip_interface(self.address)  # ValueError for junk


@dataclass(frozen=True, slots=True)
class BaselineNode:
    name: str  # "fw1"
    index: int  # 1-based: priorities fall off by distance from the home
    mgmt_interface: str  # carries the conntrackd multicast
    mgmt_address: str  # IPv4 address on it, no prefix
    state_dir: str  # lock file, unix socket, logs of this node's daemons


def _priority(node: BaselineNode, vip: BaselineVip, nodes: Sequence[BaselineNode]) -> int:
    """Home first; the others in a fixed order so that failover is deterministic."""
    if vip.home == node.name:
        return _PRIORITY_HOME
    home = next((n.index for n in nodes if n.name == vip.home), 0)
    distance = (node.index - home) % max(len(nodes), 1)
    return _PRIORITY_OTHER - distance


def keepalived_conf(
    node: BaselineNode,
    nodes: Sequence[BaselineNode],
    vips: Sequence[BaselineVip],
    advert_int: float,
) -> str:
    """keepalived.conf for ``node``: one VRRPv3 instance per VIP, grouped by home."""
    if not 0.01 <= advert_int <= 255:
        raise ValueError(f"advert_int {advert_int} is not in [0.01, 255]")
    lines = [
        "global_defs {",
        f"    router_id {node.name}",
        "    vrrp_version 3",  # fractional advert_int needs VRRPv3
        "    vrrp_garp_master_delay 0",
        "    vrrp_garp_master_repeat 3",
        "    script_user root",
        # The VRRP process ahead of the lab's Python processes for the CPU:
        # at advert_int 0.1 a master descheduled for 0.34 s is declared dead,
        # and the lab machine has 2 cores shared with everything else.
        "    vrrp_priority -20",
        "}",
    ]
    homes: dict[str, list[str]] = {}
    for number, vip in enumerate(vips, start=1):
        name = f"VIP{number}"
        homes.setdefault(vip.home, []).append(name)
        lines += [
            f"vrrp_instance {name} {{",
            "    state BACKUP",
            f"    interface {vip.interface}",
            f"    virtual_router_id {number}",
            f"    priority {_priority(node, vip, nodes)}",
            f"    advert_int {advert_int:g}",
            "    virtual_ipaddress {",
            f"        {vip.address} dev {vip.interface}",
            "    }",
            "}",
        ]
    for home, names in sorted(homes.items()):
        lines += [f"vrrp_sync_group G_{home} {{", "    group {"]
        lines += [f"        {name}" for name in names]
        lines += ["    }", "}"]
    return "\n".join(lines) + "\n"


def conntrackd_conf(node: BaselineNode, ignore: Sequence[str], mode: str = "FTFW") -> str:
    """conntrackd.conf for ``node``: multicast sync, entries straight into the kernel.

    ``ignore`` lists addresses whose flows are not synced (the management
    segment's own traffic: etcd, the sync itself).

    ``mode`` FTFW (reliable: sequence numbers, NACK, resend) suits a pair.
    With three or more nodes on one multicast group FTFW's sequence tracking
    sees the senders' interleaved numbers as losses, and after a restart
    (numbers from 0) drops the restarted sender's messages: measured in the
    lab, a restarted node's new flows never reached its peers.  NOTRACK
    (no sequence tracking; on a lossless local segment nothing is lost) is
    the mode that works for N > 2.
    """
    if mode not in ("FTFW", "NOTRACK"):
        raise ValueError(f"conntrackd sync mode must be FTFW or NOTRACK, not {mode!r}")
    ignored = "\n".join(f"            IPv4_address {a}" for a in ("127.0.0.1", *ignore))
    extra = "        ResendQueueSize 131072\n" if mode == "FTFW" else ""
    return f"""Sync {{
    Mode {mode} {{
        DisableExternalCache On
{extra}    }}
    Multicast {{
        IPv4_address {MULTICAST_GROUP}
        Group {MULTICAST_PORT}
        IPv4_interface {node.mgmt_address}
        Interface {node.mgmt_interface}
        SndSocketBuffer 1249280
        RcvSocketBuffer 1249280
        Checksum on
    }}
}}
General {{
    HashSize 32768
    HashLimit 131072
    Syslog off
    LogFile {node.state_dir}/conntrackd.log
    LockFile {node.state_dir}/conntrackd.lock
    UNIX {{
        Path {node.state_dir}/conntrackd.ctl
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
            ICMP
        }}
        Address Ignore {{
{ignored}
        }}
    }}
}}
"""


def iptables_rules(inside_in: str, outside_in: str, client_net: str) -> str:
    """iptables-restore input for a baseline node: a stateful FORWARD policy.

    New connections only from ``client_net`` entering on ``outside_in``
    towards ``inside_in``; everything else only as ESTABLISHED/RELATED.
    """
    ipaddress.ip_network(client_net)
    return "\n".join(
        [
            "*filter",
            ":FORWARD DROP [0:0]",
            "-A FORWARD -m conntrack --ctstate INVALID -j DROP",
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A FORWARD -i {outside_in} -o {inside_in} -s {client_net} "
            "-m conntrack --ctstate NEW -j ACCEPT",
            "COMMIT",
            "",
        ]
    )
