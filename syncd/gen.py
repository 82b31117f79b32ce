"""Generate the protobuf/gRPC Python code of ``proto/`` into ``syncd/_pb/``.

The one documented way to (re)generate it, from the repository root::

    .venv/bin/python -m syncd.gen            # rewrite syncd/_pb/
    .venv/bin/python -m syncd.gen --check    # exit 1 if syncd/_pb/ is stale

It runs ``grpc_tools.protoc`` in process (no system protoc needed), writing
``sync_pb2.py``, ``sync_pb2.pyi`` and ``sync_pb2_grpc.py`` under
``syncd/_pb/stockade/sync/v1/``, then makes the tree a Python package:

* protoc writes imports relative to the proto root
  (``from stockade.sync.v1 import sync_pb2``); they are rewritten to
  ``from syncd._pb.stockade.sync.v1 import sync_pb2`` so the code imports as
  part of ``syncd`` without touching ``sys.path``;
* an empty ``__init__.py`` is written in every directory.

The descriptor keeps the proto file name ``stockade/sync/v1/sync.proto`` so
it cannot collide with etcd's protos in protobuf's global descriptor pool.
The output is deterministic for a given grpcio-tools version, which is what
lets ``tests/unit/test_syncd_gen.py`` regenerate into a temporary directory
and fail when the committed code is stale.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from syncd.errors import Misuse

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PB_DIR = REPO_ROOT / "syncd" / "_pb"
# Proto files compiled, relative to PROTO_ROOT.
PROTO_FILES = ("stockade/sync/v1/sync.proto", "stockade/sync/v1/local.proto")
# Python package under which PROTO_ROOT's tree is importable.
PB_PACKAGE = "syncd._pb"

# ``from stockade.sync.v1 import sync_pb2 as ...`` / ``import stockade.sync.v1.x``
_IMPORT_FROM = re.compile(r"^from (stockade(?:\.\w+)*) import ", re.MULTILINE)
_IMPORT_PLAIN = re.compile(r"^import (stockade(?:\.\w+)*)", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Compile :data:`PROTO_FILES` into ``out_dir`` (created or replaced).

    Returns the files written, sorted.  Raises :class:`Misuse` if protoc
    fails (a broken .proto is a bug of this repository, not bad input).
    """
    # Imported here (only regeneration needs grpcio-tools) and by name, as
    # grpc_tools ships no type information.
    protoc = importlib.import_module("grpc_tools.protoc")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    status = protoc.main(args)
    if status != 0:
        raise Misuse(f"protoc failed with status {status}: {' '.join(args)}")
    for path in sorted(out_dir.rglob("*.py")) + sorted(out_dir.rglob("*.pyi")):
        _fix_imports(path)
    for directory in [out_dir, *sorted(p for p in out_dir.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def _fix_imports(path: Path) -> None:
    text = path.read_text()
    text = _IMPORT_FROM.sub(rf"from {PB_PACKAGE}.\1 import ", text)
    text = _IMPORT_PLAIN.sub(rf"import {PB_PACKAGE}.\1", text)
    path.write_text(text)


def stale_files(committed: Path, fresh: Path) -> list[str]:
    """Relative paths that differ between two generated trees (missing counts)."""
    names = {
        str(p.relative_to(root))
        for root in (committed, fresh)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    return sorted(
        name
        for name in names
        if not (committed / name).is_file()
        or not (fresh / name).is_file()
        or (committed / name).read_bytes() != (fresh / name).read_bytes()
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m syncd.gen", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="only report whether syncd/_pb is stale"
    )
    args = parser.parse_args(argv)
    if not args.check:
        for path in generate(PB_DIR):
            print(path.relative_to(REPO_ROOT))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_pb"
        generate(fresh)
        stale = stale_files(PB_DIR, fresh)
    for name in stale:
        print(f"stale: syncd/_pb/{name}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
