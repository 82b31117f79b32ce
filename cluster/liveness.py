"""How long a peer may stay silent before it is a suspect, given its link's loss (pure).

A fixed window (``suspect_after``, 0.1 s: ten beacons at 10 ms) is right on
a clean link and wrong on a lossy one.  A live peer looks dead when every
beacon of the window is lost: with independent loss ``p`` per beacon that
happens with probability ``p ** n`` for a window of ``n`` beacons.  At the
0.51 a beacon meets crossing two links that each drop 30 % (chaos
``sync-loss-30``), ten beacons in a row are lost about once every 800:
with a hundred beacons a second per peer, several false revocations a
minute, each a fence, a re-registration and two VIP moves.

So, like BFD's detection multiplier (RFC 5880 s6.8.4) but chosen from the
loss measured on the link rather than configured, the window is stretched
until a live peer falsely suspected is a one-in-a-million event per window
(:data:`FALSE_SUSPICION`), never below ``suspect_after`` (a clean link
keeps the fast failover) and never beyond :data:`MAX_STRETCH` times it (a
link losing more than about 70 % is broken; a peer behind it is treated as
gone).  The loss estimate comes from the gaps in the peer's beacon
sequence (``syncd.beacon.BeaconTracker.loss``); it is updated only when a
beacon arrives, so a peer that dies on a clean link is suspected after
``suspect_after`` as before.
"""

from __future__ import annotations

import math
from typing import Final

FALSE_SUSPICION: Final = 1e-6  # accepted chance that a window's beacons are all lost
MAX_STRETCH: Final = 4.0  # the window never grows past this many times suspect_after


def suspect_window(suspect_after: float, beacon_interval: float | None, loss: float) -> float:
    """Seconds of silence after which a peer whose beacons are lost with
    probability ``loss`` (0..1) is a suspect; ``suspect_after`` without beacons."""
    if beacon_interval is None or loss <= 0.0:
        return suspect_after
    longest = suspect_after * MAX_STRETCH
    if loss >= 1.0:
        return longest
    needed = beacon_interval * math.log(FALSE_SUSPICION) / math.log(loss)
    return min(max(suspect_after, needed), longest)
