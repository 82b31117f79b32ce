"""The cluster agent's building blocks.

Pure: ``ring`` (Maglev flow/VIP ownership), ``membership`` (member records,
the etcd-fed member view, heartbeat suspicion, etcd health for fail-static,
the local lifecycle table).  Adapters: ``etcd`` (the only code that talks to
etcd), ``etcd_server`` (a private etcd for labs and tests).  Errors:
``errors``.  Key layout and measured behaviour: ``docs/cluster.md``.
"""
