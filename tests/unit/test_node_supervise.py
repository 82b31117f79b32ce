"""node.supervise.Supervisor with real child processes (short Python one-liners)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time

from node.supervise import Supervisor

EXIT_SOON = (
    "import sys; print('ready now', flush=True); print('oops', file=sys.stderr); sys.exit(3)"
)
# The handler goes in before "ready": a SIGTERM that arrives between the two
# would otherwise kill the child with the default action (seen once in CI).
SERVE = (
    "import signal, sys, time;"
    "signal.signal(signal.SIGTERM, lambda *a: (print('bye', flush=True), sys.exit(0)));"
    "print('ready now', flush=True); time.sleep(60)"
)


def supervisor(code: str, out: io.StringIO, **kw) -> Supervisor:
    kw.setdefault("backoff_min", 0.05)
    kw.setdefault("backoff_max", 0.1)
    return Supervisor("child x", [sys.executable, "-c", code], out=out, ready_prefix="ready", **kw)


def test_a_child_that_exits_is_restarted_with_its_output_prefixed():
    async def run() -> None:
        out = io.StringIO()
        sup = supervisor(EXIT_SOON, out)
        await sup.start()
        deadline = time.monotonic() + 10
        while sup.statistics().starts_total < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await sup.stop()
        s = sup.statistics()
        assert s.starts_total >= 3 and s.restarts_total == s.starts_total - 1
        assert s.last_exit in (3, -signal.SIGTERM) and not s.running and s.pid is None
        assert out.getvalue().count("[child x] oops\n") >= 2
        assert "[child x] ready now\n" in out.getvalue()
        assert "[child x] oops\n" in out.getvalue()

    asyncio.run(run())


class _SlowReaper(asyncio.ThreadedChildWatcher):
    """asyncio's default watcher, reaping each child 0.5 s after it was started:
    widens the window in which an exited child is a zombie nobody reaped yet."""

    def _do_waitpid(self, loop, expected_pid, callback, args):  # type: ignore[no-untyped-def]
        time.sleep(0.5)
        super()._do_waitpid(loop, expected_pid, callback, args)


def test_stop_right_after_the_child_exited_reports_its_real_status():
    # Popen.send_signal polls first: it reaps a child that just exited, and
    # the watcher thread then reports status 255 ("Unknown child process").
    # Seen in CI as last_exit 255.  Signals go through a pidfd instead.
    async def run() -> None:
        out = io.StringIO()
        sup = supervisor(EXIT_SOON, out)
        await sup.start()
        deadline = time.monotonic() + 10
        while "[child x] oops" not in out.getvalue() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # it has exited; the slow watcher has not reaped it
        await sup.stop()
        assert sup.statistics().last_exit == 3

    watcher = _SlowReaper()
    asyncio.set_child_watcher(watcher)
    try:
        asyncio.run(run())
    finally:
        asyncio.set_child_watcher(None)


def test_stop_sends_sigterm_and_no_restart_follows():
    async def run() -> None:
        out = io.StringIO()
        sup = supervisor(SERVE, out)
        await sup.start()
        deadline = time.monotonic() + 10
        while not sup.statistics().ready and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        s = sup.statistics()
        assert s.running and s.ready and s.pid
        pid = s.pid
        await sup.stop()
        assert "[child x] bye" in out.getvalue()
        s = sup.statistics()
        assert (s.running, s.last_exit, s.starts_total) == (False, 0, 1)
        await asyncio.sleep(0.2)
        assert sup.statistics().starts_total == 1
        assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)

    asyncio.run(run())


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


PARENT = """
import asyncio, io, sys
from node.supervise import Supervisor
CHILD = "import time; print('ready', flush=True); time.sleep(60)"
async def main():
    sup = Supervisor("c", [sys.executable, "-c", CHILD], out=sys.stderr, ready_prefix="ready")
    await sup.start()
    while not sup.statistics().ready:
        await asyncio.sleep(0.02)
    print(sup.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_a_killed_parent_takes_its_child_along():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=repo)  # fmt: skip
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _zombie_or_gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=5)
        deadline = time.monotonic() + 5
        while not _zombie_or_gone(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _zombie_or_gone(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
