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

import json
import sys
from pathlib import Path
from typing import Any

from node.protocol import mailbox
from node.protocol.bundle import encode_record, encode_request
from node.protocol.directory import DeviceRecord
from node.protocol.fingerprint import SafetyNumber, fingerprint
from node.protocol.invite import ShortInvite, parse_invite
from node.protocol.kdf import INFO_PQXDH, INFO_RATCHET_INIT, hkdf
from node.protocol.keys import DeviceKeyPair, DHKeyPair, IdentityKeyPair, KEMKeyPair
from node.protocol.prekeys import PreKeyStore
from node.protocol.records import PreKeyBundle
from node.protocol.sealed import SealedContent, seal, unseal
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
        **MAILBOX_INPUTS,
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


#: Inputs of the deposit capability and deposit id vectors (PROTOCOL.md sections 9 and 21),
#: added after the others: Alice deposits message `mailbox_message_id` into Bob's mailbox with
#: the capability Bob gave her; Bob registers its hash and the invite capability of his short
#: invite.
MAILBOX_INPUTS: dict[str, Any] = {
    "mailbox_message_id": "6d" * 16,
    "mailbox_deposit_ttl": 604_800,
    "sealed_with_id_random_seed": b"sealed-with-id".hex(),
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
    bundle = prekeys.bundle(bob, bob_dev.public, seq=7, expires=now + 86400)
    signed_bundle = bundle.sign(bob)
    out["bob_bundle"] = signed_bundle.hex()
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
    record = DeviceRecord(
        identity=bob.public, device=bob_dev.public, addrs=tuple(inputs["short_invite_addrs"]),
        relays=tuple(inputs["device_record_relays"]),
        bundle=prekeys.bundle(bob, bob_dev.public, seq=dr_seq, expires=dr_exp, one_time=False),
        seq=dr_seq, expires=dr_exp).sign(bob)
    out["bundle_reply_frame"] = encode_record(record).hex()

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
    out["deposit_id_of_alice"] = did.hex()
    out["sealed_envelope_with_message_id"] = sealed_with_id.hex()
    out["mailbox_caps_frame"] = mailbox.encode_frame(mailbox.Caps(
        rid=1, set=(mailbox.cap_hash(cap), mailbox.cap_hash(invite_cap)))).hex()
    out["mailbox_deposit_frame_with_cap"] = mailbox.encode_frame(mailbox.Deposit(
        rid=2, box=box, id=did, env=sealed_with_id, ttl=inputs["mailbox_deposit_ttl"],
        cap=cap)).hex()
    return out


def main() -> int:
    # Inputs added after the file was first written join the committed ones (kept as they are).
    inputs = ({**MAILBOX_INPUTS, **json.loads(PATH.read_text())["inputs"]} if PATH.exists()
              else fresh_inputs())
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
