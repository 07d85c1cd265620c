"""The controller: keeps the fleet's desired agents placed on healthy nodes.

Pure decisions (no NATS, no clock of their own, tested table-driven):

* :mod:`~fabric.controller.placement` - which node takes one replica.
* :mod:`~fabric.controller.liveness` - a node's state from its heartbeat age.
* :mod:`~fabric.controller.reconcile` - desired vs observed -> commands.

The NATS side, kept thin:

* :mod:`~fabric.controller.streams` - the EVENTS stream and the KV buckets.
* :mod:`~fabric.controller.registry` - compare-and-set reads and writes in KV.
* :mod:`~fabric.controller.lease` - the leader lease.
* :mod:`~fabric.controller.service` - registration, discovery, the API, the loop.
"""
