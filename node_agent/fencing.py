"""Node-side self-fencing for agents whose spec says ``on_partition: stop``.

The controller re-places a node's agents once it has heard nothing from the
node for ``node_timeout``. A singleton that must never run twice cannot wait
for the partition to heal to learn that: the node stops such agents itself
once it has been out of contact for ``fence_after`` (two thirds of the
controller's ``node_timeout``, so the copy is down before a replacement
starts), and starts them again only if the controller still places them here
when contact returns. Contact means a round trip to the NATS server succeeded.
Pure: the caller supplies the clock.
"""

from __future__ import annotations

__all__ = ["PartitionFence"]


class PartitionFence:
    def __init__(self) -> None:
        self.fence_after: float | None = None
        """None until a controller has told us its node_timeout: standalone nodes never fence."""
        self._last_contact: float | None = None
        self.fenced = False

    def arm(self, node_timeout: float, now: float) -> None:
        self.fence_after = node_timeout * 2 / 3
        self._last_contact = now

    def contact(self, now: float) -> bool:
        """Record a successful round trip; True when the fence should now be lifted."""
        self._last_contact = now
        if self.fenced:
            self.fenced = False
            return True
        return False

    def must_fence(self, now: float) -> bool:
        """True once per partition, when contact has been gone for ``fence_after``."""
        if self.fenced or self.fence_after is None or self._last_contact is None:
            return False
        if now - self._last_contact > self.fence_after:
            self.fenced = True
            return True
        return False
