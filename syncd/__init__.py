"""syncd: replicates connection-tracking state between Stockade nodes.

Pure core (no I/O, no clock): :mod:`syncd.records` (flow records, deltas,
wire conversion), :mod:`syncd.replica` (the replica store),
:mod:`syncd.session` (one peer's Exchange stream as a state machine).
Errors: :mod:`syncd.errors`.  Generated protobuf/gRPC code lives in
``syncd._pb`` (``python -m syncd.gen``).  The protocol is described in
docs/sync-protocol.md.
"""
