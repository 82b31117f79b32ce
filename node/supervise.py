"""Run one child process (the node's syncd) for as long as the node runs.

``node run`` with ``sync.supervise: true`` starts
``python -m syncd.cli syncd run --config <the node file>`` and keeps it
running:

* **Restart with backoff.**  A child that exits (any status) is started
  again after ``backoff_min`` seconds, doubling up to ``backoff_max``; a run
  that lasted ``stable_after`` seconds resets the delay.  A child that exits
  with status 2 (its configuration is invalid) is still retried: the node
  validated the same file at start, so it is a transient state (a file being
  rewritten) or a bug worth seeing repeatedly in the log, not a reason to
  filter without sync.
* **Never orphaned.**  The child asks the kernel for SIGKILL when its parent
  dies (``PR_SET_PDEATHSIG``, set between fork and exec) and exits at once
  if the parent already died before that.  So a SIGKILLed filter takes its
  syncd with it: the next ``node run`` starts a fresh syncd, which pulls
  this node's flows back from its peers before serving the filter (see
  docs/syncd.md).  Run syncd yourself (``supervise: false``) to keep it
  alive across filter crashes.
* **Stop.**  :meth:`Supervisor.stop` sends SIGTERM, waits ``stop_timeout``,
  then SIGKILL; no restart follows.  A child started while stopping gets
  its SIGTERM as soon as it exists.
* **Signals by pidfd.**  ``Popen.send_signal`` polls first, i.e. it reaps
  a child that has just exited, racing asyncio's child watcher thread,
  which then reports exit status 255 ("Unknown child process"); and a plain
  ``kill(pid)`` after the watcher reaped could hit a recycled pid.  Signals
  go through a pidfd opened at start (``pidfd_open(2)``, Linux 5.3): it
  names this very process, exited or not, and never reaps.
* **Output.**  Each line the child writes (stdout and stderr) goes to
  ``out`` prefixed with ``[<name>]``; a line starting with ``ready_prefix``
  marks the child ready (syncd prints it once it serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

__all__ = ["Supervisor", "SupervisorStats"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_MAX_LINE = 64 * 1024  # a longer line from the child is cut


@dataclass(frozen=True, slots=True)
class SupervisorStats:
    running: bool  # a child process is alive now
    ready: bool  # the current child printed its ready line
    pid: int | None  # its process id
    starts_total: int  # children started
    restarts_total: int  # children started after one exited (starts - 1)
    spawn_failures_total: int  # exec failed (no interpreter, ...)
    last_exit: int | None  # exit status of the latest child to end (-N: killed by signal N)
    last_exit_age: float | None  # seconds since it ended
    next_start_in: float | None  # seconds until the next start, while waiting


def _die_with_parent(parent: int) -> Callable[[], None]:
    """``preexec_fn``: SIGKILL this child when the process ``parent`` dies."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died before prctl: do not run orphaned
            os._exit(126)

    return setup


def _pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid``; None when it was already reaped (it exited at once)."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


class Supervisor:
    """Keeps one child process running; see the module docstring."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        out: TextIO,
        ready_prefix: str | None = None,
        backoff_min: float = 0.2,
        backoff_max: float = 5.0,
        stable_after: float = 10.0,
        stop_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._argv = list(argv)
        self._out = out
        self._ready_prefix = ready_prefix
        self._backoff = (backoff_min, backoff_max)
        self._stable_after = stable_after
        self._stop_timeout = stop_timeout
        self._clock = clock
        self._proc: asyncio.subprocess.Process | None = None
        self._pidfd: int | None = None  # names self._proc for signals
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        self._starts = 0
        self._spawn_failures = 0
        self._last_exit: int | None = None
        self._last_exit_at: float | None = None
        self._next_start_at: float | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Start the child and keep it running in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"supervise-{self.name}"
            )

    async def stop(self) -> None:
        """SIGTERM the child, SIGKILL it after ``stop_timeout``; no restart."""
        self._stopping.set()
        task, self._task = self._task, None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self._signal(proc, signal.SIGTERM)
            try:
                async with asyncio.timeout(self._stop_timeout):
                    await proc.wait()
            except TimeoutError:
                log.warning("%s did not stop within %.1f s: killing it", self.name,
                            self._stop_timeout)  # fmt: skip
                self._signal(proc, signal.SIGKILL)
                await proc.wait()
        if task is not None:
            # The run task forwards the child's last lines, then returns.
            done, _ = await asyncio.wait({task}, timeout=2.0)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if proc is not None:
            self._exited(proc)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def statistics(self) -> SupervisorStats:
        now = self._clock()
        return SupervisorStats(
            self.pid is not None, self._ready and self.pid is not None, self.pid, self._starts,
            max(self._starts - 1, 0), self._spawn_failures, self._last_exit,
            None if self._last_exit_at is None else round(now - self._last_exit_at, 3),
            None if self._next_start_at is None else round(max(self._next_start_at - now, 0), 3),
        )  # fmt: skip

    # -- internals ---------------------------------------------------------------

    async def _run(self) -> None:
        low, high = self._backoff
        delay = low
        while not self._stopping.is_set():
            started = self._clock()
            await self._run_once()
            if self._stopping.is_set():
                return
            if self._clock() - started >= self._stable_after:
                delay = low
            self._next_start_at = self._clock() + delay
            log.warning("%s exited (status %s); restarting in %.1f s", self.name,
                        self._last_exit, delay)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            self._next_start_at = None
            delay = min(delay * 2, high)

    async def _run_once(self) -> None:
        self._ready = False
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=_die_with_parent(os.getpid()),
                limit=_MAX_LINE,
            )
        except OSError as e:
            self._spawn_failures += 1
            self._last_exit, self._last_exit_at = None, self._clock()
            log.error("cannot start %s: %s", self.name, e)
            return
        self._proc, self._pidfd = proc, _pidfd_open(proc.pid)
        self._starts += 1
        log.info("started %s (pid %d)", self.name, proc.pid)
        if self._stopping.is_set():  # stop() began while we were starting it
            self._signal(proc, signal.SIGTERM)
        assert proc.stdout is not None and proc.stderr is not None
        pipes = [
            asyncio.create_task(self._forward(proc.stdout)),
            asyncio.create_task(self._forward(proc.stderr)),
        ]
        try:
            await proc.wait()
            # The pipes end with the child (or with a grandchild holding them:
            # do not wait for that one long).
            await asyncio.wait(pipes, timeout=1.0)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
        self._exited(proc)

    def _signal(self, proc: asyncio.subprocess.Process, sig: int) -> None:
        if self._proc is not proc or self._pidfd is None:
            return  # gone before we could name it: nothing to signal
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    def _exited(self, proc: asyncio.subprocess.Process) -> None:
        if self._proc is proc:
            self._last_exit, self._last_exit_at = proc.returncode, self._clock()
            self._proc = None
            self._ready = False
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None

    async def _forward(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # longer than _MAX_LINE: skip what is buffered
                line = b"(line too long, cut)\n"
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\n")
            if self._ready_prefix is not None and text.startswith(self._ready_prefix):
                self._ready = True
            with contextlib.suppress(OSError, ValueError):
                self._out.write(f"[{self.name}] {text}\n")
                self._out.flush()
