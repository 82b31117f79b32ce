"""The chaos load: the lab traffic client, plus a timestamp on every new connection.

``python -m chaos.load --server IP [traffic client options] --json`` runs
:class:`chaos.traffic.Client` unchanged and adds ``churn_attempts`` to its
JSON summary: one ``[start, end, ok, reason]`` per new-connection attempt
(``CLOCK_MONOTONIC`` seconds), so the ``new_connections`` invariant can
leave out the attempts that overlapped a fault.  Bounded: after
``MAX_ATTEMPTS`` only the counters grow (``churn_attempts_dropped``).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import time
from typing import Any, Final

from chaos.traffic import Client, _parse
from chaos.traffic_stats import RequestStats

MAX_ATTEMPTS: Final = 200_000
_STARTED: contextvars.ContextVar[float] = contextvars.ContextVar("churn_started")


class TimedRequests(RequestStats):
    """RequestStats that also keeps (start, end, ok, reason) per attempt."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.attempts: list[tuple[float, float, bool, str | None]] = []
        self.dropped = 0

    def _keep(self, ok: bool, reason: str | None) -> None:
        now = time.monotonic()
        if len(self.attempts) < MAX_ATTEMPTS:
            self.attempts.append((_STARTED.get(now), now, ok, reason))
        else:
            self.dropped += 1

    def on_ok(self, latency: float) -> None:
        super().on_ok(latency)
        self._keep(True, None)

    def on_failed(self, reason: str) -> None:
        super().on_failed(reason)
        self._keep(False, reason)


class TimedClient(Client):
    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.timed = TimedRequests("churn")
        self.requests = [self.timed if r is self.churn else r for r in self.requests]
        self.churn = self.timed

    async def _one_connection(self) -> None:
        # Each attempt runs in its own task, hence its own context.
        _STARTED.set(time.monotonic())
        await super()._one_connection()

    async def run(self) -> dict[str, Any]:
        summary = await super().run()
        summary["churn_attempts"] = [list(a) for a in self.timed.attempts]
        summary["churn_attempts_dropped"] = self.timed.dropped
        return summary


def main(argv: list[str] | None = None) -> int:
    args = _parse(["client", *(sys.argv[1:] if argv is None else argv)])
    summary = asyncio.run(TimedClient(args).run())
    print(json.dumps(summary), flush=True)
    return 0 if summary["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
