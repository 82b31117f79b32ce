"""node.dataplane: the iptables batches it writes and how it drives the tools."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from node.config import FastPathConfig, NodeConfig, QueueConfig, load_node_config
from node.dataplane import (
    HASHLIMIT_NAME_MAX,
    CommandResult,
    Dataplane,
    MarkBits,
    families,
    hashlimit_name,
    install_batch,
    removal_batch,
)
from node.errors import ConfigError, DataplaneError

V4, V6 = families()


def config(**kw) -> NodeConfig:
    return NodeConfig(node_id=kw.pop("node_id", "fw1"), rules_path="rules.yaml", **kw)


def rules_of(batch: str, chain: str) -> list[str]:
    return [line for line in batch.splitlines() if line.startswith(f"-A {chain} ")]


def test_chain_order_puts_mark_checks_before_the_queue():
    batch = install_batch(config(), MarkBits(), V4)
    rules = rules_of(batch, "STK-FORWARD")
    assert "REJECT --reject-with tcp-reset" in rules[0] and "-p tcp" in rules[0]
    assert "REJECT --reject-with icmp-port-unreachable" in rules[1]
    assert "--mark 0x20000000/0x20000000 -j STK-OFFLOAD" in rules[2]
    assert "--mark 0x8000000/0x8000000 -j STK-UNOFFLOAD" in rules[3]
    assert "--tcp-flags SYN,FIN,RST NONE" in rules[4] and "-p tcp" in rules[4]
    assert "-p udp" in rules[5] and "--hashlimit-above 1/sec" in rules[5]
    assert rules[-1] == (
        "-A STK-FORWARD -m conntrack --ctstate INVALID,NEW,ESTABLISHED,RELATED,UNTRACKED"
        " -j NFQUEUE --queue-num 0"
    )
    assert len(rules) == 7


def test_offload_chain_sets_fast_clears_offload_and_accepts():
    rules = rules_of(install_batch(config(), MarkBits(), V4), "STK-OFFLOAD")
    assert rules == [
        "-A STK-OFFLOAD -j CONNMARK --set-xmark 0x40000000/0x40000000",
        "-A STK-OFFLOAD -j MARK --set-xmark 0x0/0x20000000",
        "-A STK-OFFLOAD -j ACCEPT",
    ]


def test_unoffload_chain_clears_fast_and_its_own_bit_and_accepts():
    rules = rules_of(install_batch(config(), MarkBits(), V4), "STK-UNOFFLOAD")
    assert rules == [
        "-A STK-UNOFFLOAD -j CONNMARK --set-xmark 0x0/0x40000000",
        "-A STK-UNOFFLOAD -j MARK --set-xmark 0x0/0x8000000",
        "-A STK-UNOFFLOAD -j ACCEPT",
    ]


def test_ipv6_rejects_with_icmp6():
    batch = install_batch(config(), MarkBits(), V6)
    assert "icmp6-port-unreachable" in batch
    assert "icmp-port-unreachable" not in batch.replace("icmp6-port-unreachable", "")


def test_fast_path_disabled_leaves_out_offload_and_fast_rules():
    cfg = config(fast_path=FastPathConfig(enabled=False))
    batch = install_batch(cfg, MarkBits(), V4)
    assert "STK-OFFLOAD" not in batch
    assert "hashlimit" not in batch and "connmark" not in batch.lower()
    assert len(rules_of(batch, "STK-FORWARD")) == 3
    # Conntrack (and defragmentation) stays on through the queue rule.
    assert "-m conntrack --ctstate" in rules_of(batch, "STK-FORWARD")[-1]


def test_queue_number_bypass_and_sample_rate_come_from_config():
    cfg = config(queue=QueueConfig(num=7, bypass=True), fast_path=FastPathConfig(True, 5))
    batch = install_batch(cfg, MarkBits(), V4)
    assert "-j NFQUEUE --queue-num 7 --queue-bypass\n" in batch
    assert "--hashlimit-above 5/sec" in batch


def test_one_jump_per_hook_at_position_one_with_our_comment_and_no_loopback():
    cfg = config(hooks=("FORWARD", "INPUT", "OUTPUT"))
    batch = install_batch(cfg, MarkBits(), V4)
    jumps = [line for line in batch.splitlines() if line.startswith("-I ")]
    assert jumps == [
        "-I FORWARD 1 -m comment --comment stockade:fw1 -j STK-FORWARD",
        "-I INPUT 1 ! -i lo -m comment --comment stockade:fw1 -j STK-INPUT",
        "-I OUTPUT 1 ! -o lo -m comment --comment stockade:fw1 -j STK-OUTPUT",
    ]
    assert batch.startswith("*filter\n") and batch.endswith("COMMIT\n")


def test_custom_mark_bits_are_used_everywhere():
    marks = MarkBits(reject=0x100, offload=0x200, fast=0x400)
    batch = install_batch(config(), marks, V4)
    assert "--mark 0x100/0x100" in batch and "--mark 0x200/0x200" in batch
    assert "--set-xmark 0x400/0x400" in batch and "--mark 0x400/0x400" in batch
    assert "0x10000000" not in batch


@pytest.mark.parametrize(
    "kw", [{"reject": 0}, {"reject": 3}, {"offload": 1 << 32}, {"fast": 0x10000000}]
)
def test_mark_bits_must_be_distinct_single_bits(kw):
    with pytest.raises(ConfigError):
        MarkBits(**kw)


def test_hashlimit_names_fit_the_kernel_and_differ_per_node_and_hook():
    longest = "a" * 31
    names = {hashlimit_name(n, h) for n in ("fw1", "fw2", longest) for h in ("FORWARD", "INPUT")}
    assert len(names) == 6
    assert all(len(n) <= HASHLIMIT_NAME_MAX for n in names)


def test_hashlimit_table_is_sized_for_the_flow_table():
    from node.flow.table import TableConfig

    batch = install_batch(config(table=TableConfig(capacity=100_000)), MarkBits(), V4)
    assert "--hashlimit-htable-max 200000" in batch
    huge = install_batch(config(table=TableConfig(capacity=4_000_000)), MarkBits(), V4)
    assert "--hashlimit-htable-max 1048576" in huge


def test_unknown_variant_is_refused():
    assert families("legacy")[0].restore == "iptables-legacy-restore"
    with pytest.raises(ConfigError):
        families("bogus")


SAVED = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j STK-FAKE
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:STK-FORWARD - [0:0]
:STK-OFFLOAD - [0:0]
:USER - [0:0]
-A INPUT -j USER
-A FORWARD -m comment --comment "stockade:old-id" -j STK-FORWARD
-A FORWARD -m comment --comment "stockade:fw1" -j STK-FORWARD
-A FORWARD -p tcp -j ACCEPT
-A STK-FORWARD -m mark --mark 0x20000000/0x20000000 -j STK-OFFLOAD
-A STK-FORWARD -j NFQUEUE --queue-num 0
-A STK-OFFLOAD -j ACCEPT
COMMIT
"""


def test_removal_deletes_every_jump_into_our_chains_then_the_chains():
    batch, jumps = removal_batch(SAVED)
    assert jumps == 2
    assert batch == (
        "*filter\n"
        '-D FORWARD -m comment --comment "stockade:old-id" -j STK-FORWARD\n'
        '-D FORWARD -m comment --comment "stockade:fw1" -j STK-FORWARD\n'
        "-F STK-FORWARD\n-F STK-OFFLOAD\n-X STK-FORWARD\n-X STK-OFFLOAD\n"
        "COMMIT\n"
    )


def test_removal_of_a_clean_table_is_nothing():
    clean = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"
    assert removal_batch(clean) == (None, 0)


class FakeTools:
    """Records commands; ``save_output`` is what iptables-save prints."""

    def __init__(self, save_output: str = "", fail: str | None = None) -> None:
        self.calls: list[tuple[list[str], str]] = []
        self.save_output = save_output
        self.fail = fail

    def __call__(self, argv: Sequence[str], stdin: str) -> CommandResult:
        self.calls.append((list(argv), stdin))
        if self.fail and self.fail in argv[0]:
            return CommandResult(1, "", "iptables-restore: line 3 failed\n")
        return CommandResult(0, self.save_output if "save" in argv[0] else "", "")


def test_install_removes_stale_state_first_then_writes_both_families():
    tools = FakeTools(save_output=SAVED)
    dp = Dataplane(config(), runner=tools)
    dp.install()
    programs = [argv[0] for argv, _ in tools.calls]
    assert programs == [
        "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore",
        "iptables-restore", "ip6tables-restore",
    ]  # fmt: skip
    assert tools.calls[1][0] == ["iptables-restore", "--noflush", "--wait"]
    assert tools.calls[1][1].startswith("*filter\n-D FORWARD")
    assert "icmp6-port-unreachable" in tools.calls[5][1]
    stats = dp.statistics()
    assert stats.installed and stats.installs_total == 1 and stats.stale_jumps_removed_total == 4


def test_remove_is_idempotent_and_touches_nothing_when_clean():
    tools = FakeTools(save_output="*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
    dp = Dataplane(config(), runner=tools)
    dp.remove()
    dp.remove()
    assert [argv[0] for argv, _ in tools.calls] == ["iptables-save", "ip6tables-save"] * 2
    assert not dp.statistics().installed


def test_tool_failure_is_one_dataplane_error_with_command_and_stderr():
    dp = Dataplane(config(), runner=FakeTools(fail="ip6tables-restore"))
    with pytest.raises(DataplaneError) as err:
        dp.install()
    message = str(err.value)
    assert "ip6tables-restore --noflush --wait failed (exit 1)" in message
    assert "line 3 failed" in message
    assert not dp.statistics().installed


def test_variant_selects_the_binaries():
    tools = FakeTools()
    Dataplane(config(), variant="nft", runner=tools).remove()
    assert [argv[0] for argv, _ in tools.calls] == ["iptables-nft-save", "ip6tables-nft-save"]


class FakeSysctl:
    def __init__(self, value: str) -> None:
        self.values = {"net/netfilter/nf_conntrack_tcp_loose": value}
        self.writes: list[tuple[str, str]] = []

    def read(self, key: str) -> str:
        return self.values[key]

    def write(self, key: str, value: str) -> None:
        self.writes.append((key, value))
        self.values[key] = value


def clustered_config(tmp_path) -> NodeConfig:
    path = tmp_path / "fw1.yaml"
    path.write_text(
        "node_id: fw1\ncluster_id: lab\nrules: rules.yaml\n"
        "sync: {insecure: true, listen: '127.0.0.1:7400', state_dir: state,\n"
        "       local_socket: sync.sock, supervise: false}\n"
    )
    return load_node_config(str(path))


def test_clustered_node_turns_loose_pickup_off_and_restores_it(tmp_path):
    sysctl = FakeSysctl("1")
    dp = Dataplane(clustered_config(tmp_path), runner=FakeTools(), sysctl=sysctl)
    dp.install()
    assert sysctl.values["net/netfilter/nf_conntrack_tcp_loose"] == "0"
    dp.remove()
    assert sysctl.values["net/netfilter/nf_conntrack_tcp_loose"] == "1"
    dp.remove()
    assert len(sysctl.writes) == 2


def test_standalone_node_leaves_loose_pickup_alone():
    sysctl = FakeSysctl("1")
    dp = Dataplane(config(), runner=FakeTools(), sysctl=sysctl)
    dp.install()
    dp.remove()
    assert sysctl.writes == []


def test_loose_pickup_already_off_is_not_written(tmp_path):
    sysctl = FakeSysctl("0")  # e.g. a container whose compose file set it; /proc/sys read-only
    dp = Dataplane(clustered_config(tmp_path), runner=FakeTools(), sysctl=sysctl)
    dp.install()
    dp.remove()
    assert sysctl.writes == []
