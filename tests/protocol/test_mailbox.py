"""The relay mailbox protocol's pure part: frames, strict decoding, mailbox ids, authentication."""

from __future__ import annotations

import hashlib

import cbor2
import pytest

from node.errors import DecodeError, UnknownVersion
from node.protocol import codec
from node.protocol import mailbox as mb
from node.protocol.keys import DeviceKeyPair
from node.testing import DeterministicRandom

RNG = DeterministicRandom(b"mailbox tests")
DEVICE = DeviceKeyPair.from_bytes(RNG(32))
RELAY = DeviceKeyPair.from_bytes(RNG(32))
OTHER_RELAY = DeviceKeyPair.from_bytes(RNG(32))
NONCE = RNG(32)
BOX = mb.mailbox_id(DEVICE.public)
MID = RNG(16)

REQUESTS = [
    mb.Deposit(rid=1, box=BOX, id=MID, env=b"\x01" + RNG(60), ttl=3600),
    mb.Deposit(rid=2**64 - 1, box=BOX, id=MID, env=b"x", ttl=0),
    mb.Auth(rid=3, dev=DEVICE.public.to_bytes(), sig=RNG(64)),
    mb.Fetch(rid=4, after=0, limit=1),
    mb.Fetch(rid=5, after=2**64 - 1, limit=2**64 - 1),
    mb.Ack(rid=6, ids=(MID, RNG(16))),
    mb.Subscribe(rid=0),
]
ITEM = mb.Item(seq=7, id=MID, env=b"\x01envelope", exp=1_800_000_000)
REPLIES = [
    mb.Challenge(nonce=NONCE),
    mb.Ok(rid=9),
    mb.ErrorReply(rid=9, code=mb.MAILBOX_FULL, msg="full"),
    mb.Items(rid=10, items=(ITEM, mb.Item(seq=8, id=RNG(16), env=b"y", exp=0)), more=True),
    mb.Items(rid=11, items=(), more=False),
    mb.Push(items=(ITEM,)),
]


def _body(**fields: object) -> bytes:
    return codec.encode({"v": 1, **fields})


# --- mailbox ids and authentication -------------------------------------------------------------


def test_mailbox_id_is_sha256_of_context_and_device_key() -> None:
    expected = hashlib.sha256(b"pigeon-mailbox-v1" + DEVICE.public.to_bytes()).digest()
    assert mb.mailbox_id(DEVICE.public) == expected
    assert len(expected) == 32
    assert mb.mailbox_id(DeviceKeyPair.generate().public) != expected


def test_auth_message_layout() -> None:
    message = mb.auth_message(RELAY.public, NONCE)
    assert message == b"pigeon-mailbox-auth-v1\x00" + RELAY.public.to_bytes() + NONCE
    with pytest.raises(ValueError):
        mb.auth_message(RELAY.public, NONCE[:31])


def test_auth_verifies_and_names_the_signers_mailbox() -> None:
    sig = mb.sign_auth(DEVICE, RELAY.public, NONCE)
    assert mb.verify_auth(DEVICE.public.to_bytes(), sig, RELAY.public, NONCE) == BOX


def test_auth_is_bound_to_the_relay_the_nonce_and_the_key() -> None:
    sig = mb.sign_auth(DEVICE, RELAY.public, NONCE)
    dev = DEVICE.public.to_bytes()
    with pytest.raises(mb.AuthFailed):  # replayed to another relay
        mb.verify_auth(dev, sig, OTHER_RELAY.public, NONCE)
    with pytest.raises(mb.AuthFailed):  # replayed on another stream (another challenge)
        mb.verify_auth(dev, sig, RELAY.public, bytes(32))
    with pytest.raises(mb.AuthFailed):  # claims another device's mailbox
        mb.verify_auth(DeviceKeyPair.generate().public.to_bytes(), sig, RELAY.public, NONCE)
    forged = mb.sign_auth(DeviceKeyPair.generate(), RELAY.public, NONCE)
    with pytest.raises(mb.AuthFailed):  # signed by someone else
        mb.verify_auth(dev, forged, RELAY.public, NONCE)
    for i in (0, 31, 63):
        tampered = bytearray(sig)
        tampered[i] ^= 1
        with pytest.raises(mb.AuthFailed):
            mb.verify_auth(dev, bytes(tampered), RELAY.public, NONCE)
    with pytest.raises(mb.AuthFailed):  # not a curve point
        mb.verify_auth(b"\xff" * 32, sig, RELAY.public, NONCE)


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_requests_round_trip_canonically(request_: mb.Request) -> None:
    data = mb.encode_frame(request_)
    assert mb.decode_request(data) == request_
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_replies_round_trip_canonically(reply: mb.Reply) -> None:
    data = mb.encode_frame(reply)
    assert mb.decode_reply(data) == reply
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data


def test_wire_field_names_are_the_specified_ones() -> None:
    assert cbor2.loads(mb.encode_frame(REQUESTS[0])) == {
        "v": 1, "t": "deposit", "rid": 1, "box": BOX, "id": MID, "env": REQUESTS[0].env,
        "ttl": 3600}
    assert cbor2.loads(mb.encode_frame(REPLIES[3]))["items"][0] == {
        "seq": 7, "id": MID, "env": b"\x01envelope", "exp": 1_800_000_000}
    assert cbor2.loads(mb.encode_frame(REPLIES[5])) == {
        "v": 1, "t": "push", "items": [{"seq": 7, "id": MID, "env": b"\x01envelope",
                                        "exp": 1_800_000_000}]}


def test_a_full_items_page_fits_the_frame_limit() -> None:
    """The relay fills a page while the item costs fit ITEMS_BUDGET_BYTES; check that such a page,
    with the largest rid and seq values, encodes within MAX_MAILBOX_FRAME_BYTES."""
    for size in (1, 100, 266_240):
        items: list[mb.Item] = []
        used = 0
        while len(items) < mb.MAX_ITEMS_PER_FRAME and used + mb.item_cost(size) <= mb.ITEMS_BUDGET_BYTES:
            items.append(mb.Item(seq=mb.MAX_SEQ, id=MID, env=b"e" * size, exp=mb.MAX_SEQ))
            used += mb.item_cost(size)
        frame = mb.encode_frame(mb.Items(rid=mb.MAX_UINT, items=tuple(items), more=True))
        assert len(frame) <= mb.MAX_MAILBOX_FRAME_BYTES, size


# --- strictness: frames that reset the stream ---------------------------------------------------


@pytest.mark.parametrize("data", [
    b"\xff",                                               # not CBOR
    codec.encode([1, 2]),                                  # not a map
    codec.encode({"t": "fetch", "rid": 1, "after": 0, "limit": 1}),  # no version
    codec.encode({"v": 1, "rid": 1}),                      # no type
    codec.encode({"v": 1, "t": "subscribe"}),              # no rid: cannot be answered
    codec.encode({"v": 1, "t": "subscribe", "rid": -1}),   # negative rid
    codec.encode({"v": 1, "t": "subscribe", "rid": True}),  # a boolean is not an integer
    codec.encode({"v": 1, "t": 7, "rid": 1}),              # type not text
    _body(t="subscribe", rid=1) + b"\x00",                 # trailing bytes
])
def test_unanswerable_requests_are_decode_errors(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        mb.decode_request(data)
    assert not isinstance(info.value, mb.MalformedRequest)


def test_another_version_is_refused() -> None:
    with pytest.raises(UnknownVersion):
        mb.decode_request(codec.encode({"v": 2, "t": "subscribe", "rid": 1}))


# --- strictness: requests answered with an error --------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"t": "deposit", "box": BOX[:31], "id": MID, "env": b"e", "ttl": 1},       # short box
    {"t": "deposit", "box": BOX, "id": MID + b"x", "env": b"e", "ttl": 1},     # long id
    {"t": "deposit", "box": BOX, "id": MID, "env": b"", "ttl": 1},             # empty envelope
    {"t": "deposit", "box": BOX, "id": MID, "env": "text", "ttl": 1},          # env not bytes
    {"t": "deposit", "box": BOX, "id": MID, "env": b"e", "ttl": -1},           # negative ttl
    {"t": "deposit", "box": BOX, "id": MID, "env": b"e"},                      # missing ttl
    {"t": "deposit", "box": BOX, "id": MID, "env": b"e", "ttl": 1, "from": b"x"},  # extra field
    {"t": "auth", "dev": bytes(32), "sig": bytes(63)},
    {"t": "fetch", "after": 0, "limit": 0},                                     # limit 0
    {"t": "fetch", "after": 0},
    {"t": "ack", "ids": []},                                                    # no ids
    {"t": "ack", "ids": [MID[:15]]},
    {"t": "ack", "ids": [MID] * (mb.MAX_ACK_IDS + 1)},
    {"t": "subscribe", "box": BOX},                                             # extra field
])
def test_bad_fields_are_malformed_with_the_rid(fields: dict[str, object]) -> None:
    with pytest.raises(mb.MalformedRequest) as info:
        mb.decode_request(_body(rid=42, **fields))
    assert (info.value.rid, info.value.code) == (42, mb.MALFORMED)


def test_unknown_request_type_is_answerable() -> None:
    for kind in ("delete-everything", "ok", "push"):
        with pytest.raises(mb.MalformedRequest) as info:
            mb.decode_request(_body(t=kind, rid=5))
        assert (info.value.rid, info.value.code) == (5, mb.UNKNOWN_REQUEST)


def test_policy_sizes_are_left_to_the_relay() -> None:
    """An envelope above MAX_SEALED_BYTES and a huge TTL decode, so the relay can answer
    "too-large" and "bad-ttl" instead of "malformed"."""
    big = mb.Deposit(rid=1, box=BOX, id=MID, env=b"e" * 300_000, ttl=2**64 - 1)
    assert mb.decode_request(mb.encode_frame(big)) == big


@pytest.mark.parametrize("data", [
    _body(t="challenge", nonce=bytes(31)),
    _body(t="ok"),
    _body(t="error", rid=1, code="Not-A-Code", msg=""),
    _body(t="error", rid=1, code="x" * 33, msg=""),
    _body(t="error", rid=1, code="full"),                                       # no msg
    _body(t="items", rid=1, items=[], more=1),                                  # more not bool
    _body(t="items", rid=1, items=[{"seq": 0, "id": MID, "env": b"e", "exp": 0}], more=False),
    _body(t="items", rid=1, items=[{"seq": 1, "id": MID, "env": b"e"}], more=False),
    _body(t="items", rid=1, items=[{"seq": 1, "id": MID, "env": b"e", "exp": 0, "from": 1}],
          more=False),
    _body(t="push", items=[]),
    _body(t="push", rid=1, items=[{"seq": 1, "id": MID, "env": b"e", "exp": 0}]),
    _body(t="deposit", rid=1, box=BOX, id=MID, env=b"e", ttl=1),              # a request
])
def test_replies_are_strict(data: bytes) -> None:
    with pytest.raises(DecodeError):
        mb.decode_reply(data)


def test_error_codes_of_newer_relays_come_through() -> None:
    reply = mb.decode_reply(_body(t="error", rid=1, code="over-there", msg="newer relay"))
    assert reply == mb.ErrorReply(rid=1, code="over-there", msg="newer relay")


def test_constructors_validate() -> None:
    with pytest.raises(ValueError):
        mb.Deposit(rid=-1, box=BOX, id=MID, env=b"e", ttl=0)
    with pytest.raises(ValueError):
        mb.Deposit(rid=1, box=BOX, id=MID, env=b"", ttl=0)
    with pytest.raises(ValueError):
        mb.Ack(rid=1, ids=())
    with pytest.raises(ValueError):
        mb.Push(items=())
    with pytest.raises(ValueError):
        mb.ErrorReply(rid=1, code="", msg="")
    assert mb.split_ids([MID] * 2049) == [(MID,) * 1024, (MID,) * 1024, (MID,)]
    expected = {"too-large", "mailbox-full", "bad-ttl", "storage-full", "rate-limited",
                "malformed", "unauthorized", "unknown-request", "unknown-mailbox", "wake-refused",
                "unknown-blob", "bad-blob",  # the blob store (section 26.6)
                "relay-full"}
    assert expected == mb.ERROR_CODES


# --- deposit capabilities, deposit ids, the contacts' mailbox (PROTOCOL.md section 21) ---------


def test_deposits_with_a_capability_and_caps_requests_round_trip() -> None:
    cap = mb.contact_cap(DEVICE, b"a" * 32)
    deposit = mb.Deposit(rid=7, box=BOX, id=MID, env=b"e", ttl=0, cap=cap)
    assert mb.decode_request(mb.encode_frame(deposit)) == deposit
    # Without a capability the frame is what it always was (no "cap" key at all).
    plain = mb.Deposit(rid=7, box=BOX, id=MID, env=b"e", ttl=0)
    assert "cap" not in cbor2.loads(mb.encode_frame(plain))
    caps = mb.Caps(rid=8, set=(mb.cap_hash(cap), mb.cap_hash(mb.invite_cap(b"t" * 16))))
    assert mb.decode_request(mb.encode_frame(caps)) == caps
    assert mb.decode_request(mb.encode_frame(mb.Caps(rid=9, set=()))) == mb.Caps(rid=9, set=())


@pytest.mark.parametrize("fields", [
    {"t": "deposit", "box": BOX, "id": MID, "env": b"e", "ttl": 0, "cap": b"short"},
    {"t": "caps", "set": [b"x" * 31]},
    {"t": "caps", "set": [b"x" * 32] * (mb.MAX_CAPS + 1)},
    {"t": "caps"},
])
def test_bad_capability_fields_are_malformed(fields: dict[str, object]) -> None:
    with pytest.raises(mb.MalformedRequest) as info:
        mb.decode_request(codec.encode({"v": 1, "rid": 3, **fields}))
    assert (info.value.rid, info.value.code) == (3, mb.MALFORMED)


def test_capabilities_differ_per_contact_and_device_and_hide_what_they_came_from() -> None:
    other = DeviceKeyPair(bytes(range(32)))
    alice, carol = b"a" * 32, b"c" * 32
    caps = {mb.contact_cap(DEVICE, alice), mb.contact_cap(DEVICE, carol),
            mb.contact_cap(other, alice), mb.invite_cap(b"t" * 16)}
    assert len(caps) == 4 and all(len(c) == mb.CAP_BYTES for c in caps)
    assert mb.contact_cap(DEVICE, alice) == mb.contact_cap(DEVICE, alice)  # derived, not stored
    assert mb.cap_hash(mb.contact_cap(DEVICE, alice)) == hashlib.sha256(
        b"pigeon-deposit-cap-v1" + mb.contact_cap(DEVICE, alice)).digest()


def test_deposit_ids_are_stable_per_message_and_mailbox_and_are_not_the_message_id() -> None:
    first = mb.deposit_id(DEVICE, BOX, MID)
    assert first == mb.deposit_id(DEVICE, BOX, MID)  # a re-deposit is a duplicate at the relay
    assert first != MID and len(first) == 16
    assert first != mb.deposit_id(DEVICE, BOX, RNG(16))
    assert first != mb.deposit_id(DEVICE, bytes(32), MID)
    assert first != mb.deposit_id(DeviceKeyPair(bytes(range(32))), BOX, MID)


def test_the_contacts_mailbox_is_not_the_public_one_and_is_its_own_key() -> None:
    key = mb.mailbox_key(DEVICE)
    assert key.public != DEVICE.public and key.to_bytes() == mb.mailbox_key(DEVICE).to_bytes()
    assert mb.mailbox_id(key.public) != BOX
    nonce = RNG(32)
    relay = DeviceKeyPair(bytes(32)).public
    signature = mb.sign_auth(key, relay, nonce)
    assert mb.verify_auth(key.public.to_bytes(), signature, relay, nonce) == \
        mb.mailbox_id(key.public)


def test_an_intro_carries_the_capability_and_the_contacts_mailbox() -> None:
    from node.protocol.content import Intro, decode_content, encode_content

    cap = mb.contact_cap(DEVICE, b"a" * 32)
    box = mb.mailbox_id(mb.mailbox_key(DEVICE).public)
    intro = Intro(id=MID, sent_at_ms=1, name="bob", addrs=(), relays=(), cap=cap, box=box)
    assert decode_content(encode_content(intro)) == intro
    older = Intro(id=MID, sent_at_ms=1, name="bob", addrs=())
    assert decode_content(encode_content(older)) == older
    with pytest.raises(ValueError):
        Intro(id=MID, sent_at_ms=1, name="bob", addrs=(), box=b"short")


# --- the blob store (PROTOCOL.md section 26.6) ------------------------------------------------


def test_blob_requests_and_replies_round_trip() -> None:
    put = mb.BlobPut(rid=3, box=BOX, hash=b"h" * 32, size=10, off=4, data=b"abcdef", ttl=0,
                     cap=b"c" * 16)
    assert mb.decode_request(mb.encode_frame(put)) == put
    read = mb.BlobRead(rid=4, hash=b"h" * 32, off=0, len=mb.MAX_BLOB_PIECE_BYTES)
    assert mb.decode_request(mb.encode_frame(read)) == read
    delete = mb.BlobDelete(rid=5, hash=b"h" * 32)
    assert mb.decode_request(mb.encode_frame(delete)) == delete
    for reply in (mb.BlobHave(rid=3, have=10), mb.BlobData(rid=4, off=0, data=b"xyz")):
        assert mb.decode_reply(mb.encode_frame(reply)) == reply


def test_a_blob_piece_outside_its_blob_is_malformed_not_fatal() -> None:
    frame = codec.encode({"v": 1, "t": "blob-put", "rid": 9, "box": BOX, "hash": b"h" * 32,
                          "size": 4, "off": 2, "data": b"abc", "ttl": 0})
    with pytest.raises(mb.MalformedRequest) as refused:
        mb.decode_request(frame)
    assert (refused.value.rid, refused.value.code) == (9, "malformed")
    too_long = codec.encode({"v": 1, "t": "blob-get", "rid": 9, "hash": b"h" * 32, "off": 0,
                             "len": mb.MAX_BLOB_PIECE_BYTES + 1})
    with pytest.raises(mb.MalformedRequest):
        mb.decode_request(too_long)
