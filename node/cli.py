"""``stockade`` command line: one entry point, subcommands per area.

Each subcommand module exposes ``add_parser(subparsers)``; imports are lazy
so ``stockade replay`` does not pay for gRPC or pyroute2.  Every documented
error becomes a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from node.errors import NodeError

Handler = Callable[[argparse.Namespace], int]


def _cmd_node_run(args: argparse.Namespace) -> int:
    from node.config import QueueConfig, load_node_config, with_overrides
    from node.daemon import run_node

    config = load_node_config(args.config)
    if args.queue_bypass:
        q = config.queue
        config = with_overrides(config, queue=QueueConfig(q.num, True, q.max_len))
    if args.no_fast_path:
        from node.config import FastPathConfig

        fp = config.fast_path
        config = with_overrides(config, fast_path=FastPathConfig(False, fp.sample_per_second))
    return run_node(config)


def _cmd_node_stats(args: argparse.Namespace) -> int:
    import json

    from node.control import request

    reply = request(args.socket, {"cmd": args.what})
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok", True) else 1


def _cmd_rules_check(args: argparse.Namespace) -> int:
    from node.policy import load_ruleset

    ruleset = load_ruleset(args.file)
    stats = ruleset.statistics()
    print(f"{args.file}: ok, {stats.rule_count} rules, revision {stats.revision}")
    return 0


def _cmd_rules_reload(args: argparse.Namespace) -> int:
    from node.control import request

    reply = request(args.socket, {"cmd": "reload"})
    if not reply.get("ok"):
        print(f"reload refused, running ruleset kept: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"reloaded: revision {reply.get('revision')}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from node.replay import run_replay

    return run_replay(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stockade", description="Stockade: active-active HA stateful firewall cluster"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run and inspect a firewall node")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    run = node_sub.add_parser("run", help="run one node (NFQUEUE filter; with sync: its syncd)")
    run.add_argument("--config", required=True, help="node config file (YAML)")
    run.add_argument(
        "--queue-bypass", action="store_true", help="fail open when no process listens"
    )
    run.add_argument("--no-fast-path", action="store_true", help="queue every packet to userspace")
    run.set_defaults(handler=_cmd_node_run)
    for what in ("stats", "flows"):
        p = node_sub.add_parser(what, help=f"print a running node's {what} as JSON")
        p.add_argument("--socket", required=True, help="the node's control socket")
        p.set_defaults(handler=_cmd_node_stats, what=what)

    rules = sub.add_parser("rules", help="validate and reload rulesets")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a rules file (file:line errors)")
    check.add_argument("file")
    check.set_defaults(handler=_cmd_rules_check)
    reload = rules_sub.add_parser("reload", help="make a running node re-read its rules file")
    reload.add_argument("--socket", required=True, help="the node's control socket")
    reload.set_defaults(handler=_cmd_rules_reload)
    from cluster.rules import add_rules_subcommands

    add_rules_subcommands(rules_sub)  # apply, history, show, rollback (cluster, etcd)

    from node.replay import add_arguments as add_replay_arguments

    replay = sub.add_parser("replay", help="run a pcap through the engine offline")
    add_replay_arguments(replay)
    replay.set_defaults(handler=_cmd_replay)

    for module in (
        "node.bench",
        "chaos.bench_failover",
        "chaos.bench_asymmetric",
        "chaos.demo",
        "syncd.cli",
        "chaos.cli",
        "chaos.chaos_cli",
        "cluster.status_cli",
        "cluster.flows_cli",
    ):
        _add_optional(sub, module)
    return parser


def _add_optional(sub: argparse._SubParsersAction[argparse.ArgumentParser], module: str) -> None:
    """Subcommands living in other modules register themselves here."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return
    mod.add_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except NodeError as e:
        print(f"stockade: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
