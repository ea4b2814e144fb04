"""Property tests: random interleavings of both sides sending, with loss, reordering and
duplication, from the very first (prekey) message on. Every message that arrives decrypts exactly
once to its plaintext; every duplicate or replay is refused; nothing else changes state."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.errors import DecryptionFailed
from node.protocol.session import SessionRecord
from node.testing import Party


@dataclass
class Wire:
    """Messages in flight from one party to the other, and those already delivered."""

    in_flight: list[tuple[int, bytes]] = field(default_factory=list)
    delivered: list[tuple[int, bytes]] = field(default_factory=list)


# An action: (kind, side, choice). side 0 = Alice, 1 = Bob. choice picks a message in flight.
actions = st.lists(
    st.tuples(
        st.sampled_from(["send", "send", "deliver", "deliver", "drop", "duplicate"]),
        st.integers(0, 1),
        st.integers(0, 10_000),
    ),
    min_size=20,
    max_size=120,
)


def _run(schedule: list[tuple[str, int, int]], *, crossing: bool) -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    parties = (alice, bob)
    alice.start_session(bob)
    if crossing:
        bob.start_session(alice)  # both start at once: crossing first messages
    wires = (Wire(), Wire())  # wires[i]: from parties[i] to the other
    counter = 0
    for kind, side, choice in schedule:
        sender, receiver = parties[side], parties[1 - side]
        wire = wires[side]
        if kind == "send":
            record = sender.sessions.get(receiver.name)
            if record is None or not record.can_encrypt:
                continue  # Bob without a session yet cannot write first
            counter += 1
            wire.in_flight.append((counter, sender.encrypt(receiver, b"msg %d" % counter)))
        elif kind == "deliver" and wire.in_flight:
            number, message = wire.in_flight.pop(choice % len(wire.in_flight))
            assert receiver.decrypt(sender, message) == b"msg %d" % number
            wire.delivered.append((number, message))
        elif kind == "drop" and wire.in_flight:
            wire.in_flight.pop(choice % len(wire.in_flight))
        elif kind == "duplicate" and wire.delivered:
            _, message = wire.delivered[choice % len(wire.delivered)]
            record = receiver.sessions.get(sender.name, SessionRecord())
            before = record.to_bytes()
            prekeys_before = receiver.prekeys.to_bytes()
            try:
                receiver.decrypt(sender, message)
            except DecryptionFailed:
                pass
            else:
                raise AssertionError("a duplicate decrypted twice")
            assert receiver.sessions.get(sender.name, SessionRecord()).to_bytes() == before
            assert receiver.prekeys.to_bytes() == prekeys_before
    # Whatever happened, delivering everything still in flight works, each exactly once.
    for side in (0, 1):
        sender, receiver = parties[side], parties[1 - side]
        for number, message in wires[side].in_flight:
            assert receiver.decrypt(sender, message) == b"msg %d" % number


_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_settings
@given(actions)
def test_random_interleavings_decrypt_exactly_once(schedule: list[tuple[str, int, int]]) -> None:
    _run(schedule, crossing=False)


@_settings
@given(actions)
def test_crossing_first_messages_converge(schedule: list[tuple[str, int, int]]) -> None:
    _run(schedule, crossing=True)
