"""The cluster ruleset in etcd: ``stockade rules apply|history|show|rollback`` and the follower.

One ruleset for the whole cluster, stored as numbered revisions under
``/stockade/<cluster>/rules/`` (``cluster.etcd``: ``put_ruleset`` writes the
text and moves ``rules/current`` in one transaction, so history is linear
and what nodes run only moves forward; a rollback stores an old text again
as a new revision).

* ``apply FILE`` validates with the node's own parser
  (:func:`node.policy.parse_ruleset`) before anything is stored: a bad file
  prints ``file:line: message``, exits 2 and leaves etcd untouched.  A file
  identical to the current revision is not stored again.
* ``history`` lists revisions (time, comment, content hash, * = current);
  ``show [REV]`` prints a revision's text; ``rollback REV`` re-validates
  REV's text with this version's parser and stores it as a new revision.
* Every etcd failure is one line naming the endpoint and a non-zero exit,
  never a traceback.  Exit codes: 0 done, 1 etcd unreachable or refusing,
  2 bad input (file, revision, flags).

:class:`RulesetFollower` runs in each node: it watches ``rules/current``,
parses each new revision and hands it to the node's atomic swap.  A text
this node cannot parse (a newer rule syntax applied by a newer CLI) is
refused and reported, and the running ruleset stays.  When etcd is
unreachable the follower is *fail static*: the running ruleset stays, the
outage is logged once, loudly, and the watch is retried until etcd is back,
when the current revision is read again (so nothing applied meanwhile is
missed).  Its :meth:`RulesetFollower.statistics` carries the running
revision, which each node reports, so drift between nodes is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from cluster.errors import BadInput, BadRecord, EtcdError, EtcdUnavailable
from node.errors import RulesError
from node.policy import Ruleset, parse_ruleset

if TYPE_CHECKING:  # cluster.etcd loads grpc and aetcd: only commands that talk to etcd pay
    from cluster.etcd import EtcdStore, StoredRuleset

__all__ = [
    "DEFAULT_CLUSTER",
    "DEFAULT_ETCD",
    "FollowerStats",
    "RulesetFollower",
    "RulesetSource",
    "add_rules_subcommands",
    "etcd_endpoint",
]

log = logging.getLogger(__name__)

DEFAULT_ETCD: Final = "http://127.0.0.1:2379"
DEFAULT_CLUSTER: Final = "stockade"
EXIT_ETCD: Final = 1
EXIT_BAD_INPUT: Final = 2
_DETAIL_CHARS: Final = 200  # grpc error texts run long; one line is the contract


def etcd_endpoint(url: str) -> str:
    """``http://host:port`` (or bare ``host:port``) -> ``host:port``; BadInput otherwise."""
    rest = url.strip().rstrip("/")
    scheme, sep, tail = rest.partition("://")
    if sep:
        if scheme != "http":
            raise BadInput(f"etcd URL {url!r}: only http:// is supported (no TLS client yet)")
        rest = tail
    if "/" in rest:
        raise BadInput(f"etcd URL {url!r} has a path; give http://host:port")
    from cluster.etcd import EtcdConfig

    EtcdConfig(rest)  # validates host:port
    return rest


# --- CLI -----------------------------------------------------------------------------


def add_rules_subcommands(rules_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``apply``, ``history``, ``show`` and ``rollback`` to ``stockade rules``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--etcd", default=DEFAULT_ETCD, help=f"etcd client URL (default {DEFAULT_ETCD})"
    )
    common.add_argument(
        "--cluster", default=DEFAULT_CLUSTER, help=f"cluster id (default {DEFAULT_CLUSTER})"
    )
    common.add_argument(
        "--timeout", type=float, default=1.0, help="seconds per etcd call (default 1)"
    )

    apply = rules_sub.add_parser(
        "apply", parents=[common], help="validate a rules file and make it the cluster's ruleset"
    )
    apply.add_argument("file")
    apply.add_argument("--comment", default="", help="note stored with the revision")
    apply.set_defaults(handler=_cmd_apply)

    history = rules_sub.add_parser(
        "history", parents=[common], help="list the cluster's ruleset revisions"
    )
    history.set_defaults(handler=_cmd_history)

    show = rules_sub.add_parser("show", parents=[common], help="print a revision's rules text")
    show.add_argument("revision", nargs="?", type=_revision, help="default: the current one")
    show.set_defaults(handler=_cmd_show)

    rollback = rules_sub.add_parser(
        "rollback", parents=[common], help="make an old revision current again (as a new one)"
    )
    rollback.add_argument("revision", type=_revision)
    rollback.add_argument("--comment", default="", help="why (stored after 'rollback to N')")
    rollback.set_defaults(handler=_cmd_rollback)


def _revision(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"revision {text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("revisions start at 1")
    return value


def _cmd_apply(args: argparse.Namespace) -> int:
    try:
        text = _read_rules(args.file)
        ruleset = parse_ruleset(text, args.file)
    except RulesError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)

    async def store_it(store: EtcdStore) -> int:
        with contextlib.suppress(BadInput):  # nothing stored yet, or a corrupt current
            current = await store.get_ruleset()
            if current.text == text:
                print(f"unchanged: revision {current.revision} already has this text")
                return 0
        revision = await store.put_ruleset(text, args.comment)
        print(f"applied revision {revision} ({_describe(ruleset)}, sha256 {_sha(text)})")
        return 0

    return _with_store(args, store_it)


def _read_rules(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RulesError(path, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError(path, data.count(b"\n", 0, exc.start) + 1, "not valid UTF-8") from None


def _cmd_history(args: argparse.Namespace) -> int:
    async def list_them(store: EtcdStore) -> int:
        infos = await store.history()
        if not infos:
            print(f"no ruleset stored in cluster {args.cluster}")
            return 0
        print(f"  {'REV':>5}  {'STORED (UTC)':<20}  {'SHA256':<12}  {'BYTES':>7}  COMMENT")
        for info in infos:
            mark = "*" if info.current else " "
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.stored_at))
            comment = info.comment.replace("\n", " ")
            print(
                f"{mark} {info.revision:>5}  {stamp:<20}  {info.sha256[:12]}  "
                f"{info.size:>7}  {comment}"
            )
        return 0

    return _with_store(args, list_them)


def _cmd_show(args: argparse.Namespace) -> int:
    async def show_it(store: EtcdStore) -> int:
        stored = await store.get_ruleset(args.revision)
        sys.stdout.write(stored.text)
        return 0

    return _with_store(args, show_it)


def _cmd_rollback(args: argparse.Namespace) -> int:
    async def roll_back(store: EtcdStore) -> int:
        old = await store.get_ruleset(args.revision)
        try:
            ruleset = parse_ruleset(old.text, f"revision {old.revision}")
        except RulesError as exc:
            return _fail(f"{exc} (this version cannot run it; nothing stored)", EXIT_BAD_INPUT)
        comment = f"rollback to {old.revision}" + (f": {args.comment}" if args.comment else "")
        revision = await store.put_ruleset(old.text, comment)
        print(f"rolled back: revision {revision} has revision {old.revision}'s text "
              f"({_describe(ruleset)})")  # fmt: skip
        return 0

    return _with_store(args, roll_back)


def _with_store(args: argparse.Namespace, action: Callable[[EtcdStore], Awaitable[int]]) -> int:
    """Run ``action`` against the cluster's store; every cluster error becomes one line."""
    from cluster.etcd import EtcdConfig, EtcdStore

    try:
        config = EtcdConfig(etcd_endpoint(args.etcd), timeout=args.timeout)

        async def run() -> int:
            async with EtcdStore(config, args.cluster) as store:
                return await action(store)

        return asyncio.run(run())
    except EtcdUnavailable as exc:
        return _fail(f"etcd at {args.etcd} is unreachable: {_short(exc.detail)}", EXIT_ETCD)
    except EtcdError as exc:
        return _fail(f"etcd at {args.etcd} refused: {_short(exc.detail)}", EXIT_ETCD)
    except BadRecord as exc:
        return _fail(f"etcd at {args.etcd} holds a corrupt value: {_short(str(exc))}", EXIT_ETCD)
    except BadInput as exc:  # UnknownRevision, a bad cluster id or URL
        return _fail(f"{exc} (cluster {args.cluster}, etcd {args.etcd})", EXIT_BAD_INPUT)


def _fail(message: str, code: int) -> int:
    print(f"stockade: {message}", file=sys.stderr)
    return code


def _short(detail: str) -> str:
    line = " ".join(detail.split())
    return line if len(line) <= _DETAIL_CHARS else line[: _DETAIL_CHARS - 3] + "..."


def _describe(ruleset: Ruleset) -> str:
    count = len(ruleset.rules)
    return f"{count} rule{'' if count == 1 else 's'}, ruleset {ruleset.revision}"


def _sha(text: str) -> str:
    """The content hash `rules history` shows (StoredRuleset.sha256), shortened."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --- the follower a node runs -----------------------------------------------------------


class RulesetSource(Protocol):
    """What the follower needs from :class:`cluster.etcd.EtcdStore`."""

    def watch_ruleset(self) -> AsyncGenerator[StoredRuleset, None]: ...


@dataclass(frozen=True, slots=True)
class FollowerStats:
    running_revision: int | None  # etcd ruleset revision this node runs (None: none yet)
    running_sha256: str | None  # hash of its text, as in `stockade rules history`
    policy_revision: str | None  # node.policy content hash of the running ruleset
    applied: int  # revisions handed to on_ruleset
    refused: int  # revisions (or etcd values) this node could not use; old one kept
    refused_revision: int | None  # the last refused revision (None: a corrupt etcd value)
    last_refusal: str | None  # why the last refused revision was refused (file:line: ...)
    last_etcd_error: str | None  # the last etcd failure (kept after recovery, for status)
    degraded: bool  # the watch broke and nothing has been read since (fail static)
    etcd_failures: int  # watch attempts that ended in an etcd error


class RulesetFollower:
    """Follow the cluster's current ruleset; hand each new valid one to ``on_ruleset``.

    ``on_ruleset(ruleset, revision)`` is called in the event loop, with a
    fully compiled :class:`node.policy.Ruleset`; it should swap atomically
    and not raise (an exception from it is a bug and ends :meth:`run`).
    ``retry_delay`` is the pause between watch attempts while etcd is down.
    """

    def __init__(
        self,
        store: RulesetSource,
        on_ruleset: Callable[[Ruleset, int], None],
        *,
        retry_delay: float = 0.5,
        name: str = "etcd",
    ) -> None:
        if not 0 < retry_delay <= 60:
            raise BadInput(f"retry_delay {retry_delay} s is not in (0, 60]")
        self._store = store
        self._on_ruleset = on_ruleset
        self._retry_delay = retry_delay
        self._name = name  # in log lines and in error locations ("etcd:rules/7:3: ...")
        self._running: tuple[int, str] | None = None
        self._policy_revision: str | None = None
        self._refused_key: tuple[int, str] | None = None
        self._refused_revision: int | None = None
        self._applied = self._refused = self._failures = 0
        self._last_refusal: str | None = None
        self._last_etcd_error: str | None = None
        self._degraded = False
        self._changed = asyncio.Event()

    def statistics(self) -> FollowerStats:
        running = self._running
        return FollowerStats(
            running_revision=running[0] if running else None,
            running_sha256=running[1] if running else None,
            policy_revision=self._policy_revision,
            applied=self._applied,
            refused=self._refused,
            refused_revision=self._refused_revision,
            last_refusal=self._last_refusal,
            last_etcd_error=self._last_etcd_error,
            degraded=self._degraded,
            etcd_failures=self._failures,
        )

    async def run(self) -> None:
        """Follow until cancelled; etcd errors never end it (fail static, then retry)."""
        while True:
            try:
                async with contextlib.aclosing(self._store.watch_ruleset()) as stream:
                    async for stored in stream:
                        self._recovered()
                        self._offer(stored)
                # The stream ended without an error: the client was closed under us.
                self._broken("watch ended (client closed)")
            except EtcdError as exc:
                self._broken(_short(str(exc)))
            except BadInput as exc:  # a corrupt value or a dangling pointer in etcd
                self._recovered()
                self._refuse(None, f"bad ruleset value in etcd: {exc}")
            await asyncio.sleep(self._retry_delay)

    async def wait_running(self, at_least: int = 1) -> int:
        """Wait until the running revision is ``at_least``; return it."""
        while self._running is None or self._running[0] < at_least:
            changed = self._changed
            await changed.wait()
        return self._running[0]

    def _offer(self, stored: StoredRuleset) -> None:
        key = (stored.revision, stored.sha256)
        if key == self._running or key == self._refused_key:
            return  # a re-watch replays the current revision; it was handled already
        try:
            ruleset = parse_ruleset(stored.text, f"{self._name}:rules/{stored.revision}")
        except RulesError as exc:
            self._refused_key = key
            self._refuse(stored.revision, str(exc))
            return
        self._on_ruleset(ruleset, stored.revision)
        previous = self._running[0] if self._running else None
        self._running, self._policy_revision = key, ruleset.revision
        self._applied += 1
        log.info(
            "ruleset revision %s -> %d (%d rules, ruleset %s)",
            previous,
            stored.revision,
            len(ruleset.rules),
            ruleset.revision,
        )
        self._changed.set()
        self._changed = asyncio.Event()

    def _refuse(self, revision: int | None, error: str) -> None:
        if error == self._last_refusal:
            return  # the same bad value seen again on a retry: reported already
        self._refused += 1
        self._refused_revision = revision
        self._last_refusal = error
        log.error(
            "refusing ruleset revision %s, keeping %s: %s", revision, self._running_text, error
        )

    def _broken(self, error: str) -> None:
        self._failures += 1
        self._last_etcd_error = error
        if not self._degraded:
            log.error(
                "%s unreachable, FAIL STATIC: keeping ruleset %s until it is back (%s)",
                self._name,
                self._running_text,
                error,
            )
        self._degraded = True

    def _recovered(self) -> None:
        if self._degraded:
            log.warning("%s reachable again: following the cluster ruleset", self._name)
        self._degraded = False

    @property
    def _running_text(self) -> str:
        return f"revision {self._running[0]}" if self._running else "(none from etcd yet)"
