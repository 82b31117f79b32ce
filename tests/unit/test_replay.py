"""``stockade replay``: a capture through the engine, JSON lines out."""

from __future__ import annotations

import json

from node.cli import main
from node.packet import ACK, SYN
from node.pcap import write_pcap
from tests.packets import tcp4

C, S = "10.10.1.2", "10.10.2.2"


def write_trace(path):
    write_pcap(
        str(path),
        [
            (1.0, tcp4(C, 40000, S, 80, SYN, seq=100)),
            (1.1, tcp4(S, 80, C, 40000, SYN | ACK, seq=500, ack=101)),
            (1.2, tcp4(C, 40000, S, 80, ACK, seq=101, ack=501)),
            (1.3, tcp4(C, 40001, S, 22, SYN, seq=7)),
            (1.4, b"\x45\x00"),
        ],
    )


def run(capsys, *argv):
    code = main(["replay", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_lines_then_flow_table(tmp_path, capsys):
    write_trace(tmp_path / "t.pcap")
    code, out, _ = run(capsys, "--rules", "examples/rules.yaml", str(tmp_path / "t.pcap"), "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    frames, final = lines[:-1], lines[-1]
    assert [(f["i"], f["verdict"], f["ct_state"], f["rule"]) for f in frames] == [
        (1, "accept", "new", "web"),
        (2, "accept", "established", None),
        (3, "accept", "established", None),
        (4, "drop", "new", None),
        (5, "drop", "invalid", None),
    ]
    assert final["flows"] == [
        {
            "proto": "tcp",
            "family": 4,
            "src": C,
            "sport": 40000,
            "dst": S,
            "dport": 80,
            "state": "ESTABLISHED",
            "assured": True,
            "timeout": 431999.8,  # at the last frame (1.4 s), 0.2 s after the ACK
            "rule": "web",
        }
    ]


def test_fail_on_drop_exit_code(tmp_path, capsys):
    write_trace(tmp_path / "t.pcap")
    code, _, err = run(
        capsys, "--rules", "examples/rules.yaml", str(tmp_path / "t.pcap"), "--fail-on-drop"
    )
    assert code == 1
    assert "2 packet(s) dropped" in err


def test_human_output_lists_frames_and_flows(tmp_path, capsys):
    write_trace(tmp_path / "t.pcap")
    code, out, _ = run(capsys, "--rules", "examples/rules.yaml", str(tmp_path / "t.pcap"))
    assert code == 0
    assert "flow table: 1 flows" in out
    assert "10.10.1.2:40000 -> 10.10.2.2:80  ESTABLISHED" in out


def test_bad_rules_file_is_one_line_error(tmp_path, capsys):
    write_trace(tmp_path / "t.pcap")
    code, _, err = run(capsys, "--rules", "examples/rules-bad.yaml", str(tmp_path / "t.pcap"))
    assert code == 2
    assert err.startswith("stockade: examples/rules-bad.yaml:8: ")


def test_not_a_capture_is_one_line_error(tmp_path, capsys):
    (tmp_path / "x.pcap").write_bytes(b"not a capture at all")
    code, _, err = run(capsys, "--rules", "examples/rules.yaml", str(tmp_path / "x.pcap"))
    assert code == 2
    assert err.startswith("stockade: ") and err[-1] == "\n" and err.count("\n") == 1
