"""The committed generated code matches the .proto, and imports as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd import gen


def test_committed_code_is_not_stale(tmp_path: Path) -> None:
    fresh = tmp_path / "_pb"
    written = gen.generate(fresh)
    assert {p.name for p in written} >= {"sync_pb2.py", "sync_pb2.pyi", "sync_pb2_grpc.py"}
    stale = gen.stale_files(gen.PB_DIR, fresh)
    assert stale == [], f"run `python -m syncd.gen`: stale {stale}"


def test_stale_files_reports_changed_and_missing(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "x").mkdir(parents=True)
    (b / "x").mkdir(parents=True)
    (a / "x" / "same.py").write_text("1")
    (b / "x" / "same.py").write_text("1")
    (a / "x" / "changed.py").write_text("1")
    (b / "x" / "changed.py").write_text("2")
    (a / "only_a.py").write_text("")
    assert gen.stale_files(a, b) == ["only_a.py", "x/changed.py"]


def test_check_mode_passes_on_committed_tree() -> None:
    assert gen.main(["--check"]) == 0


def test_generated_imports_are_package_relative() -> None:
    grpc_module = (gen.PB_DIR / "stockade/sync/v1/sync_pb2_grpc.py").read_text()
    assert "from syncd._pb.stockade.sync.v1 import sync_pb2" in grpc_module
    assert "\nfrom stockade." not in grpc_module


def test_generated_modules_import_and_define_the_service() -> None:
    from syncd._pb.stockade.sync.v1 import sync_pb2, sync_pb2_grpc

    service = sync_pb2.DESCRIPTOR.services_by_name["StateSync"]
    methods = {m.name: m for m in service.methods}
    assert methods["Exchange"].client_streaming and methods["Exchange"].server_streaming
    assert not methods["Snapshot"].client_streaming and methods["Snapshot"].server_streaming
    assert sync_pb2.DESCRIPTOR.package == "stockade.sync.v1"
    assert hasattr(sync_pb2_grpc, "StateSyncStub")


@pytest.mark.parametrize("name", ["rpc.proto", "kv.proto", "auth.proto"])
def test_no_proto_file_collides_with_etcd(name: str) -> None:
    assert not any(Path(p).name == name for p in gen.PROTO_FILES)
    assert not list(gen.PROTO_ROOT.rglob(name))
