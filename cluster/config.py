"""The ``cluster`` section of a node file: etcd, the VIP pool, agent timings.

Built once from parsed YAML by :func:`agent_config_from_mapping` (the syncd
loader calls it for ``cluster:``), frozen, validated on construction.  Bad
input raises :class:`cluster.errors.BadInput` whose message starts with the
field path (``vips[1].home: ...``); the syncd loader prefixes ``cluster.``.

Example::

    cluster:
      etcd: {endpoint: 10.30.0.2:2379, lease_ttl: 1, timeout: 1.0}
      vips:
        - {address: 10.10.0.101/24, interface: out0, home: fw1}
        - {address: 10.20.0.101/24, interface: in0}        # no home: the ring decides
      rules_from_etcd: true      # read by the filter (RulesetFollower), not the agent
      status_interval: 1.0
      require_filter: true       # stay syncing until the filter reports synced
      join_grace: 6.0            # a new member is not suspected before it was heard or this passed
      drain_timeout: 10.0
      takeover_guard: 0.02
      holders_interval: 0.25
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cluster.errors import BadInput
from cluster.etcd import EtcdConfig
from cluster.vip import parse_vip

__all__ = ["AgentConfig", "VipSpec", "agent_config_from_mapping"]

_IFNAME: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_NODE_ID: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")  # syncd's node ids


@dataclass(frozen=True, slots=True)
class VipSpec:
    # addr or addr/prefix; the prefix is what goes on the interface.
    address: str
    # Interface the address is added to (in syncd's own network namespace).
    interface: str
    # Node that holds it whenever that node is up; None: the ring decides.
    home: str | None = None

    def __post_init__(self) -> None:
        parse_vip(self.address)  # BadInput for bad text
        if not _IFNAME.fullmatch(self.interface):
            raise BadInput(f"interface {self.interface!r} is not an interface name")
        if self.home is not None and not _NODE_ID.fullmatch(self.home):
            raise BadInput(f"home {self.home!r} is not a node id")

    @property
    def vip(self) -> str:
        """Canonical address text (the etcd claim key)."""
        return str(parse_vip(self.address).ip)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    # How to reach etcd and this node's lease TTL.
    etcd: EtcdConfig
    # The cluster-wide VIP pool (every node lists the same one).
    vips: tuple[VipSpec, ...] = ()
    # The filter follows rules/current in etcd; the agent only reports it.
    rules_from_etcd: bool = False
    # Seconds between status publications (also written on every state change).
    status_interval: float = 1.0
    # Stay syncing until the filter's control socket reports synced.  Only
    # labs without a filter turn it off: a node up without its filter's
    # table would own flows it cannot forward.
    require_filter: bool = True
    # A member never heard since it joined is suspected only after this
    # long: a starting syncd pulls its own flows (recovery_timeout) before
    # it accepts streams, so it is silent by design for that time.
    join_grace: float = 8.0
    # Longest wait in draining for the other nodes to take the VIPs.
    drain_timeout: float = 10.0
    # After a peer's record vanished, wait this long before claiming the VIPs
    # it held.  A revoked node that is alive stops answering ARP for them
    # when the revoker's notice reaches its beacon thread (sent at once;
    # syncd.beacon_io), but a node cut off from its peers only (etcd still
    # reachable) never gets the notice: it learns from its own watch and
    # takes its addresses off from its event loop.  10 ms was too short for
    # that (chaos sync-partition: two holders for 10 ms); 20 ms is not.
    takeover_guard: float = 0.02
    # Seconds between VIP holder listings when nothing else prompts one.
    holders_interval: float = 0.25
    # Agent loop period; a loop late by more than stall_after is a stall.
    # The loop also wakes at the agent's own deadlines (a peer's suspicion
    # window ending, a takeover guard ending: Agent.next_deadline), so a
    # takeover does not wait for the tick grid; the tick bounds how late
    # everything else (etcd results, filter state) is looked at.
    tick: float = 0.01
    # A loop stall longer than this fences the node (VIPs off, re-register):
    # peers may have revoked us meanwhile.  None: lease TTL / 2.
    stall_after: float | None = None
    # Seconds between reads of the filter's stats (its "synced" flag).
    filter_poll: float = 0.25
    # ARP announcements / unsolicited NAs sent per acquired VIP.
    announcements: int = 3
    # Kernel lifetime of VIP addresses, seconds, renewed every lifetime / 4
    # while held (0: permanent).  A node that stops running (frozen, hung)
    # keeps answering ARP for its VIPs until they expire: this bounds that
    # window, which fencing cannot (a frozen process fences nothing).
    vip_lifetime: int = 2
    # When every peer has fallen silent, stop answering ARP for our VIPs and
    # ask etcd, with this deadline (seconds), whether we can still reach it:
    # an answer turns ARP back on; none keeps it off (we may be the isolated
    # side, and the peers claim our VIPs within suspect_after + revoke +
    # takeover_guard) and the next probe waits twice as long.
    isolation_probe: float = 0.05
    # Seconds of silence (no sync message, no UDP beacon) before a peer is a
    # suspect.  None: 0.1 s when syncd runs beacons (10 of them missed),
    # else the sync session's suspect_after (its heartbeats every 50 ms).
    suspect_after: float | None = None
    # ARP dead-man switch (cluster.arpguard): seconds after the agent's last
    # keepalive frame (sent every arp_guard / 5) at which this node's kernel
    # stops sending ARP for the VIPs: a frozen agent stops speaking for them.
    # The peers take a departed holder's VIPs over no sooner than this (plus
    # one beacon interval) after they last heard it, so a frozen holder never
    # answers ARP beside the taker: longer slows every failover, shorter
    # pauses ARP on a live node whose loop stalls that long (harmless while
    # routers' entries are fresh; their probes are retried).  0: off.
    arp_guard: float = 0.15

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for spec in self.vips:
            if spec.vip in seen:
                raise BadInput(f"vips: {spec.vip} listed twice")
            seen.add(spec.vip)
        for name in ("status_interval", "join_grace", "drain_timeout", "holders_interval"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise BadInput(f"{name}: must be in (0, 3600] s, not {value}")
        if not 0 <= self.takeover_guard <= 10:
            raise BadInput(f"takeover_guard: must be 0..10 s, not {self.takeover_guard}")
        if not 0.001 <= self.tick <= 1:
            raise BadInput(f"tick: must be 0.001..1 s, not {self.tick}")
        if not 0 < self.filter_poll <= 60:
            raise BadInput(f"filter_poll: must be in (0, 60] s, not {self.filter_poll}")
        if self.stall_after is not None and not self.tick < self.stall_after <= 60:
            raise BadInput(f"stall_after: must be in (tick, 60] s, not {self.stall_after}")
        if self.vip_lifetime != 0 and not 2 <= self.vip_lifetime <= 3600:
            raise BadInput(f"vip_lifetime: must be 0 or 2..3600 s, not {self.vip_lifetime}")
        if self.suspect_after is not None and not 0.02 <= self.suspect_after <= 60:
            raise BadInput(f"suspect_after: must be 0.02..60 s, not {self.suspect_after}")
        if self.arp_guard != 0 and not 0.1 <= self.arp_guard <= 60:
            raise BadInput(f"arp_guard: must be 0 (off) or 0.1..60 s, not {self.arp_guard}")
        if not 0.001 <= self.isolation_probe <= 1:
            raise BadInput(f"isolation_probe: must be 0.001..1 s, not {self.isolation_probe}")
        if not 1 <= self.announcements <= 10:
            raise BadInput(f"announcements: must be 1..10, not {self.announcements}")

    @property
    def stall_limit(self) -> float:
        return self.stall_after if self.stall_after is not None else self.etcd.lease_ttl / 2

    def spec(self, vip: str) -> VipSpec:
        for spec in self.vips:
            if spec.vip == vip:
                return spec
        raise KeyError(vip)


_ETCD_KEYS: Final = {
    "endpoint": str, "timeout": float, "lease_ttl": int, "keepalive_interval": float,
    "register_wait": float,
}  # fmt: skip
_TOP_KEYS: Final = {
    "etcd": dict, "vips": list, "rules_from_etcd": bool, "status_interval": float,
    "require_filter": bool, "join_grace": float, "drain_timeout": float,
    "takeover_guard": float, "holders_interval": float, "tick": float, "stall_after": float,
    "filter_poll": float, "announcements": int, "vip_lifetime": int,
    "isolation_probe": float, "suspect_after": float, "arp_guard": float,
}  # fmt: skip
_VIP_KEYS: Final = {"address": str, "interface": str, "home": str}


def agent_config_from_mapping(raw: Mapping[str, Any]) -> AgentConfig:
    """Build an :class:`AgentConfig` from the parsed ``cluster`` section."""
    if not isinstance(raw, Mapping):
        raise BadInput("expected a mapping")
    values = _typed("", raw, _TOP_KEYS)
    if "etcd" not in values:
        raise BadInput("etcd: required (endpoint, lease_ttl, timeout)")
    etcd = _typed("etcd", values["etcd"], _ETCD_KEYS)
    if "endpoint" not in etcd:
        raise BadInput("etcd.endpoint: required, HOST:PORT")
    try:
        values["etcd"] = EtcdConfig(**etcd)
    except BadInput as exc:
        raise BadInput(f"etcd: {exc}") from None
    vips = []
    for i, item in enumerate(values.get("vips", [])):
        where = f"vips[{i}]"
        if not isinstance(item, Mapping):
            raise BadInput(f"{where}: expected a mapping with address and interface")
        spec = _typed(where, item, _VIP_KEYS)
        for required in ("address", "interface"):
            if required not in spec:
                raise BadInput(f"{where}.{required}: required")
        try:
            vips.append(VipSpec(**spec))
        except BadInput as exc:
            raise BadInput(f"{where}: {exc}") from None
    values["vips"] = tuple(vips)
    return AgentConfig(**values)


def _typed(section: str, raw: Mapping[str, Any], types: Mapping[str, type]) -> dict[str, Any]:
    prefix = f"{section}." if section else ""
    if not isinstance(raw, Mapping):
        raise BadInput(f"{section}: expected a mapping")
    unknown = sorted(str(k) for k in raw if k not in types)
    if unknown:
        raise BadInput(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(types))})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        want = types[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want in (int, float) and isinstance(value, bool)):
            raise BadInput(f"{prefix}{key}: expected {want.__name__}, got {value!r}")
        values[key] = value
    return values
