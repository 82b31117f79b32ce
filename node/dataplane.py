"""iptables/ip6tables chains that send packets to the node's NFQUEUE.

For each configured hook (FORWARD, INPUT, OUTPUT) and each address family
the node owns one chain, ``STK-<HOOK>``, reached by ONE jump inserted at
position 1 of the hook chain of the ``filter`` table and tagged
``-m comment --comment stockade:<node_id>``.  Everything is written with
``iptables-restore --noflush`` so each family changes in one atomic
transaction (the kernel never sees half a chain).

Chain content, in order (why the order matters: a packet re-injected with
``NF_REPEAT`` traverses the hook again from the top, so the mark tests must
come before the NFQUEUE rule or the packet would loop)::

    mark REJECT  & tcp -> REJECT --reject-with tcp-reset
    mark REJECT        -> REJECT --reject-with icmp(6)-port-unreachable
    mark OFFLOAD       -> STK-OFFLOAD  (connmark |= FAST, mark &= ~OFFLOAD, ACCEPT)
    mark UNOFFLOAD     -> STK-UNOFFLOAD (connmark &= ~FAST, mark &= ~UNOFFLOAD, ACCEPT)
    connmark FAST, ctstate ESTABLISHED, tcp without SYN/FIN/RST (or udp),
      above <sample_per_second>/s per flow direction (hashlimit) -> ACCEPT
    (any ctstate) -> NFQUEUE --queue-num N [--queue-bypass]

The fast-path rule lets the kernel accept the ordinary data packets of flows
the engine has accepted and seen established, while every SYN/FIN/RST, every
packet the kernel's conntrack calls INVALID and a per-flow sample still reach
the engine, so its flow table stays the source of truth and sees each
offloaded flow alive.  When a FIN or RST of an offloaded flow reaches the
engine, its accept is re-injected with UNOFFLOAD, which clears FAST in the
same verdict: the rest of the close (the last ACK) is queued again, with no
race against a later netlink update.  The offload/FAST rules are left out
when the fast path is disabled.

Mark bits (:class:`MarkBits`) are single bits chosen high in the 32-bit
space so they do not collide with marks an operator already uses; the
adapter ORs them into the packet's existing mark (``nfq_set_verdict2``
replaces the whole mark) and the offload chain clears its bit again before
the packet leaves.

Stale state from a previous run killed with SIGKILL is removed first on
``install()``: every rule of a built-in chain that jumps to an ``STK-``
chain, then the ``STK-`` chains themselves.  One node per network namespace.

Loopback is excluded from the INPUT/OUTPUT jumps (``! -i lo`` / ``! -o lo``):
local IPC must not depend on the filter process being alive.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node.config import NodeConfig
from node.errors import ConfigError, DataplaneError

CHAIN_PREFIX = "STK-"
OFFLOAD_CHAIN = "STK-OFFLOAD"
UNOFFLOAD_CHAIN = "STK-UNOFFLOAD"
# xt_hashlimit keeps names in a 16-byte array including the NUL.
HASHLIMIT_NAME_MAX = 15
# xt_hashlimit refuses tables larger than this (HASHLIMIT_MAX_SIZE).
HASHLIMIT_MAX_ENTRIES = 1 << 20
# A full hashlimit table makes the match hot-drop the packet, so it is sized
# for two directions per flow of a full flow table (floor: kernel default).
HASHLIMIT_MIN_ENTRIES = 8192
HASHLIMIT_MAX_BUCKETS = 1 << 16
COMMAND_TIMEOUT = 30.0
# Matches every packet (each has exactly one of these states).  It is on the
# NFQUEUE rule so the namespace's conntrack, and with it IP defragmentation
# (nf_defrag_ipv4/6), is active even with the fast path off: the engine
# expects whole datagrams, and a namespace tracks only once a rule asks.
ANY_CTSTATE = "-m conntrack --ctstate INVALID,NEW,ESTABLISHED,RELATED,UNTRACKED"


@dataclass(frozen=True, slots=True)
class MarkBits:
    # Packet-mark bit of a packet the engine REJECTs, re-injected with
    # NF_REPEAT so the kernel's REJECT target answers it (RST / ICMP).
    reject: int = 0x10000000
    # Packet-mark bit of an accepted packet whose flow goes to the fast path:
    # re-injected so CONNMARK can set FAST on the kernel conntrack entry.
    offload: int = 0x20000000
    # Conntrack-mark bit meaning "the engine handed this flow to the kernel".
    fast: int = 0x40000000
    # Packet-mark bit of an accepted FIN/RST of an offloaded flow: re-injected
    # so CONNMARK clears FAST before the packet leaves.
    unoffload: int = 0x08000000

    def __post_init__(self) -> None:
        names = ("reject", "offload", "fast", "unoffload")
        for name in names:
            value = getattr(self, name)
            if value <= 0 or value >= 1 << 32 or value & (value - 1):
                raise ConfigError(f"marks.{name} must be a single bit of 32, not {value:#x}")
        if len({getattr(self, name) for name in names}) != len(names):
            raise ConfigError("marks.reject, .offload, .fast and .unoffload must differ")


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # "ipv4" / "ipv6", for messages
    restore: str  # iptables-restore binary
    save: str  # iptables-save binary
    reject_with: str  # ICMP answer of a non-TCP reject


def families(variant: str = "") -> tuple[Family, Family]:
    """The two command sets; ``variant`` "" uses the host's alternatives choice.

    ``variant`` "nft" or "legacy" forces ``iptables-nft-restore`` and so on.
    """
    if variant not in ("", "nft", "legacy"):
        raise ConfigError(f"iptables variant must be '', 'nft' or 'legacy', not {variant!r}")
    suffix = f"-{variant}" if variant else ""
    return (
        Family("ipv4", f"iptables{suffix}-restore", f"iptables{suffix}-save",
               "icmp-port-unreachable"),
        Family("ipv6", f"ip6tables{suffix}-restore", f"ip6tables{suffix}-save",
               "icmp6-port-unreachable"),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


# Runs argv with the given stdin; the seam unit tests replace.
Runner = Callable[[Sequence[str], str], CommandResult]


TCP_LOOSE = "net/netfilter/nf_conntrack_tcp_loose"


class SysctlAccess(Protocol):
    def read(self, key: str) -> str: ...

    def write(self, key: str, value: str) -> None: ...


class ProcSysctl:
    """/proc/sys of the calling process's network namespace."""

    def read(self, key: str) -> str:
        try:
            return Path("/proc/sys", key).read_text().strip()
        except OSError as e:
            raise DataplaneError(f"cannot read sysctl {key}: {e.strerror}") from e

    def write(self, key: str, value: str) -> None:
        try:
            Path("/proc/sys", key).write_text(value + "\n")
        except OSError as e:
            raise DataplaneError(f"cannot set sysctl {key}={value}: {e.strerror}") from e


def run_command(argv: Sequence[str], stdin: str) -> CommandResult:
    """Run one iptables tool; a missing binary or a hang is a DataplaneError."""
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT, check=False,
        )  # fmt: skip
    except FileNotFoundError as e:
        raise DataplaneError(f"{argv[0]}: not found (install iptables)") from e
    except subprocess.TimeoutExpired as e:
        raise DataplaneError(f"{' '.join(argv)}: no answer within {COMMAND_TIMEOUT:g}s") from e
    return CommandResult(done.returncode, done.stdout, done.stderr)


def chain_name(hook: str) -> str:
    return f"{CHAIN_PREFIX}{hook}"


def jump_comment(node_id: str) -> str:
    return f"stockade:{node_id}"


def hashlimit_name(node_id: str, hook: str) -> str:
    """A per-node, per-hook hashlimit table name within the kernel's 15 chars."""
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:6]
    name = f"stk-{digest}-{hook[:3].lower()}"
    assert len(name) <= HASHLIMIT_NAME_MAX
    return name


def _hashlimit_sizes(capacity: int) -> tuple[int, int]:
    entries = min(HASHLIMIT_MAX_ENTRIES, max(HASHLIMIT_MIN_ENTRIES, 2 * capacity))
    buckets = min(HASHLIMIT_MAX_BUCKETS, max(1024, entries // 8))
    return entries, buckets


def _mark(bit: int) -> str:
    return f"{bit:#x}/{bit:#x}"


def _fast_path_rules(chain: str, hook: str, config: NodeConfig, marks: MarkBits) -> list[str]:
    entries, buckets = _hashlimit_sizes(config.table.capacity)
    sample = (
        f"-m hashlimit --hashlimit-above {config.fast_path.sample_per_second}/sec"
        " --hashlimit-burst 1 --hashlimit-mode srcip,dstip,srcport,dstport"
        f" --hashlimit-name {hashlimit_name(config.node_id, hook)}"
        f" --hashlimit-htable-max {entries} --hashlimit-htable-size {buckets}"
    )
    kernel_established = (
        f"-m connmark --mark {_mark(marks.fast)} -m conntrack --ctstate ESTABLISHED"
    )
    return [
        f"-A {chain} -m mark --mark {_mark(marks.offload)} -j {OFFLOAD_CHAIN}",
        f"-A {chain} -m mark --mark {_mark(marks.unoffload)} -j {UNOFFLOAD_CHAIN}",
        f"-A {chain} -p tcp {kernel_established} --tcp-flags SYN,FIN,RST NONE {sample} -j ACCEPT",
        f"-A {chain} -p udp {kernel_established} {sample} -j ACCEPT",
    ]


def _jump_rule(hook: str, node_id: str) -> str:
    skip_loopback = {"INPUT": "! -i lo ", "OUTPUT": "! -o lo "}.get(hook, "")
    return (
        f"-I {hook} 1 {skip_loopback}-m comment --comment {jump_comment(node_id)}"
        f" -j {chain_name(hook)}"
    )


def install_batch(config: NodeConfig, marks: MarkBits, family: Family) -> str:
    """The iptables-restore --noflush input that creates our chains and jumps."""
    fast = config.fast_path.enabled
    chains = [chain_name(h) for h in config.hooks]
    chains += [OFFLOAD_CHAIN, UNOFFLOAD_CHAIN] if fast else []
    lines = ["*filter", *(f":{c} - [0:0]" for c in chains)]
    if fast:
        lines += [
            f"-A {OFFLOAD_CHAIN} -j CONNMARK --set-xmark {_mark(marks.fast)}",
            f"-A {OFFLOAD_CHAIN} -j MARK --set-xmark 0x0/{marks.offload:#x}",
            f"-A {OFFLOAD_CHAIN} -j ACCEPT",
            f"-A {UNOFFLOAD_CHAIN} -j CONNMARK --set-xmark 0x0/{marks.fast:#x}",
            f"-A {UNOFFLOAD_CHAIN} -j MARK --set-xmark 0x0/{marks.unoffload:#x}",
            f"-A {UNOFFLOAD_CHAIN} -j ACCEPT",
        ]
    bypass = " --queue-bypass" if config.queue.bypass else ""
    for hook in config.hooks:
        chain = chain_name(hook)
        lines += [
            f"-A {chain} -m mark --mark {_mark(marks.reject)} -p tcp"
            " -j REJECT --reject-with tcp-reset",
            f"-A {chain} -m mark --mark {_mark(marks.reject)}"
            f" -j REJECT --reject-with {family.reject_with}",
        ]
        if fast:
            lines += _fast_path_rules(chain, hook, config, marks)
        lines.append(f"-A {chain} {ANY_CTSTATE} -j NFQUEUE --queue-num {config.queue.num}{bypass}")
    lines += [_jump_rule(hook, config.node_id) for hook in config.hooks]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _rule_target(tokens: list[str]) -> str | None:
    for flag in ("-j", "--jump", "-g", "--goto"):
        if flag in tokens:
            i = tokens.index(flag)
            if i + 1 < len(tokens):
                return tokens[i + 1]
    return None


def removal_batch(saved: str) -> tuple[str | None, int]:
    """From ``iptables-save -t filter`` output, the batch that removes our traces.

    Returns (batch or None when there is nothing of ours, number of jump
    rules removed).  Our traces: rules outside our chains that jump to an
    ``STK-`` chain, and the ``STK-`` chains.
    """
    in_filter = False
    ours: list[str] = []
    deletes: list[str] = []
    for raw in saved.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            in_filter = line == "*filter"
            continue
        if not in_filter:
            continue
        if line.startswith(":") and line[1:].startswith(CHAIN_PREFIX):
            ours.append(line[1:].split()[0])
        elif line.startswith("-A "):
            tokens = shlex.split(line)
            target = _rule_target(tokens)
            owner = tokens[1] if len(tokens) > 1 else ""
            if (
                target is not None
                and target.startswith(CHAIN_PREFIX)
                and not owner.startswith(CHAIN_PREFIX)
            ):
                deletes.append("-D" + line[2:])
    if not ours and not deletes:
        return None, 0
    lines = ["*filter", *deletes]
    lines += [f"-F {c}" for c in ours]
    lines += [f"-X {c}" for c in ours]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n", len(deletes)


@dataclass(frozen=True, slots=True)
class DataplaneStats:
    installed: bool
    installs_total: int
    removals_total: int
    stale_jumps_removed_total: int  # jumps found from an earlier run or left over


class Dataplane:
    """Installs and removes the node's chains; both operations are idempotent."""

    def __init__(
        self,
        config: NodeConfig,
        marks: MarkBits | None = None,
        *,
        variant: str = "",
        runner: Runner = run_command,
        sysctl: SysctlAccess | None = None,
    ) -> None:
        self._config = config
        self._sysctl = sysctl or ProcSysctl()
        self._saved_loose: str | None = None
        self._marks = marks or MarkBits()
        self._families = families(variant)
        self._run = runner
        self._installed = False
        self._installs = 0
        self._removals = 0
        self._stale = 0

    @property
    def marks(self) -> MarkBits:
        return self._marks

    def install(self) -> None:
        """Remove stale state, then create chains and jumps for both families."""
        self.remove()
        for family in self._families:
            self._restore(family, install_batch(self._config, self._marks, family))
        self._installed = True
        self._installs += 1
        if self._config.sync is not None:
            # Written only when needed: a container's /proc/sys is read-only,
            # and its compose file sets the value instead (sysctls:).
            current = self._sysctl.read(TCP_LOOSE)
            if current != "0":
                self._sysctl.write(TCP_LOOSE, "0")
                self._saved_loose = current

    def remove(self) -> None:
        """Remove every jump to an STK- chain and the chains; a no-op when clean."""
        for family in self._families:
            saved = self._checked([family.save, "-t", "filter"], "")
            batch, jumps = removal_batch(saved)
            if batch is not None:
                self._restore(family, batch)
                if not self._installed:
                    self._stale += jumps
        if self._installed:
            self._removals += 1
        self._installed = False
        if self._saved_loose is not None:
            self._sysctl.write(TCP_LOOSE, self._saved_loose)
            self._saved_loose = None

    def _restore(self, family: Family, batch: str) -> None:
        self._checked([family.restore, "--noflush", "--wait"], batch)

    def _checked(self, argv: list[str], stdin: str) -> str:
        result = self._run(argv, stdin)
        if result.returncode != 0:
            detail = result.stderr.strip() or result.stdout.strip() or "no output"
            raise DataplaneError(f"{' '.join(argv)} failed (exit {result.returncode}): {detail}")
        return result.stdout

    def statistics(self) -> DataplaneStats:
        return DataplaneStats(self._installed, self._installs, self._removals, self._stale)
