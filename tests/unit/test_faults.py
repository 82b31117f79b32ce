"""Fault planning (pure): which signals and commands each fault produces."""

from __future__ import annotations

import json
import signal

import pytest

from chaos.errors import LabError
from chaos.faults import CHAIN, Command, Fault, NodeView, Signal, parse_fault, plan
from chaos.lab.restart import held_vips, reboot_commands, software_places_vips


def _view(pids: tuple[int, ...] = (11, 12), installed: bool = False) -> NodeView:
    return NodeView(
        node_id="fw2",
        namespace="stkl-x-fw2",
        pids=pids,
        links=("out0", "in0", "mgmt0"),
        mgmt_if="mgmt0",
        etcd_address="10.231.30.2",
        chain_installed=installed,
    )


def test_kill_stops_everything_before_killing_and_takes_links_down_last() -> None:
    steps = plan(_view(), Fault("kill"))
    assert steps[0] == Signal((11, 12), signal.SIGSTOP)
    assert steps[1] == Signal((11, 12), signal.SIGKILL)
    assert isinstance(steps[2], Command)
    assert steps[2].argv == ("ip", "-n", "stkl-x-fw2", "-batch", "-")
    assert steps[2].input == "link set out0 down\nlink set in0 down\nlink set mgmt0 down\n"
    assert len(steps) == 3


def test_kill_of_a_node_without_processes_still_cuts_links() -> None:
    steps = plan(_view(pids=()), Fault("kill"))
    assert len(steps) == 1 and isinstance(steps[0], Command)


def test_freeze_and_thaw_signal_every_process() -> None:
    assert plan(_view(), Fault("freeze")) == [Signal((11, 12), signal.SIGSTOP)]
    assert plan(_view(), Fault("thaw")) == [Signal((11, 12), signal.SIGCONT)]
    assert plan(_view(pids=()), Fault("freeze")) == []


def _restore_lines(steps: list[Signal | Command]) -> list[str]:
    assert len(steps) == 1
    step = steps[0]
    assert isinstance(step, Command) and step.input is not None
    assert step.argv[:4] == ("ip", "netns", "exec", "stkl-x-fw2")
    assert "iptables-restore" in step.argv and "--noflush" in step.argv
    lines = step.input.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    return lines[1:-1]


def test_partition_keeps_etcd_by_default_and_hooks_the_chain_once() -> None:
    lines = _restore_lines(plan(_view(), Fault("partition")))
    assert lines == [
        f":{CHAIN} - [0:0]",
        f"-I INPUT 1 -j {CHAIN}",
        f"-I OUTPUT 1 -j {CHAIN}",
        f"-A {CHAIN} -i mgmt0 ! -s 10.231.30.2 -j DROP",
        f"-A {CHAIN} -o mgmt0 ! -d 10.231.30.2 -j DROP",
    ]
    again = _restore_lines(plan(_view(installed=True), Fault("partition", etcd=False)))
    assert again == [
        f":{CHAIN} - [0:0]",
        f"-A {CHAIN} -i mgmt0 -j DROP",
        f"-A {CHAIN} -o mgmt0 -j DROP",
    ]


def test_loss_uses_statistic_both_ways() -> None:
    lines = _restore_lines(plan(_view(), Fault("loss", probability=0.25)))
    drops = [line for line in lines if line.startswith(f"-A {CHAIN}")]
    assert len(drops) == 2
    for line in drops:
        assert "-m statistic --mode random --probability 0.250000 -j DROP" in line
    assert "-i mgmt0" in drops[0] and "-o mgmt0" in drops[1]


def test_heal_removes_the_chain_or_does_nothing() -> None:
    assert plan(_view(installed=False), Fault("heal")) == []
    lines = _restore_lines(plan(_view(installed=True), Fault("heal")))
    assert lines == [
        f":{CHAIN} - [0:0]",
        f"-D INPUT -j {CHAIN}",
        f"-D OUTPUT -j {CHAIN}",
        f"-X {CHAIN}",
    ]


def test_restart_is_not_planned_here() -> None:
    with pytest.raises(LabError):
        plan(_view(), Fault("restart"))


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["kill"], Fault("kill")),
        (["partition"], Fault("partition")),
        (["loss", "0.2"], Fault("loss", probability=0.2)),
        (["loss", "5%"], Fault("loss", probability=0.05)),
    ],
)
def test_parse_fault(words: list[str], expected: Fault) -> None:
    assert parse_fault(words) == expected


@pytest.mark.parametrize(
    "words",
    [[], ["explode"], ["loss"], ["loss", "x"], ["loss", "0"], ["loss", "1.5"], ["kill", "now"]],
)
def test_parse_fault_rejects(words: list[str]) -> None:
    with pytest.raises(LabError):
        parse_fault(words)


def test_fault_validates_directly() -> None:
    with pytest.raises(LabError):
        Fault("kill", probability=0.5)
    with pytest.raises(LabError):
        Fault("nope")  # type: ignore[arg-type]
    assert str(Fault("loss", etcd=False, probability=0.1)) == "loss 0.1 (etcd too)"


def test_restart_removes_software_vips_before_links_come_up() -> None:
    addr = json.dumps(
        [
            {"ifname": "lo", "addr_info": [{"local": "127.0.0.1", "prefixlen": 8}]},
            {
                "ifname": "out0",
                "addr_info": [
                    {"local": "10.231.10.12", "prefixlen": 24},
                    {"local": "10.231.10.102", "prefixlen": 24},
                ],
            },
        ]
    )
    vips = [{"address": "10.231.10.102/24"}, {"address": "10.231.20.102/24"}]
    held = held_vips(addr, vips)
    assert held == [("10.231.10.102/24", "out0")]
    cmds = reboot_commands("ns", held, ["out0", "in0"])
    assert cmds == [
        ["ip", "-n", "ns", "addr", "del", "10.231.10.102/24", "dev", "out0"],
        ["ip", "-n", "ns", "link", "set", "out0", "up"],
        ["ip", "-n", "ns", "link", "set", "in0", "up"],
    ]


def test_who_places_vips() -> None:
    assert software_places_vips({"mode": "cluster"})
    assert not software_places_vips({"mode": "sync"})
    assert software_places_vips({"mode": None, "system": "keepalived-conntrackd"})
