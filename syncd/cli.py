"""``stockade syncd ...`` and ``stockade certs init``: registered by ``node.cli``.

Imports stay inside the handlers so building the parser costs nothing (no
gRPC, protobuf or cryptography) for the other ``stockade`` commands.  Every
documented syncd error becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _cmd_run(args: argparse.Namespace) -> int:
    from syncd.config import load_syncd_config
    from syncd.daemon import run_syncd
    from syncd.errors import SyncError

    try:
        config = load_syncd_config(args.config)
    except SyncError as e:
        print(f"stockade: {e}", file=sys.stderr)
        return 2
    return run_syncd(config)


def _cmd_query(args: argparse.Namespace) -> int:
    import json

    from node.control import request

    command: dict[str, object] = {"cmd": args.what}
    if args.what == "flows":
        command["limit"] = args.limit
        if args.origin:
            command["origin"] = args.origin
    reply = request(args.socket, command, timeout=10.0)
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok", True) else 1


def _cmd_agent(args: argparse.Namespace) -> int:
    """``drain`` / ``status``: the cluster agent in a running syncd (its control socket)."""
    import json

    from node.control import ControlError, request

    try:
        reply = request(args.socket, {"cmd": args.what}, timeout=5.0)
    except ControlError as e:
        print(f"stockade: {e}", file=sys.stderr)
        return 2
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok", True) else 1


def _add_agent_commands(parent: SubParsers, where: str) -> None:
    drain = parent.add_parser(
        "drain", help="move this node's VIPs to the others, then leave the cluster"
    )
    drain.add_argument("--socket", required=True, help=f"{where}'s control socket")
    drain.set_defaults(handler=_cmd_agent, what="drain")


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from syncd.certs import init_certs
    from syncd.errors import SyncError

    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    try:
        paths = init_certs(args.dir, args.cluster, nodes, force=args.force, days=args.days)
    except SyncError as e:
        print(f"stockade: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def add_parser(sub: SubParsers) -> None:
    """Register ``stockade syncd {run,stats,flows,digest,status,drain}``, ``stockade node
    drain`` (when the ``node`` command exists) and ``stockade certs init``."""
    syncd = sub.add_parser("syncd", help="run and inspect the state sync daemon")
    syncd_sub = syncd.add_subparsers(dest="syncd_command", required=True)
    run = syncd_sub.add_parser("run", help="run syncd (gRPC to peers, local link to the filter)")
    run.add_argument("--config", required=True, help="syncd config file (YAML)")
    run.set_defaults(handler=_cmd_run)
    for what in ("stats", "flows", "digest"):
        p = syncd_sub.add_parser(what, help=f"print a running syncd's {what} as JSON")
        p.add_argument("--socket", required=True, help="syncd's control socket")
        if what == "flows":
            p.add_argument("--origin", help="only this origin's flows")
            p.add_argument("--limit", type=int, default=1000, help="at most this many")
        p.set_defaults(handler=_cmd_query, what=what)
    agent_status = syncd_sub.add_parser("status", help="print the cluster agent's state as JSON")
    agent_status.add_argument("--socket", required=True, help="syncd's control socket")
    agent_status.set_defaults(handler=_cmd_agent, what="status")
    _add_agent_commands(syncd_sub, "syncd")
    # `stockade node drain` too, when node.cli built a `node` command before us.
    node = sub.choices.get("node")
    if node is not None:
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction) and "drain" not in action.choices:
                _add_agent_commands(action, "syncd")

    certs = sub.add_parser("certs", help="cluster CA and node certificates for syncd mTLS")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="create ca.pem/ca.key and <node>.pem/<node>.key")
    init.add_argument("--dir", required=True, help="directory to write into")
    init.add_argument("--cluster", required=True, help="cluster id (as in the syncd config)")
    init.add_argument("--nodes", required=True, help="comma-separated node ids: fw1,fw2,fw3")
    init.add_argument("--days", type=int, default=365, help="validity in days")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(handler=_cmd_certs_init)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m syncd.cli``) until node.cli registers us."""
    parser = argparse.ArgumentParser(prog="stockade")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
