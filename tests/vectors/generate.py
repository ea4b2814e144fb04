"""Known-answer vectors for Pigeon's protocol core (PROTOCOL.md "Test vectors").

`compute(inputs)` derives every output from fixed keys and a fixed random stream
(`DeterministicRandom`); `tests/protocol/test_vectors.py` checks that the committed file still
matches. An independent implementation can check itself against `pigeon-v1.json` alone: every
input is in the file, and the random stream is specified in PROTOCOL.md.

The ML-KEM encapsulation is the one step whose randomness the library keeps to itself, so its
ciphertext is an *input*; the shared secret is an output (decapsulation is deterministic).

Run `python tests/vectors/generate.py` to (re)write the file after an intended wire change;
existing inputs are kept, so only outputs change.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

from node.protocol import mailbox, wakeup
from node.protocol.attachment import ChunkCipher, Descriptor, encrypt_stream
from node.protocol.binding import sign_binding
from node.protocol.bundle import encode_record, encode_request
from node.protocol.content import (
    DeviceHint,
    DeviceListUpdate,
    File,
    GroupMessage,
    GroupOps,
    SenderKey,
    Sync,
    Text,
    Transcript,
    encode_content,
)
from node.protocol.devicelist import DeviceEntry, DeviceList
from node.protocol.directory import AccountRecord, DeviceRecord
from node.protocol.fingerprint import SafetyNumber, fingerprint
from node.protocol.groups import GroupLog
from node.protocol.invite import ShortInvite, parse_invite
from node.protocol.kdf import INFO_PQXDH, INFO_RATCHET_INIT, hkdf
from node.protocol.keys import DeviceKeyPair, DHKeyPair, IdentityKeyPair, KEMKeyPair
from node.protocol.linking import (
    INFO_LINK,
    DevicePayload,
    LinkChannel,
    LinkCode,
    Provisioning,
    chunk_payload,
    encode_hello,
)
from node.protocol.prekeys import PreKeyStore
from node.protocol.records import PreKeyBundle, sign_record
from node.protocol.relayrecord import DIRECTORY_KEY, RelayLimits, RelayRecord
from node.protocol.sealed import SealedContent, seal, unseal
from node.protocol.senderkey import SenderChain
from node.protocol.session import SessionRecord
from node.testing import DeterministicRandom

PATH = Path(__file__).with_name("pigeon-v1.json")


def fresh_inputs() -> dict[str, Any]:
    now = 1_800_000_000
    bob_prekeys = PreKeyStore.create(now=now, rng=DeterministicRandom(b"bob-prekeys"), one_time=2)
    kem_id = next(k for k, (_, last, _) in bob_prekeys._kem.items() if not last)
    kem = KEMKeyPair(bob_prekeys._kem[kem_id][0])
    ciphertext, _ = kem.public.encapsulate()
    return {
        "now": now,
        "alice_identity_seed": "a1" * 32,
        "alice_device_seed": "a2" * 32,
        "bob_identity_seed": "b1" * 32,
        "bob_device_seed": "b2" * 32,
        "alice_random_seed": b"alice-random".hex(),
        "bob_random_seed": b"bob-random".hex(),
        "bob_prekeys_random_seed": b"bob-prekeys".hex(),
        "bob_one_time_prekeys": 2,
        "kem_ciphertext": ciphertext.hex(),
        "plaintexts": [b"Hello Bob".hex(), b"Hi Alice".hex(), b"How are you?".hex()],
        "sealed_random_seed": b"sealed".hex(),
        **SHORT_INVITE_INPUTS,
        **LINK_INPUTS,
        **MULTI_DEVICE_INPUTS,
        **MAILBOX_INPUTS,
        **ATTACHMENT_INPUTS,
        **READ_INPUTS,
        **WAKE_INPUTS,
        **GROUP_INPUTS,
        **FILE_INPUTS,
        **RELAY_INPUTS,
    }


#: Inputs of the short-invite and key-fetch vectors (PROTOCOL.md sections 14.1 and 14.2), added
#: after the others: Bob invites with a short invite; the joiner's request and Bob's reply.
SHORT_INVITE_INPUTS: dict[str, Any] = {
    "short_invite_token": "5a" * 16,
    "short_invite_addrs": ["/ip4/192.0.2.1/tcp/4001"],
    "short_invite_seq": 1_800_000_000,
    "short_invite_exp": 1_800_604_800,
    "device_record_seq": 1_800_000_000_000,
    "device_record_exp": 1_800_172_800,
    # the relay is the device key of seed 0x5e * 32
    "device_record_relays": [
        "/ip4/198.51.100.7/tcp/4001/p2p/12D3KooWJX11sa7vuW1Q1pMMA8j76s8QbTGtEcudsUwGHE5hvMbs"],
}


#: Inputs of the link vectors (PROTOCOL.md section 25.2), added after the others: Alice's new
#: device (seed 0xa3 * 32) shows a link code; her first device approves it with an ephemeral key
#: from `link_approver_random_seed` and sends a one-piece provisioning payload.
LINK_INPUTS: dict[str, Any] = {
    "link_new_device_seed": "a3" * 32,
    "link_new_random_seed": b"link-new".hex(),
    "link_approver_random_seed": b"link-approver".hex(),
    "link_nonce": "4c" * 16,
    "link_addrs": ["/ip4/192.0.2.3/tcp/4001"],
    "link_exp": 1_800_000_600,
    "link_device_list_seq": 1_800_000_000_000,
    "link_device_list_exp": 1_831_449_600,
}

#: Inputs of the multi-device vectors (PROTOCOL.md sections 25.4 and 25.5), added after the
#: short-invite ones: Bob's account gets a second device; the device-list update Bob's devices
#: send, the sent transcript of a text to Alice, and the key fetch of a known device.
MULTI_DEVICE_INPUTS: dict[str, Any] = {
    "bob_second_device_seed": "b3" * 32,
    "device_list_seq": 1_800_000_000_500,
    "device_list_exp": 1_807_689_600,
    "device_list_update_id": "d1" * 16,
    "device_list_update_ts": 1_800_000_000_600,
    "transcript_id": "7e" * 16,
    "transcript_ts": 1_800_000_000_700,
    "transcript_body": "Hi Alice, from my other device",
}

#: Inputs of the deposit capability and deposit id vectors (PROTOCOL.md sections 9 and 21),
#: added after the others: Alice deposits message `mailbox_message_id` into Bob's mailbox with
#: the capability Bob gave her; Bob registers its hash and the invite capability of his short
#: invite.
MAILBOX_INPUTS: dict[str, Any] = {
    "mailbox_message_id": "6d" * 16,
    "mailbox_deposit_ttl": 604_800,
    "sealed_with_id_random_seed": b"sealed-with-id".hex(),
}

#: Inputs of the attachment vectors (PROTOCOL.md section 26), added after the others: a 150-byte
#: plaintext in 64-byte chunks (three chunks, the last 22 bytes), its key and nonce prefix the
#: first 32 and next 16 bytes of the stream of `attachment_random_seed`, and the descriptor of it
#: with a 4-byte stand-in thumbnail.
ATTACHMENT_INPUTS: dict[str, Any] = {
    "attachment_random_seed": b"attachment".hex(),
    "attachment_plaintext": bytes(range(150)).hex(),
    "attachment_chunk_bytes": 64,
    "attachment_name": "photo.jpg",
    "attachment_media_type": "image/jpeg",
    "attachment_thumbnail": "ffd8ffd9",
    "attachment_width": 1600,
    "attachment_height": 1200,
}


#: Inputs of the read-state vector (PROTOCOL.md section 25.6, `read`), added after the others:
#: Bob read Alice's messages on one of his devices up to one she sent, and tells his others.
READ_INPUTS: dict[str, Any] = {
    "read_sync_id": "5e" * 16,
    "read_sync_ts": 1_800_000_000_800,
    "read_sync_message_id": "7a" * 16,
    "read_sync_message_ts": 1_800_000_000_750,
}

#: Wake-ups (section 29), added after the others: the device's Web Push keys are RFC 8291's
#: example user agent's; the relay's one-time key and salt are fixed here.
WAKE_INPUTS: dict[str, Any] = {
    "wake_url": "https://push.example.net/up/5f3a",
    "wake_p256dh": "042571b2becdfde360551aaf1ed0f4cd366c11cebe555f89bcb7b186a53339173168ece2eb"
                   "e018597bd30479b86e3c8f8eced577ca59187e9246990db682008b0e",
    "wake_auth": "05305932a1c7eabe13b6cec9fda48882",
    "wake_server_key": "11" * 32,
    "wake_salt": "22" * 16,
}

GROUP_INPUTS: dict[str, Any] = {
    "group_id": "9a" * 32,
    "group_name": "Family",
    "group_create_ts": 1_800_000_001_000,
    "group_add_ts": 1_800_000_001_100,
    "carol_identity_seed": "c1" * 32,
    "group_sender_random_seed": b"group-sender".hex(),
    "group_message_id": "9b" * 16,
    "group_message_ts": 1_800_000_001_200,
    "group_message_body": "Hello, group",
}


#: Inputs of the file message vector (PROTOCOL.md section 26.4), added after the others: the
#: padded `file` content carrying `attachment_descriptor` with a caption.
FILE_INPUTS: dict[str, Any] = {
    "file_id": "f1" * 16,
    "file_ts": 1_800_000_000_900,
    "file_caption": "The view from here",
}


#: Inputs of the relay record vectors (PROTOCOL.md section 28.1), added after the others.
RELAY_INPUTS: dict[str, Any] = {
    "relay_key_seed": "5b" * 32,
    "relay_record_seq": 1_800_000_000_000,
    "relay_record_exp": 1_800_007_200,
    "relay_record_addrs": ["/ip4/192.0.2.40/tcp/4040", "/ip4/192.0.2.40/udp/4040/quic-v1"],
    "relay_record_capacity": 100_000,
    "relay_record_load": 1234,
    "relay_record_version": "0.1.0",
    "relay_record_operator": "relay.example.org",
}


def compute(inputs: dict[str, Any]) -> dict[str, Any]:
    h = bytes.fromhex
    now = inputs["now"]
    alice = IdentityKeyPair(h(inputs["alice_identity_seed"]))
    alice_dev = DeviceKeyPair(h(inputs["alice_device_seed"]))
    bob = IdentityKeyPair(h(inputs["bob_identity_seed"]))
    bob_dev = DeviceKeyPair(h(inputs["bob_device_seed"]))
    rng_a = DeterministicRandom(h(inputs["alice_random_seed"]))
    rng_b = DeterministicRandom(h(inputs["bob_random_seed"]))
    out: dict[str, Any] = {}

    out["alice_identity_public"] = alice.public.to_bytes().hex()
    out["alice_account_id"] = alice.public.account_id()
    out["alice_identity_x25519"] = alice.public.to_x25519().hex()
    out["alice_device_public"] = alice_dev.public.to_bytes().hex()
    out["alice_peer_id"] = alice_dev.public.peer_id()
    out["bob_identity_public"] = bob.public.to_bytes().hex()
    out["bob_account_id"] = bob.public.account_id()
    out["bob_device_public"] = bob_dev.public.to_bytes().hex()
    out["bob_device_x25519"] = bob_dev.public.to_x25519().hex()

    prekeys = PreKeyStore.create(
        now=now,
        rng=DeterministicRandom(h(inputs["bob_prekeys_random_seed"])),
        one_time=inputs["bob_one_time_prekeys"],
    )
    bundle = prekeys.bundle(bob, bob_dev, seq=7, expires=now + 86400)
    signed_bundle = bundle.sign(bob)
    # The bundle as it was before the device binding (PROTOCOL.md section 4 "Binding"): kept
    # byte for byte as a vector a receiver must now refuse; the bound one is added below.
    out["bob_bundle"] = _unbound(bob, bundle.body()).hex()
    bundle = PreKeyBundle.verify(signed_bundle, now=now)
    spk = prekeys.signed_prekey(bundle.signed_prekey_id)
    opk = prekeys.one_time_prekey(bundle.one_time_prekey_id or 0)
    kem_entry = prekeys.kem_prekey(bundle.kem_prekey_id)
    assert spk and opk and kem_entry
    ciphertext = h(inputs["kem_ciphertext"])
    shared = kem_entry[0].decapsulate(ciphertext)
    out["kem_shared_secret"] = shared.hex()

    # PQXDH, spelled out step by step for implementers, then done by the session code.
    ephemeral = DHKeyPair(DeterministicRandom(h(inputs["alice_random_seed"]))(32))
    dh = [
        alice.dh(spk.public.to_bytes()),
        ephemeral.dh(bob.public.to_x25519()),
        ephemeral.dh(spk.public),
        ephemeral.dh(opk.public),
    ]
    out["pqxdh_ephemeral_public"] = ephemeral.public.to_bytes().hex()
    out["pqxdh_dh"] = [d.hex() for d in dh]
    sk = hkdf(b"\xff" * 32 + b"".join(dh) + shared, salt=None, info=INFO_PQXDH, length=32)
    out["pqxdh_sk"] = sk.hex()
    split = hkdf(sk, salt=None, info=INFO_RATCHET_INIT, length=96)
    out["ratchet_root_key"], out["header_key_a"], out["next_header_key_b"] = (
        split[:32].hex(), split[32:64].hex(), split[64:].hex()
    )

    plaintexts = [h(p) for p in inputs["plaintexts"]]
    a_record, b_record = SessionRecord(), SessionRecord()
    a_record.initiate(alice, bundle, rng=rng_a, kem_encapsulation=(ciphertext, shared))
    first = a_record.encrypt(plaintexts[0], rng=rng_a).message
    out["message_1_prekey"] = first.hex()
    assert b_record.decrypt(
        first, identity=bob, remote_identity=alice.public, prekeys=prekeys, rng=rng_b
    ) == plaintexts[0]
    reply = b_record.encrypt(plaintexts[1], rng=rng_b).message
    out["message_2_ratchet"] = reply.hex()
    assert a_record.decrypt(
        reply, identity=alice, remote_identity=bob.public, prekeys=prekeys, rng=rng_a
    ) == plaintexts[1]
    third = a_record.encrypt(plaintexts[2], rng=rng_a).message
    out["message_3_ratchet"] = third.hex()

    envelope = seal(
        bob_dev.public,
        SealedContent(sender=alice.public, sender_device=alice_dev.public, message=first),
        rng=DeterministicRandom(h(inputs["sealed_random_seed"])),
    )
    assert unseal(bob_dev, envelope).message == first
    out["sealed_envelope_of_message_1"] = envelope.hex()

    number = SafetyNumber.of(alice.public, bob.public)
    out["alice_fingerprint"] = fingerprint(alice.public).hex()
    out["bob_fingerprint"] = fingerprint(bob.public).hex()
    out["safety_number"] = number.digits()
    out["safety_number_qr_shown_by_alice"] = number.qr_payload().hex()

    # Short invite and key fetch (sections 14.1, 14.2), computed last so the outputs above do not
    # depend on them. The device record's bundle has no one-time keys (one_time=False).
    invite = ShortInvite(identity=bob.public, device=bob_dev.public,
                         addrs=tuple(inputs["short_invite_addrs"]),
                         token=h(inputs["short_invite_token"]), seq=inputs["short_invite_seq"],
                         expires=inputs["short_invite_exp"])
    out["short_invite_record"] = invite.record(bob).hex()
    out["short_invite_text"] = invite.to_text(bob)
    assert parse_invite(out["short_invite_text"], now=now) == invite
    out["bundle_request_frame"] = encode_request(invite.token).hex()
    dr_seq, dr_exp = inputs["device_record_seq"], inputs["device_record_exp"]
    device_record = DeviceRecord(
        identity=bob.public, device=bob_dev.public, addrs=tuple(inputs["short_invite_addrs"]),
        relays=tuple(inputs["device_record_relays"]),
        bundle=prekeys.bundle(bob, bob_dev, seq=dr_seq, expires=dr_exp, one_time=False),
        seq=dr_seq, expires=dr_exp)
    legacy_record = sign_record(bob, {
        "kind": "device", "seq": dr_seq, "exp": dr_exp, "dev": bob_dev.public.to_bytes(),
        "addrs": list(device_record.addrs), "relays": list(device_record.relays),
        "bundle": _unbound(bob, device_record.bundle.body())})
    out["bundle_reply_frame"] = encode_record(legacy_record).hex()  # unbound: refused now

    # The device binding (section 4), added after the others (the outputs above are unchanged):
    # Bob's device binds itself to Bob's account; the bundles and records that name the device
    # carry it (sections 5, 14, 23.3), and the device record's DHT key takes IK and DK (23.2).
    out["bob_device_binding"] = sign_binding(bob_dev, bob.public).hex()
    out["bob_bundle_bound"] = signed_bundle.hex()
    out["bundle_reply_frame_bound"] = encode_record(device_record.sign(bob)).hex()
    out["device_record_dht_key"] = device_record.key
    account = AccountRecord(identity=bob.public, devices=(bob_dev.public,),
                            bindings=(bytes.fromhex(out["bob_device_binding"]),),
                            seq=dr_seq, expires=dr_exp)
    out["account_record"] = account.sign(bob).hex()
    out["account_record_dht_key"] = account.key
    # Added later still: the reply as a device now sends it, with the next unoffered one-time
    # keys (opk id 5, pqpk id 6, lr false), a record only a direct requester accepts.
    direct = DeviceRecord(
        identity=bob.public, device=bob_dev.public, addrs=tuple(inputs["short_invite_addrs"]),
        relays=tuple(inputs["device_record_relays"]),
        bundle=prekeys.bundle(bob, bob_dev, seq=dr_seq, expires=dr_exp),
        seq=dr_seq, expires=dr_exp, direct=True).sign(bob)
    out["bundle_reply_frame_one_time"] = encode_record(direct).hex()
    # Multi-device (sections 25.4, 25.5), computed last for the same reason.
    second = DeviceKeyPair(h(inputs["bob_second_device_seed"]))
    device_list = DeviceList(
        identity=bob.public, entries=(DeviceEntry.make(bob_dev, bob.public),
                                      DeviceEntry.make(second, bob.public)),
        seq=inputs["device_list_seq"], expires=inputs["device_list_exp"]).sign(bob)
    out["device_list_record"] = device_list.hex()
    update = DeviceListUpdate(
        id=h(inputs["device_list_update_id"]), sent_at_ms=inputs["device_list_update_ts"],
        signed_list=device_list, hints=(DeviceHint(
            device=second.public.to_bytes(), addrs=tuple(inputs["short_invite_addrs"]),
            relays=tuple(inputs["device_record_relays"])),))
    out["device_list_update_plaintext"] = encode_content(update).hex()
    out["transcript_plaintext"] = encode_content(Transcript(
        id=h(inputs["transcript_id"]), sent_at_ms=inputs["transcript_ts"],
        to=alice.public.to_bytes(), body=inputs["transcript_body"])).hex()
    out["bundle_request_frame_known_device"] = encode_request(None).hex()
    out["read_sync_plaintext"] = encode_content(Sync(
        id=h(inputs["read_sync_id"]), sent_at_ms=inputs["read_sync_ts"], op="read",
        account=alice.public.to_bytes(), name="", read_id=h(inputs["read_sync_message_id"]),
        read_sent_at_ms=inputs["read_sync_message_ts"])).hex()
    # Deposit capabilities and deposit ids (sections 9 and 21), computed last as well.
    mid = h(inputs["mailbox_message_id"])
    box = mailbox.mailbox_id(bob_dev.public)
    cap = mailbox.contact_cap(bob_dev, alice.public.to_bytes())
    invite_cap = mailbox.invite_cap(invite.token)
    did = mailbox.deposit_id(alice_dev, box, mid)
    sealed_with_id = seal(bob_dev.public, SealedContent(
        sender=alice.public, sender_device=alice_dev.public, message=first, message_id=mid),
        rng=DeterministicRandom(h(inputs["sealed_with_id_random_seed"])))
    assert unseal(bob_dev, sealed_with_id).message_id == mid
    out["mailbox_id_of_bob"] = box.hex()
    out["contacts_mailbox_id_of_bob"] = mailbox.mailbox_id(
        mailbox.mailbox_key(bob_dev).public).hex()
    out["contact_cap_bob_gives_alice"] = cap.hex()
    out["invite_cap_of_short_invite"] = invite_cap.hex()
    out["own_cap_of_bob_device"] = mailbox.own_cap(bob, bob_dev.public).hex()
    out["deposit_id_of_alice"] = did.hex()
    out["sealed_envelope_with_message_id"] = sealed_with_id.hex()
    out["mailbox_caps_frame"] = mailbox.encode_frame(mailbox.Caps(
        rid=1, set=(mailbox.cap_hash(cap), mailbox.cap_hash(invite_cap)))).hex()
    out["mailbox_deposit_frame_with_cap"] = mailbox.encode_frame(mailbox.Deposit(
        rid=2, box=box, id=did, env=sealed_with_id, ttl=inputs["mailbox_deposit_ttl"],
        cap=cap)).hex()
    out.update(_link_vectors(inputs, alice, alice_dev))
    out.update(_attachment_vectors(inputs))
    out.update(_wake_vectors(inputs))
    out.update(_group_vectors(inputs, alice, bob))
    out.update(_relay_vectors(inputs))
    return out


def _wake_vectors(inputs: dict[str, Any]) -> dict[str, Any]:
    """Wake-ups (section 29): the `wake` request registering a push endpoint and the one removing
    it, and the aes128gcm body of a wake-up (RFC 8291) with fixed relay key and salt."""
    h = bytes.fromhex
    key, auth = h(inputs["wake_p256dh"]), h(inputs["wake_auth"])
    return {
        "mailbox_wake_frame": mailbox.encode_frame(mailbox.Wake(
            rid=3, url=inputs["wake_url"], key=key, auth=auth)).hex(),
        "mailbox_wake_remove_frame": mailbox.encode_frame(mailbox.Wake(rid=4)).hex(),
        "wakeup_body": wakeup.encrypt(wakeup.WAKEUP_PLAINTEXT, key, auth,
                                      server_key=h(inputs["wake_server_key"]),
                                      salt=h(inputs["wake_salt"])).hex(),
    }


def _group_vectors(inputs: dict[str, Any], alice: IdentityKeyPair,
                   bob: IdentityKeyPair) -> dict[str, Any]:
    """Groups (section 27): Alice creates a group with Bob, then adds Carol; her device's
    sender chain, its distribution to a member device, and one group message."""
    h = bytes.fromhex
    gid = h(inputs["group_id"])
    carol = IdentityKeyPair(h(inputs["carol_identity_seed"]))
    log = GroupLog.create(alice, group_id=gid, name=inputs["group_name"],
                          members=[bob.public.to_bytes()], sent_at_ms=inputs["group_create_ts"])
    create = log.ops[0]
    add = log.make(alice, "add", who=[carol.public.to_bytes()], sent_at_ms=inputs["group_add_ts"])
    chain = SenderChain.generate(gid, rng=DeterministicRandom(h(inputs["group_sender_random_seed"])))
    key_id, chain_key, iteration = chain.distribution()
    mid, ts = h(inputs["group_message_id"]), inputs["group_message_ts"]
    plaintext = encode_content(Text(id=mid, sent_at_ms=ts, body=inputs["group_message_body"]))
    message = chain.encrypt(plaintext)
    return {
        "group_op_create": create.signed.hex(),
        "group_op_create_hash": create.hash.hex(),
        "group_op_add": add.signed.hex(),
        "group_state_hash": log.state.state_hash.hex(),
        "group_ops_plaintext": encode_content(GroupOps(
            id=mid, sent_at_ms=ts, group_id=gid, ops=(create.signed, add.signed))).hex(),
        "group_sender_key_plaintext": encode_content(SenderKey(
            id=mid, sent_at_ms=ts, group_id=gid, key_id=key_id, chain_key=chain_key,
            iteration=iteration)).hex(),
        "group_sender_key_message": message.hex(),
        "group_message_plaintext": encode_content(GroupMessage(
            id=mid, sent_at_ms=ts, group_id=gid, message=message)).hex(),
    }


def _relay_vectors(inputs: dict[str, Any]) -> dict[str, Any]:
    """Relay records (section 28.1): the signed record, its DHT key, the directory key, and the
    `relay-full` refusal of an `auth`."""
    relay = IdentityKeyPair(bytes.fromhex(inputs["relay_key_seed"]))
    record = RelayRecord(
        relay=relay.public, addrs=tuple(inputs["relay_record_addrs"]),
        capacity=inputs["relay_record_capacity"], load=inputs["relay_record_load"],
        limits=RelayLimits(messages=20_000, bytes=128 * 1024 * 1024, ttl_s=30 * 86400,
                           envelope_bytes=262_144),
        version=inputs["relay_record_version"], operator=inputs["relay_record_operator"],
        seq=inputs["relay_record_seq"], expires=inputs["relay_record_exp"])
    return {
        "relay_peer_id": record.peer_id,
        "relay_record": record.sign(relay).hex(),
        "relay_record_dht_key": record.key,
        "relay_directory_key": DIRECTORY_KEY,
        "mailbox_relay_full_frame": mailbox.encode_frame(mailbox.ErrorReply(
            rid=1, code=mailbox.RELAY_FULL, msg="the relay serves as many mailboxes as it may"
        )).hex(),
    }


def _attachment_vectors(inputs: dict[str, Any]) -> dict[str, Any]:
    """Attachments (section 26): the key, the nonce prefix, each sealed chunk, the blob's
    SHA-256 and the descriptor's CBOR."""
    h = bytes.fromhex
    cipher = ChunkCipher.generate(DeterministicRandom(h(inputs["attachment_random_seed"])))
    blob = io.BytesIO()
    result = encrypt_stream(io.BytesIO(h(inputs["attachment_plaintext"])), blob, cipher,
                            chunk_bytes=inputs["attachment_chunk_bytes"])
    descriptor = Descriptor(
        name=inputs["attachment_name"], media_type=inputs["attachment_media_type"],
        size=result.size, chunk_bytes=inputs["attachment_chunk_bytes"], sha256=result.sha256,
        key=cipher.key, nonce_prefix=cipher.nonce_prefix,
        thumbnail=h(inputs["attachment_thumbnail"]), width=inputs["attachment_width"],
        height=inputs["attachment_height"])
    chunks = [blob.getvalue()[offset:offset + length]
              for offset, length in map(descriptor.chunk_span, range(descriptor.chunks))]
    assert len(chunks) == 3
    file_plaintext = encode_content(File(
        id=h(inputs["file_id"]), sent_at_ms=inputs["file_ts"], attachment=descriptor,
        caption=inputs["file_caption"]))
    return {
        "file_plaintext": file_plaintext.hex(),
        "attachment_key": cipher.key.hex(),
        "attachment_nonce_prefix": cipher.nonce_prefix.hex(),
        "attachment_chunks": [chunk.hex() for chunk in chunks],
        "attachment_ciphertext_sha256": result.sha256.hex(),
        "attachment_descriptor": descriptor.to_bytes().hex(),
    }


def _link_vectors(inputs: dict[str, Any], alice: IdentityKeyPair,
                  alice_dev: DeviceKeyPair) -> dict[str, Any]:
    """Linking (section 25.2): the new device's code, the approver's hello, the stream keys and
    confirmation, and the first sealed frame (the provisioning payload, in one piece)."""
    h = bytes.fromhex
    out: dict[str, Any] = {}
    new_dev = DeviceKeyPair(h(inputs["link_new_device_seed"]))
    new_e = DHKeyPair(DeterministicRandom(h(inputs["link_new_random_seed"]))(32))
    approver_e = DHKeyPair(DeterministicRandom(h(inputs["link_approver_random_seed"]))(32))
    code = LinkCode(device=new_dev.public, addrs=tuple(inputs["link_addrs"]),
                    ephemeral=new_e.public, nonce=h(inputs["link_nonce"]),
                    expires=inputs["link_exp"])
    record = code.record(new_dev)
    out["link_code_record"] = record.hex()
    out["link_code_text"] = code.to_text(new_dev)
    assert LinkCode.from_text(out["link_code_text"], now=inputs["now"]) == code
    out["link_hello_frame"] = encode_hello(code.nonce, approver_e.public).hex()
    shared = approver_e.dh(new_e.public)
    okm = hkdf(shared, salt=approver_e.public.to_bytes() + new_e.public.to_bytes(),
               info=INFO_LINK + hashlib.sha256(record).digest(), length=68)
    out["link_okm"] = okm.hex()
    approver = LinkChannel.for_approver(approver_e, code, record)
    out["link_confirmation"] = approver.confirmation
    device_list = DeviceList.first(alice, alice_dev, seq=inputs["link_device_list_seq"],
                                   expires=inputs["link_device_list_exp"]).sign(alice)
    payload = Provisioning(
        identity=alice, device_list=device_list,
        devices=(DevicePayload(device=alice_dev.public, addrs=("/ip4/192.0.2.1/tcp/4001",),
                               relays=()),),
        contacts=(), display_name="Alice", relays=()).to_bytes()
    out["link_provisioning_payload"] = payload.hex()
    (piece,) = chunk_payload(payload)
    first = approver.seal(piece)
    out["link_first_sealed_frame"] = first.hex()
    new = LinkChannel.for_new_device(new_e, approver_e.public, record)
    assert new.confirmation == approver.confirmation
    assert new.open(first, expect="provision").bytes("data") == payload
    return out


def _unbound(identity: IdentityKeyPair, bundle_body: dict[str, Any]) -> bytes:
    """A signed bundle of the pre-binding format: the same body without "bind"."""
    return sign_record(identity, {k: v for k, v in bundle_body.items() if k != "bind"})


def main() -> int:
    # Inputs added after the file was first written join the committed ones (kept as they are).
    inputs = ({**LINK_INPUTS, **MULTI_DEVICE_INPUTS, **MAILBOX_INPUTS, **ATTACHMENT_INPUTS,
               **READ_INPUTS, **WAKE_INPUTS, **GROUP_INPUTS, **FILE_INPUTS, **RELAY_INPUTS,
               **json.loads(PATH.read_text())["inputs"]} if PATH.exists() else fresh_inputs())
    document = {
        "description": "Pigeon protocol v1 known-answer vectors; see PROTOCOL.md 'Test vectors'",
        "inputs": inputs,
        "outputs": compute(inputs),
    }
    PATH.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
