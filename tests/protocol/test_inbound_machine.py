"""The inbound machine (node.protocol.inbound) without sockets, database or clock: real protocol
crypto (node.testing's parties), an in-memory view, and times passed in as numbers.

Alice is the receiver (the view is her state); Bob is a contact with a confirmed session; Carol
and Dave are strangers who may introduce themselves with one of Alice's invite tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.binding import sign_binding
from node.protocol.content import PAD_BLOCK, Intro, Receipt, Text, decode_content, encode_content
from node.protocol.inbound import (
    ContactRef,
    DeliveryConfirmed,
    DeviceUpdate,
    InboundLimits,
    InboundStream,
    Incoming,
    NewContact,
    PeerMisbehaving,
    Plan,
    QueuedReceipt,
    ReceivedText,
    StrangerGate,
    clean_name,
    decide_batch,
)
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.prekeys import PreKeyStore
from node.protocol.session import SessionRecord
from node.protocol.wire import MAX_ACK_IDS, Ack, Msg, Nack, decode_frame, encode_frame
from node.testing import FIXED_NOW, Party, session_pair

NOW_MS = FIXED_NOW * 1000
NAME_CHARS = 64
LIMITS = InboundLimits(frames_per_s=1000, max_consecutive_failures=64, max_name_chars=NAME_CHARS)
TOKEN = b"T" * 16


def mid(n: int) -> bytes:
    return bytes([n]) * 16


def account(party: Party) -> bytes:
    return party.identity.public.to_bytes()


def device(party: Party) -> bytes:
    return party.device.public.to_bytes()


class MemoryView:
    """Alice's state in memory: what the machine reads (InboundView) and `apply`, which does
    what the shell's transaction does with a plan."""

    def __init__(self, me: Party) -> None:
        self.identity: IdentityKeyPair = me.identity
        self.prekey_store: PreKeyStore = me.prekeys
        self.contacts: dict[bytes, str] = {}  # account -> name
        self.devices: dict[bytes, bytes] = {}  # device -> account
        self.device_info: dict[bytes, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}
        self.records: dict[tuple[bytes, bytes], SessionRecord] = {}
        self.seen: set[tuple[bytes, bytes]] = set()
        self.invites: dict[bytes, int] = {}  # token -> expiry (ms)
        self.history: list[tuple[str, str]] = []  # (contact, body)
        self.delivered: list[DeliveryConfirmed] = []
        self.queued: list[QueuedReceipt] = []

    # --- InboundView ---

    def contact_of_device(self, device: bytes) -> ContactRef | None:
        acct = self.devices.get(device)
        return ContactRef(acct, self.contacts[acct]) if acct is not None else None

    def contact_of_account(self, account: bytes) -> ContactRef | None:
        name = self.contacts.get(account)
        return ContactRef(account, name) if name is not None else None

    def seen_among(self, account: bytes, message_ids: Sequence[bytes]) -> set[bytes]:
        return {m for m in message_ids if (account, m) in self.seen}

    def session(self, account: bytes, device: bytes) -> SessionRecord:
        return self.records.get((account, device)) or SessionRecord()

    def prekeys(self) -> PreKeyStore:
        return self.prekey_store

    def invite_is_valid(self, token: bytes, *, now_ms: int) -> bool:
        return self.invites.get(token, 0) > now_ms

    def name_taken(self, name: str) -> bool:
        return name in self.contacts.values()

    # --- the shell's side ---

    def apply(self, plan: Plan) -> None:
        for new in plan.new_contacts:
            assert new.account not in self.contacts and not self.name_taken(new.name)
            self.contacts[new.account] = new.name
            self.devices[new.device] = new.account
            self.device_info[new.device] = (new.peer_id, new.addrs, new.relays)
        for update in plan.device_updates:
            self.device_info[update.device] = (update.peer_id, update.addrs, update.relays)
        self.seen.update(plan.seen)
        self.history += [(t.contact, t.body) for t in plan.texts]
        self.delivered += plan.confirmations
        self.queued += plan.receipts
        for acct, dev, record in plan.sessions:
            self.records[(acct, dev)] = record
        if plan.prekeys is not None:
            self.prekey_store = plan.prekeys

    def snapshot(self) -> object:
        """Everything, as plain values: equal snapshots mean nothing changed."""
        return (dict(self.contacts), dict(self.devices), dict(self.device_info),
                {k: r.to_bytes() for k, r in self.records.items()}, set(self.seen),
                self.prekey_store.to_bytes(), list(self.history), list(self.delivered),
                list(self.queued))


def alice_knows_bob() -> tuple[Party, Party, MemoryView]:
    alice, bob = session_pair()
    view = MemoryView(alice)
    view.contacts[account(bob)] = "bob"
    view.devices[device(bob)] = account(bob)
    view.records[(account(bob), device(bob))] = alice.sessions["bob"]
    view.invites[TOKEN] = NOW_MS + 3_600_000
    return alice, bob, view


def sealed_text(sender: Party, to: Party, n: int, body: str | None = None) -> bytes:
    """The session message of a text with id mid(n)."""
    content = Text(id=mid(n), sent_at_ms=NOW_MS - 1000 + n, body=body or f"text {n}")
    return sender.encrypt(to, encode_content(content))


def msg(n: int, message: bytes) -> bytes:
    return encode_frame(Msg(mid(n), message))


def stream_from(party: Party, limits: InboundLimits = LIMITS, now: float = 0.0) -> InboundStream:
    return InboundStream(device=device(party), peer_id=party.device.public.peer_id(),
                         limits=limits, now=now)


def feed(stream: InboundStream, view: MemoryView, frames: Sequence[bytes],
         now: float = 0.0) -> Plan:
    return stream.receive(frames, now=now, now_ms=NOW_MS, view=view)


def relayed(sender: Party, n: int, message: bytes, claimed: Party | None = None) -> Incoming:
    """What the relay client makes of a sealed envelope from `sender` (claiming `claimed`)."""
    return Incoming(device(sender), sender.device.public.peer_id(), mid(n), message,
                    claimed_account=account(claimed or sender))


def decide(view: MemoryView, items: Sequence[Incoming]) -> Plan:
    return decide_batch(items, view=view, now_ms=NOW_MS, max_name_chars=NAME_CHARS)


OWN = b"own"  # intro_from's default: the stranger's own device's binding


def intro_from(stranger: Party, to: Party, n: int, *, name: str = "Carol",
               token: bytes | None = TOKEN, addrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/1",),
               binding: bytes | None = OWN) -> bytes:
    """A stranger's first message: a prekey message carrying an intro (with the stranger's
    device binding, as a genuine sender sends it, unless `binding` says otherwise)."""
    if to.name not in stranger.sessions:
        stranger.start_session(to)
    if binding == OWN:
        binding = sign_binding(stranger.device, stranger.identity.public)
    content = Intro(id=mid(n), sent_at_ms=NOW_MS, name=name, addrs=addrs, token=token,
                    binding=binding)
    return stranger.encrypt(to, encode_content(content))


def texts(plan: Plan) -> list[str]:
    return [t.body for t in plan.texts]


# --- accepting ------------------------------------------------------------------------------------


def test_a_text_is_accepted_committed_and_acked_after() -> None:
    alice, bob, view = alice_knows_bob()
    before = view.records[(account(bob), device(bob))].to_bytes()
    plan = feed(stream_from(bob), view, [msg(1, sealed_text(bob, alice, 1, "hello"))])
    assert plan.acks == (mid(1),) and plan.nacks == () and plan.error is None
    assert plan.accepted == 1 and plan.failures == 0
    assert plan.texts == (ReceivedText(account=account(bob), contact="bob", message_id=mid(1),
                                       body="hello", sent_at_ms=NOW_MS - 999),)
    assert plan.notices == plan.texts
    assert plan.seen == ((account(bob), mid(1)),)
    ((acct, dev, record),) = plan.sessions
    assert (acct, dev) == (account(bob), device(bob)) and record.to_bytes() != before
    assert plan.prekeys is None  # a ratchet message uses no prekey
    assert plan.receipts == ()  # a direct stream acks end to end: no receipt
    assert [decode_frame(f) for f in plan.reply_frames()] == [Ack((mid(1),))]
    view.apply(plan)
    assert view.history == [("bob", "hello")]


def test_duplicates_are_acked_again_and_shown_once_even_within_one_batch() -> None:
    alice, bob, view = alice_knows_bob()
    frame = msg(1, sealed_text(bob, alice, 1))
    stream = stream_from(bob)
    plan = feed(stream, view, [frame, frame, frame])
    assert plan.acks == (mid(1),) * 3 and plan.accepted == 1 and texts(plan) == ["text 1"]
    view.apply(plan)
    again = feed(stream, view, [frame])
    assert again.acks == (mid(1),) and again.accepted == 0 and again.failures == 0
    assert not (again.texts or again.notices or again.seen or again.sessions)
    # even a resend whose bytes no longer decrypt (the ratchet moved on) is recognised by id
    assert feed(stream, view, [msg(1, b"\x01 stale")]).acks == (mid(1),)


def test_messages_of_a_ratchet_arriving_out_of_order_are_all_accepted() -> None:
    alice, bob, view = alice_knows_bob()
    frames = [msg(n, sealed_text(bob, alice, n)) for n in range(1, 7)]
    stream = stream_from(bob)
    in_one_batch = feed(stream, view, [frames[i] for i in (2, 0, 1)])
    assert texts(in_one_batch) == ["text 3", "text 1", "text 2"]
    view.apply(in_one_batch)
    for i in (5, 3, 4):  # one batch each, applied in between
        plan = feed(stream, view, [frames[i]])
        assert plan.accepted == 1 and plan.nacks == ()
        view.apply(plan)
    assert [body for _, body in view.history] == [f"text {n}" for n in (3, 1, 2, 6, 4, 5)]


def test_a_receipt_confirms_our_messages_inside_the_batch() -> None:
    alice, bob, view = alice_knows_bob()
    content = Receipt(id=mid(9), sent_at_ms=NOW_MS, ids=(mid(1), mid(2)))
    plan = feed(stream_from(bob), view, [msg(9, bob.encrypt(alice, encode_content(content)))])
    confirmed = DeliveryConfirmed(device=device(bob), ids=(mid(1), mid(2)))
    assert plan.confirmations == plan.notices == (confirmed,)
    assert plan.acks == (mid(9),) and plan.texts == ()


def test_an_intro_from_a_known_device_updates_its_addresses() -> None:
    alice, bob, view = alice_knows_bob()
    content = Intro(id=mid(4), sent_at_ms=NOW_MS, name="Bobby", addrs=("/ip4/10.0.0.2/tcp/7",),
                    relays=("/ip4/10.0.0.9/tcp/1/p2p/x",))
    plan = feed(stream_from(bob), view, [msg(4, bob.encrypt(alice, encode_content(content)))])
    assert plan.device_updates == (DeviceUpdate(
        account=account(bob), device=device(bob), peer_id=bob.device.public.peer_id(),
        addrs=content.addrs, relays=content.relays, seen_at_ms=NOW_MS),)
    assert plan.new_contacts == () and plan.acks == (mid(4),)


def test_an_intros_ts_dates_its_addresses() -> None:
    """PROTOCOL.md section 21 "Where a device is": the shell keeps the newest, by this, in
    whatever order the intros came."""
    alice, bob, view = alice_knows_bob()
    newer = Intro(id=mid(4), sent_at_ms=NOW_MS + 5000, name="Bobby", addrs=())
    older = Intro(id=mid(5), sent_at_ms=NOW_MS + 1, name="Bobby", addrs=())
    plan = feed(stream_from(bob), view, [msg(n, bob.encrypt(alice, encode_content(c)))
                                         for n, c in ((4, newer), (5, older))])
    assert [u.seen_at_ms for u in plan.device_updates] == [NOW_MS + 5000, NOW_MS + 1]


# --- refusing -------------------------------------------------------------------------------------


def test_an_undecryptable_message_is_nacked_and_leaves_the_session_unchanged() -> None:
    alice, bob, view = alice_knows_bob()
    before = view.snapshot()
    junk = [msg(1, b"\x01" + os.urandom(90)), msg(2, b"\x02" + os.urandom(90)),
            msg(3, b"\x07" + os.urandom(90)), msg(4, b"")]
    plan = feed(stream_from(bob), view, junk)
    assert [(r.message_id, r.code) for r in plan.nacks] == [(mid(n), "undecryptable")
                                                            for n in (1, 2, 3, 4)]
    assert plan.acks == () and plan.failures == 4 and plan.accepted == 0
    assert not (plan.sessions or plan.seen) and plan.prekeys is None
    assert [decode_frame(f) for f in plan.reply_frames()] == [Nack(mid(n), "undecryptable")
                                                              for n in (1, 2, 3, 4)]
    view.apply(plan)
    assert view.snapshot() == before
    # the session still works
    assert feed(stream_from(bob), view, [msg(5, sealed_text(bob, alice, 5))]).accepted == 1


def test_malformed_content_is_nacked_but_its_id_is_taken() -> None:
    alice, bob, view = alice_knows_bob()
    not_content = bob.encrypt(alice, b"not padded CBOR content")
    other_id = bob.encrypt(alice, encode_content(Text(id=mid(7), sent_at_ms=NOW_MS, body="x")))
    stream = stream_from(bob)
    plan = feed(stream, view, [msg(1, not_content), msg(2, other_id)])
    assert [(r.message_id, r.code) for r in plan.nacks] == [(mid(1), "malformed"),
                                                            (mid(2), "malformed")]
    assert plan.texts == () and plan.acks == () and plan.accepted == 0
    # It decrypted: the session advanced and the id is taken, so a resend is a duplicate.
    assert len(plan.sessions) == 1
    assert plan.seen == ((account(bob), mid(1)), (account(bob), mid(2)))
    view.apply(plan)
    assert feed(stream, view, [msg(1, not_content)]).acks == (mid(1),)


def test_an_unknown_device_is_refused_without_a_valid_invite_token() -> None:
    alice, _bob, view = alice_knows_bob()
    carol = Party.create("carol")
    view.invites[b"E" * 16] = NOW_MS  # expired at NOW_MS
    stream = stream_from(carol)
    intros = [intro_from(carol, alice, 1, token=token)
              for token in (None, b"U" * 16, b"E" * 16)]  # none, unknown, expired
    carol.sessions.clear()
    carol.start_session(alice)
    first_text = sealed_text(carol, alice, 2)  # a prekey message, but not an intro
    before = view.snapshot()  # (after Carol took Alice's bundles: that marks prekeys offered)
    for intro in intros:
        plan = feed(stream, view, [msg(1, intro)])
        assert [(r.message_id, r.code) for r in plan.nacks] == [(mid(1), "unknown-sender")]
        assert not (plan.new_contacts or plan.sessions or plan.seen) and plan.prekeys is None
        view.apply(plan)
    # not a first message at all, and a text instead of an intro
    plan = feed(stream, view, [msg(3, b"\x01" + os.urandom(60)), msg(2, first_text)])
    assert [r.code for r in plan.nacks] == ["unknown-sender"] * 2 and plan.acks == ()
    view.apply(plan)
    assert view.snapshot() == before  # no contact, no session, no prekey used


def test_a_valid_invite_token_makes_the_stranger_a_contact() -> None:
    alice, _bob, view = alice_knows_bob()
    carol = Party.create("carol")
    stream = stream_from(carol)
    intro = intro_from(carol, alice, 1, name="  Carol\x07 ")
    hi = sealed_text(carol, alice, 2, "hi alice")
    prekeys_before = view.prekey_store.to_bytes()
    plan = feed(stream, view, [msg(1, intro), msg(2, hi)])
    new = NewContact(account=account(carol), account_id=carol.identity.public.account_id(),
                     name="Carol", device=device(carol), peer_id=carol.device.public.peer_id(),
                     addrs=("/ip4/127.0.0.1/tcp/1",), relays=(),
                     binding=sign_binding(carol.device, carol.identity.public),
                     seen_at_ms=NOW_MS)  # the intro's ts: it has no `at`
    assert plan.new_contacts == (new,)
    assert plan.acks == (mid(1), mid(2)) and plan.nacks == () and plan.accepted == 2
    assert plan.notices == (new, plan.texts[0]) and texts(plan) == ["hi alice"]
    assert plan.texts[0].contact == "Carol"
    assert [(a, d) for a, d, _ in plan.sessions] == [(account(carol), device(carol))]
    assert plan.prekeys is not None and plan.prekeys.to_bytes() != prekeys_before
    assert view.prekey_store.to_bytes() == prekeys_before  # the machine wrote nothing
    view.apply(plan)
    assert view.contacts[account(carol)] == "Carol"
    # the same intro again is a duplicate now
    assert feed(stream, view, [msg(1, intro)]).acks == (mid(1),)


def test_introductions_get_unique_clean_names_and_one_device_per_account() -> None:
    alice, _bob, view = alice_knows_bob()
    carol, dave = Party.create("carol"), Party.create("dave")
    second = Party(name="carol-phone", identity=carol.identity, device=DeviceKeyPair(os.urandom(32)),
                   prekeys=carol.prekeys)
    items = [
        Incoming(device(carol), "c", mid(1), intro_from(carol, alice, 1, name="bob")),
        Incoming(device(dave), "d", mid(2), intro_from(dave, alice, 2, name="--bob")),
        Incoming(device(second), "s", mid(3), intro_from(second, alice, 3, name="x")),
    ]
    plan = decide(view, items)
    assert [c.name for c in plan.new_contacts] == ["bob-2", "bob-3"]
    assert [(r.message_id, r.code) for r in plan.nacks] == [(mid(3), "unknown-sender")]
    assert len(clean_name("y" * 100, max_chars=NAME_CHARS)) == NAME_CHARS
    # control and format characters go (they do not become spaces); runs of spaces are one
    assert clean_name(" a\n\tb\u200b  c ", max_chars=NAME_CHARS) == "ab c"


def test_a_sealed_intro_names_its_device_only_with_the_devices_binding() -> None:
    """PROTOCOL.md section 14: out of a mailbox the sending device is only claimed, so an intro
    must carry that device's binding to its account. Mallory, holding one of Alice's invite
    tokens, cannot make Alice file Bob's (or anyone's) device under her account."""
    alice, _bob, view = alice_knows_bob()
    mallory, victim = Party.create("mallory"), Party.create("victim")
    forged_device = Party(name="m-as-victim", identity=mallory.identity, device=victim.device,
                          prekeys=mallory.prekeys)
    claims = {
        "none": None,
        "her own device's": sign_binding(mallory.device, mallory.identity.public),
        "the victim's to the victim's account": sign_binding(victim.device,
                                                              victim.identity.public),
        "junk": b"\x00" * 64,
    }
    intros = []
    for n, bind in enumerate(claims.values(), start=1):
        forged_device.sessions.clear()
        intros.append(intro_from(forged_device, alice, n, binding=bind))
    before = view.snapshot()  # (after Mallory took Alice's bundles: that marks prekeys offered)
    for n, intro in enumerate(intros, start=1):
        plan = decide(view, [relayed(forged_device, n, intro)])
        assert [(r.message_id, r.code) for r in plan.nacks] == [(mid(n), "unknown-sender")]
        assert not plan.new_contacts and plan.acks == ()
        view.apply(plan)
    assert view.snapshot() == before
    # On a direct stream the transport authenticated the device: an intro without a binding is
    # accepted (older senders), one with a binding that does not verify is not.
    carol, dave = Party.create("carol"), Party.create("dave")
    plan = feed(stream_from(carol), view, [msg(9, intro_from(carol, alice, 9, binding=None))])
    assert [c.binding for c in plan.new_contacts] == [None]
    wrong = sign_binding(carol.device, dave.identity.public)
    plan = feed(stream_from(dave), view, [msg(10, intro_from(dave, alice, 10, binding=wrong))])
    assert [r.code for r in plan.nacks] == ["unknown-sender"] and not plan.new_contacts
    # And the genuine sealed intro, with its binding, is accepted with it.
    plan = decide(view, [relayed(victim, 11, intro_from(victim, alice, 11))])
    assert [c.binding for c in plan.new_contacts] == [
        sign_binding(victim.device, victim.identity.public)]


def test_an_envelope_claiming_another_account_is_refused() -> None:
    alice, bob, view = alice_knows_bob()
    carol, dave = Party.create("carol"), Party.create("dave")
    view.contacts[account(carol)] = "carol"
    items = [
        # Bob's device, but the envelope names Carol's account
        relayed(bob, 1, sealed_text(bob, alice, 1), claimed=carol),
        # Dave's valid intro, in an envelope naming Carol's account
        relayed(dave, 2, intro_from(dave, alice, 2), claimed=carol),
    ]
    before = view.snapshot()
    plan = decide(view, items)
    assert [(r.message_id, r.code) for r in plan.nacks] == [(mid(1), "unknown-sender"),
                                                            (mid(2), "unknown-sender")]
    view.apply(plan)
    assert view.snapshot() == before


# --- limits ---------------------------------------------------------------------------------------


def test_a_flood_beyond_the_token_bucket_ends_the_stream_before_anything_is_done() -> None:
    alice, bob, view = alice_knows_bob()
    frame = msg(1, sealed_text(bob, alice, 1))
    limits = InboundLimits(frames_per_s=10, max_consecutive_failures=64, max_name_chars=64)
    stream = stream_from(bob, limits, now=100.0)
    plan = feed(stream, view, [frame] * 20, now=100.0)  # the burst: twice the rate
    assert plan.error is None and plan.accepted == 1
    view.apply(plan)
    flooded = feed(stream, view, [frame], now=100.0)
    assert isinstance(flooded.error, PeerMisbehaving)
    assert str(flooded.error) == "more than 10 frames/s: flooding"
    assert flooded.acks == () and flooded.reply_frames() == []
    # time refills the bucket: a fifth of a second later one frame is allowed again
    assert feed(stream, view, [frame], now=100.2).acks == (mid(1),)


def test_consecutive_refusals_beyond_the_limit_disconnect_the_peer() -> None:
    alice, bob, view = alice_knows_bob()
    limits = InboundLimits(frames_per_s=1000, max_consecutive_failures=3, max_name_chars=64)
    stream = stream_from(bob, limits)
    junk = iter(range(100, 200))

    def refused(count: int) -> Plan:
        return feed(stream, view, [msg(next(junk), b"\x01junk") for _ in range(count)])

    assert refused(2).error is None and refused(1).error is None  # 3 in a row: the limit
    good = feed(stream, view, [msg(1, sealed_text(bob, alice, 1))])  # an acceptance resets it
    assert good.error is None
    view.apply(good)
    assert refused(3).error is None
    duplicate = feed(stream, view, [msg(1, b"\x01 resend")])  # neither accepted nor refused
    assert duplicate.error is None and duplicate.acks == (mid(1),)
    cut = refused(1)
    assert isinstance(cut.error, PeerMisbehaving)
    assert str(cut.error) == "4 frames in a row refused"
    assert [decode_frame(f) for f in cut.reply_frames()] == [Nack(cut.nacks[0].message_id,
                                                                  "undecryptable")]


def test_a_frame_that_breaks_the_stream_ends_it_after_the_frames_before_it() -> None:
    alice, bob, view = alice_knows_bob()
    good = [msg(n, sealed_text(bob, alice, n)) for n in (1, 2)]
    plan = feed(stream_from(bob), view, [good[0], b"\xff not cbor", good[1]])
    assert plan.acks == (mid(1),) and texts(plan) == ["text 1"]
    assert isinstance(plan.error, DecodeError)
    plan = feed(stream_from(bob), view, [encode_frame(Ack((mid(1),)))])
    assert plan.acks == () and isinstance(plan.error, DecodeError)
    assert str(plan.error) == "unexpected Ack frame on inbound stream"


def test_acks_are_split_into_frames_of_at_most_max_ack_ids() -> None:
    ids = tuple(i.to_bytes(16, "big") for i in range(MAX_ACK_IDS + 1))
    frames = [decode_frame(f) for f in Plan(now_ms=0, acks=ids).reply_frames()]
    assert frames == [Ack(ids[:MAX_ACK_IDS]), Ack(ids[MAX_ACK_IDS:])]


# --- relays ---------------------------------------------------------------------------------------


def test_receipts_are_queued_only_for_messages_that_came_through_a_relay() -> None:
    alice, bob, view = alice_knows_bob()
    receipt = Receipt(id=mid(3), sent_at_ms=NOW_MS, ids=(mid(50),))
    items = [
        relayed(bob, 1, sealed_text(bob, alice, 1)),
        relayed(bob, 1, b"\x01 the same envelope from a second relay"),
        relayed(bob, 3, bob.encrypt(alice, encode_content(receipt))),  # receipts: no receipt
        relayed(bob, 4, b"\x01 undecryptable"),
        relayed(bob, 2, sealed_text(bob, alice, 2)),
    ]
    plan = decide(view, items)
    assert plan.acks == (mid(1), mid(1), mid(3), mid(2)) and plan.accepted == 3
    assert plan.receipts == (QueuedReceipt(account=account(bob), device=device(bob),
                                           ids=(mid(1), mid(2))),)
    view.apply(plan)
    # direct, the same kind of messages queue no receipt: the ack frame is the confirmation
    direct = feed(stream_from(bob), view, [msg(5, sealed_text(bob, alice, 5))])
    assert direct.accepted == 1 and direct.receipts == ()
    # a relayed introduction is confirmed too, to the new contact's device
    carol = Party.create("carol")
    intro = decide(view, [relayed(carol, 6, intro_from(carol, alice, 6))])
    assert intro.receipts == (QueuedReceipt(account=account(carol), device=device(carol),
                                            ids=(mid(6),)),)


# --- crash recovery -------------------------------------------------------------------------------


def test_a_plan_not_applied_changes_nothing_and_the_same_frames_are_decided_again() -> None:
    alice, bob, view = alice_knows_bob()
    carol = Party.create("carol")
    bob_frames = [msg(n, sealed_text(bob, alice, n)) for n in (1, 2)]
    carol_items = [Incoming(device(carol), "c", mid(3), intro_from(carol, alice, 3)),
                   Incoming(device(carol), "c", mid(4), sealed_text(carol, alice, 4))]
    before = view.snapshot()

    def decide_all() -> tuple[Plan, Plan]:
        return feed(stream_from(bob), view, bob_frames), decide(view, carol_items)

    first = decide_all()  # the shell crashed before its commit: nothing applied
    assert view.snapshot() == before
    second = decide_all()
    for a, b in zip(first, second, strict=True):
        assert (a.acks, a.nacks, a.texts, a.new_contacts, a.seen) == \
               (b.acks, b.nacks, b.texts, b.new_contacts, b.seen)
    assert second[0].accepted == 2 and second[1].accepted == 2
    for plan in second:
        view.apply(plan)
    assert view.history == [("bob", "text 1"), ("bob", "text 2"), ("Carol", "text 4")]
    # after the commit the same frames are duplicates: acked again, nothing new
    third = decide_all()
    assert third[0].acks == (mid(1), mid(2)) and third[1].acks == (mid(3), mid(4))
    for plan in third:
        assert plan.accepted == 0 and not (plan.nacks or plan.texts or plan.new_contacts)
        assert not (plan.sessions or plan.notices) and plan.prekeys is None


@pytest.mark.parametrize("changes", [{"frames_per_s": 0}, {"max_consecutive_failures": -1},
                                     {"max_name_chars": 3}])
def test_limits_must_make_sense(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        InboundLimits(**{"frames_per_s": 10, "max_consecutive_failures": 1,
                         "max_name_chars": 64, **changes})


# --- work strangers can cause --------------------------------------------------


def _counting_decrypts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts SessionRecord.decrypt calls (each one costs a PQXDH agreement for a first message)."""
    calls = [0]
    real = SessionRecord.decrypt

    def counting(self: SessionRecord, *args: object, **kwargs: object) -> bytes:
        calls[0] += 1
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SessionRecord, "decrypt", counting)
    return calls


def gated_stream(party: Party, gate: StrangerGate, now: float = 0.0) -> InboundStream:
    return InboundStream(device=device(party), peer_id=party.device.public.peer_id(),
                         limits=LIMITS, now=now, gate=gate)


def test_a_refused_first_message_is_remembered_so_its_replay_costs_no_decryption(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, _bob, view = alice_knows_bob()
    mallory = Party.create("mallory")
    forged = intro_from(mallory, alice, 1, token=b"U" * 16)  # no invite of Alice's
    gate = StrangerGate(per_s=100, burst=100, remember=8, now=0.0)
    decrypts = _counting_decrypts(monkeypatch)
    for n in range(3):  # the same bytes, on new streams (as from new connections)
        plan = feed(gated_stream(mallory, gate), view, [msg(1, forged)], now=float(n))
        assert [(r.message_id, r.code) for r in plan.nacks] == [(mid(1), "unknown-sender")]
        assert plan.acks == () and not plan.sessions and plan.prekeys is None
    assert decrypts[0] == 1  # only the first copy was decrypted
    assert "refused before" in plan.nacks[0].reason
    # The memory is bounded: after `remember` other refusals the oldest is forgotten.
    for n in range(8):
        other = Party.create(f"m{n}")
        feed(gated_stream(other, gate), view, [msg(2, intro_from(other, alice, 2, token=None))])
    feed(gated_stream(mallory, gate), view, [msg(1, forged)], now=10.0)
    assert decrypts[0] == 1 + 8 + 1


def test_first_messages_from_strangers_beyond_the_budget_are_deferred_cheaply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, bob, view = alice_knows_bob()
    gate = StrangerGate(per_s=1, burst=2, remember=64, now=0.0)
    decrypts = _counting_decrypts(monkeypatch)
    strangers = [Party.create(f"s{n}") for n in range(4)]
    junk = [intro_from(s, alice, 10 + n, token=None) for n, s in enumerate(strangers)]
    for n, (stranger, message) in enumerate(zip(strangers, junk, strict=True)):
        plan = feed(gated_stream(stranger, gate), view, [msg(10 + n, message)])
        if n < 2:  # within the burst: decrypted, then refused
            assert plan.nacks[0].code == "unknown-sender" and plan.error is None
        else:  # over the budget: neither acked nor refused (the sender tries again later),
            # and the stream ends so the peer cannot keep it busy
            assert plan.deferred == (mid(10 + n),) and plan.nacks == () and plan.acks == ()
            assert isinstance(plan.error, PeerMisbehaving)
            assert "first messages from unknown devices" in str(plan.error)
    assert decrypts[0] == 2
    # A contact is not charged to the strangers' budget: Bob's message is decrypted at once.
    plan = feed(gated_stream(bob, gate), view, [msg(1, sealed_text(bob, alice, 1))])
    assert plan.accepted == 1 and plan.error is None
    # A genuine newcomer deferred now is decided once the budget refills.
    carol = Party.create("carol")
    intro = intro_from(carol, alice, 30)
    assert feed(gated_stream(carol, gate), view, [msg(30, intro)]).deferred == (mid(30),)
    plan = feed(gated_stream(carol, gate, now=1.0), view, [msg(30, intro)], now=1.0)
    assert plan.accepted == 1 and [c.name for c in plan.new_contacts] == ["Carol"]


def test_relay_batches_use_the_memory_but_not_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Deposits in our mailbox are each processed once and then deleted (acked), in slices that
    # yield; deferring them would only make us fetch and unseal them again.
    alice, _bob, view = alice_knows_bob()
    gate = StrangerGate(per_s=1, burst=1, remember=64, now=0.0)
    decrypts = _counting_decrypts(monkeypatch)
    strangers = [Party.create(f"s{n}") for n in range(3)]
    items = [relayed(s, 10 + n, intro_from(s, alice, 10 + n, token=None))
             for n, s in enumerate(strangers)]
    plan = decide_batch(items, view=view, now_ms=NOW_MS, max_name_chars=NAME_CHARS, gate=gate)
    assert [r.code for r in plan.nacks] == ["unknown-sender"] * 3 and plan.deferred == ()
    assert decrypts[0] == 3
    again = decide_batch(items, view=view, now_ms=NOW_MS, max_name_chars=NAME_CHARS, gate=gate)
    assert [r.code for r in again.nacks] == ["unknown-sender"] * 3 and decrypts[0] == 3


def test_an_intros_binding_is_64_bytes_on_the_wire_and_in_the_object() -> None:
    carol = Party.create("carol")
    bind = sign_binding(carol.device, carol.identity.public)
    intro = Intro(id=mid(1), sent_at_ms=NOW_MS, name="c", addrs=(), binding=bind)
    assert decode_content(encode_content(intro)) == intro
    with pytest.raises(ValueError, match="64 bytes"):
        Intro(id=mid(1), sent_at_ms=NOW_MS, name="c", addrs=(), binding=bind[:63])
    body = {"v": 1, "t": "intro", "id": mid(1), "ts": NOW_MS, "name": "c", "addrs": [],
            "relays": [], "bind": bind[:63]}
    encoded = codec.encode(body)
    padded = encoded + b"\x80" + bytes(-(len(encoded) + 1) % PAD_BLOCK)
    with pytest.raises(DecodeError, match="bind"):
        decode_content(padded)


def test_group_contents_go_to_the_plan_in_order_and_relayed_ones_are_receipted() -> None:
    from node.protocol.content import GroupMessage, GroupOps, SenderKey
    from node.protocol.inbound import ReceivedGroupContent

    alice, bob, view = alice_knows_bob()
    gid = b"\x09" * 32
    contents = [
        GroupOps(id=mid(1), sent_at_ms=NOW_MS, group_id=gid, ops=(b"op",)),
        SenderKey(id=mid(2), sent_at_ms=NOW_MS, group_id=gid, key_id=b"\x01" * 32,
                  chain_key=b"\x02" * 32, iteration=0),
        GroupMessage(id=mid(3), sent_at_ms=NOW_MS, group_id=gid, message=bytes(149)),
    ]
    items = [relayed(bob, n + 1, bob.encrypt(alice, encode_content(c)))
             for n, c in enumerate(contents)]
    plan = decide(view, items)
    assert plan.groups == tuple(ReceivedGroupContent(account=account(bob), device=device(bob),
                                                     content=c) for c in contents)
    assert plan.acks == (mid(1), mid(2), mid(3)) and plan.nacks == ()
    assert plan.receipts == (QueuedReceipt(account=account(bob), device=device(bob),
                                           ids=(mid(1), mid(2), mid(3))),)
    assert plan.texts == () and plan.notices == ()
