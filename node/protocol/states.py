"""The closed sets of names a message goes through on a device: its direction and its delivery
state. Storage records them, the delivery machines decide them, the API and the CLI report them;
each set is spelled once, here, so the type checker catches a misspelled state anywhere.

An outgoing message goes through the states of PROTOCOL.md section 13 ("States"; README.md
"Message states"): "pending" until it is written to a stream of the recipient's device ("sent") or
left at the device's relays ("relayed"), then "delivered" once the device confirms it (an
end-to-end ack or a receipt), or "failed" with the reason. An incoming message is "received" once
committed.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["DeliveryPath", "Direction", "MessageState", "OutboxState", "OutgoingState"]

Direction = Literal["in", "out"]
"""Whether a message was received ("in") or written on this device ("out")."""

OutgoingState = Literal["pending", "sent", "relayed", "delivered", "failed"]
"""Where an outgoing message stands, from queued ("pending") to "delivered" or "failed"."""

MessageState = OutgoingState | Literal["received"]
"""The state of any message in the history: an outgoing state, or "received" for incoming ones."""

OutboxState = Literal["pending", "sent", "relayed"]
"""The state of one recipient device's copy of a message while it waits for confirmation (the
copy leaves the outbox when the device confirms it, or the message fails)."""

DeliveryPath = Literal["direct", "relayed"]
"""How a contact's device is reached now: a direct libp2p connection, or through a relay."""
