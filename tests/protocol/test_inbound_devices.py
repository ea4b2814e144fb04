"""The inbound machine's multi-device rules (PROTOCOL.md sections 25.4 and 25.5), without I/O:
device-list updates, first messages from a known account's new device, and sent transcripts.

Alice receives. Bob is a contact with a confirmed session; Bob2 is a second device of Bob's
account (Bob's identity key, its own device key and prekeys); Alice2 is a second device of
Alice's own account."""

from __future__ import annotations

from dataclasses import replace

from node.protocol.content import DeviceHint, DeviceListUpdate, Text, Transcript, encode_content
from node.protocol.devicelist import DeviceEntry, DeviceList
from node.protocol.inbound import DeviceListReceived, Incoming, decide_batch
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.testing import FIXED_NOW, Party
from tests.protocol.test_inbound_machine import (
    NAME_CHARS,
    NOW_MS,
    MemoryView,
    account,
    alice_knows_bob,
    device,
    mid,
)


def second_device(of: Party, name: str) -> Party:
    """Another device of `of`'s account: same identity key, its own device key and prekeys."""
    other = Party.create(name)
    return replace(other, identity=of.identity)


def device_list(identity: IdentityKeyPair, *devices: DeviceKeyPair, seq: int = 5) -> bytes:
    return DeviceList(identity=identity.public,
                      entries=tuple(DeviceEntry.make(d, identity.public) for d in devices),
                      seq=seq, expires=FIXED_NOW + 3600).sign(identity)


def update(n: int, signed: bytes, *hints: DeviceHint) -> bytes:
    return encode_content(DeviceListUpdate(id=mid(n), sent_at_ms=NOW_MS, signed_list=signed,
                                           hints=hints))


def decide(view: MemoryView, sender: Party, n: int, message: bytes,
           claimed: bytes | None = None):  # type: ignore[no-untyped-def]
    item = Incoming(device(sender), "peer-" + sender.name, mid(n), message, claimed)
    return decide_batch([item], view=view, now_ms=NOW_MS, max_name_chars=NAME_CHARS)


def setup() -> tuple[Party, Party, MemoryView]:
    return alice_knows_bob()


def test_a_contacts_device_list_comes_out_verified() -> None:
    alice, bob, view = setup()
    bob2 = second_device(bob, "bob2")
    signed = device_list(bob.identity, bob.device, bob2.device)
    hint = DeviceHint(device=device(bob2), addrs=("/ip4/192.0.2.2/tcp/1",))
    plan = decide(view, bob, 1, bob.encrypt(alice, update(1, signed, hint)))
    assert plan.acks == (mid(1),) and not plan.nacks
    (received,) = plan.device_lists
    assert isinstance(received, DeviceListReceived)
    assert received.account == account(bob) and not received.own and received.signed == signed
    assert received.hints == (hint,)


def test_a_known_devices_list_updates_where_that_device_is() -> None:
    """A device knows best where it is itself: its hint about itself in a device-list update
    refreshes its stored addresses and relays, as an intro does (a device added on another one
    was first stored with only its link code's addresses). Hints about other devices never
    overwrite what is known of them."""
    alice, bob, view = setup()
    bob2 = second_device(bob, "bob2")
    signed = device_list(bob.identity, bob.device, bob2.device)
    own = DeviceHint(device=device(bob), addrs=("/ip4/192.0.2.1/tcp/1",),
                     relays=("/ip4/192.0.2.9/tcp/4040/p2p/relay",))
    other = DeviceHint(device=device(bob2), addrs=("/ip4/192.0.2.2/tcp/1",))
    plan = decide(view, bob, 1, bob.encrypt(alice, update(1, signed, other, own)))
    assert plan.acks == (mid(1),) and not plan.nacks
    (updated,) = plan.device_updates
    assert (updated.account, updated.device, updated.addrs, updated.relays) == (
        account(bob), device(bob), own.addrs, own.relays)
    assert updated.seen_at_ms == NOW_MS  # the update's ts dates it (section 21)
    plan = decide(view, bob, 2, bob.encrypt(alice, update(2, signed, other)))
    assert plan.acks == (mid(2),) and plan.device_updates == ()


def test_forged_or_foreign_device_lists_are_refused() -> None:
    alice, bob, view = setup()
    mallory = IdentityKeyPair.generate()
    foreign = device_list(mallory, DeviceKeyPair.generate())  # valid, but another account's
    plan = decide(view, bob, 1, bob.encrypt(alice, update(1, foreign)))
    assert plan.device_lists == () and [r.code for r in plan.nacks] == ["malformed"]
    tampered = bytearray(device_list(bob.identity, bob.device))
    tampered[-1] ^= 1  # the signature no longer verifies
    plan = decide(view, bob, 2, bob.encrypt(alice, update(2, bytes(tampered))))
    assert plan.device_lists == () and [r.code for r in plan.nacks] == ["malformed"]


def test_a_new_device_of_a_contact_is_accepted_with_its_list_as_first_message() -> None:
    alice, bob, view = setup()
    bob2 = second_device(bob, "bob2")
    bob2.start_session(alice)
    signed = device_list(bob.identity, bob.device, bob2.device)
    hint = DeviceHint(device=device(bob2), addrs=("/ip4/192.0.2.2/tcp/1",), relays=())
    plan = decide(view, bob2, 1, bob2.encrypt(alice, update(1, signed, hint)), account(bob))
    assert plan.acks == (mid(1),) and not plan.nacks and not plan.new_contacts
    (received,) = plan.device_lists
    assert received.new_device == device(bob2)
    (added,) = plan.device_updates
    assert (added.account, added.device, added.addrs) == (account(bob), device(bob2),
                                                          hint.addrs)
    assert [(a, d) for a, d, _ in plan.sessions] == [(account(bob), device(bob2))]
    assert plan.receipts and plan.receipts[0].device == device(bob2)  # it came via a relay


def test_a_new_device_without_a_list_naming_it_is_refused_and_nothing_kept() -> None:
    alice, bob, view = setup()
    contents = [Text(id=mid(1), sent_at_ms=NOW_MS, body="hi, a new device here"),
                DeviceListUpdate(id=mid(2), sent_at_ms=NOW_MS,
                                 signed_list=device_list(bob.identity, bob.device))]
    senders = [second_device(bob, f"bob2-{n}") for n in range(len(contents))]
    for sender in senders:
        sender.start_session(alice)  # takes one of Alice's one-time prekeys from her bundle
    before = view.snapshot()
    for n, (sender, content) in enumerate(zip(senders, contents, strict=True), start=1):
        plan = decide(view, sender, n, sender.encrypt(alice, encode_content(content)))
        assert [r.code for r in plan.nacks] == ["unknown-sender"]
        assert plan.sessions == () and plan.prekeys is None and plan.device_updates == ()
        view.apply(plan)
    assert view.snapshot() == before


def test_transcripts_only_from_our_own_devices() -> None:
    alice, bob, view = setup()
    transcript = Transcript(id=mid(1), sent_at_ms=NOW_MS, to=account(bob), body="sent on 2")
    plan = decide(view, bob, 1, bob.encrypt(alice, encode_content(transcript)))
    assert plan.transcripts == () and [r.code for r in plan.nacks] == ["malformed"]
    # Alice's second device, which she knows (a row under her own account), sends one.
    alice2 = second_device(alice, "alice2")
    alice2.start_session(alice)
    view.contacts[account(alice)] = ""
    view.devices[device(alice2)] = account(alice)
    plan = decide(view, alice2, 2, alice2.encrypt(alice, encode_content(
        replace(transcript, id=mid(2)))))
    assert not plan.nacks and plan.acks == (mid(2),)
    (got,) = plan.transcripts
    assert (got.to, got.message_id, got.body) == (account(bob), mid(2), "sent on 2")
    # A text from our own device is not a thing: refused.
    plan = decide(view, alice2, 3, alice2.encrypt(alice, encode_content(
        Text(id=mid(3), sent_at_ms=NOW_MS, body="to whom?"))))
    assert [r.code for r in plan.nacks] == ["malformed"] and plan.texts == ()
