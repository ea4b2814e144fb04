"""Forward secrecy of first messages, against a real node's data directory (PROTOCOL.md
sections 6 and 20): someone who recorded a first message and later steals the recipient's data
directory must not be able to decrypt it once the prekeys it used are deleted.

The victim is a real `Node` (SQLite files, real crypto, loopback libp2p); the sender is a bare
libp2p host holding its own keys, so the test has the exact bytes of the first message it sent.
"Decrypting from the data directory" is what a thief would do: load the identity key and the
prekey store from a copy of the directory and run the responder's half of PQXDH, without the
replay memory (a policy a thief is free to skip)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from node import ContactAdded, Node, init_data_dir
from node.clock import ManualClock
from node.device.bundles import fetch_device_record
from node.device.datadir import DataDir
from node.device.storage import Database
from node.errors import DecryptionFailed, InvalidRecord
from node.protocol import codec
from node.protocol.directory import DeviceRecord, validate
from node.protocol.invite import Invite, ShortInvite, parse_invite
from node.protocol.keys import IdentityKeyPair
from node.protocol.limits import PREKEY_GRACE_S, SIGNED_PREKEY_ROTATION_S
from node.protocol.prekeys import PreKeyStore
from node.protocol.records import PreKeyBundle
from node.protocol.session import SessionRecord
from node.protocol.wire import Ack, Msg, encode_frame
from node.testing import forge_first_message
from tests.conftest import WAIT, config, next_event, open_node, raw_peer, raw_stream, replies
from tests.test_dht import network

MID = bytes(range(16))


def _steal(data_dir: Path, into: Path) -> tuple[IdentityKeyPair, PreKeyStore, bytes]:
    """Copy the data directory (while the node runs: what a thief with file access gets) and
    load its identity key and prekey store; also return every byte of its files."""
    shutil.copytree(data_dir, into)
    raw = b"".join(p.read_bytes() for p in sorted(into.iterdir()) if p.is_file())
    identity, _ = DataDir(into).load_keys()
    db = Database.open(DataDir(into).database_file)
    try:
        stored = db.load_prekeys()
    finally:
        db.close()
    assert stored is not None
    return identity, _without_replay_memory(stored), raw


def _without_replay_memory(stored: bytes) -> PreKeyStore:
    fields = dict(codec.decode(stored, limit=len(stored), what="prekey store"))
    fields["seen"] = []
    return PreKeyStore.from_bytes(codec.encode(fields))


def _opens(identity: IdentityKeyPair, prekeys: PreKeyStore, sender: IdentityKeyPair,
           first: bytes) -> bool:
    try:
        SessionRecord().decrypt(first, identity=identity, remote_identity=sender.public,
                                prekeys=prekeys)
    except DecryptionFailed:
        return False
    return True


async def _send_first(node: Node, bundle: PreKeyBundle, invite_token: bytes,
                      sender: IdentityKeyPair, seed: bytes) -> bytes:
    """Send a genuine first message (an intro with the invite's token) from a bare host; the
    node must accept it. Returns its bytes, as someone on the path would record them."""
    first = forge_first_message(bundle, message_id=MID, token=invite_token, identity=sender)
    async with raw_peer(seed) as transport:
        stream = await raw_stream(transport, node)
        await stream.send([encode_frame(Msg(MID, first))])
        assert await replies(stream, 1) == [Ack((MID,))]
        await stream.aclose()
    return first


async def _wait_until(condition: object) -> None:
    assert callable(condition)
    with trio.fail_after(WAIT):
        while not condition():
            await trio.sleep(0.01)


async def test_a_first_message_with_one_time_prekeys_is_unreadable_from_the_data_dir_at_once(
        tmp_path: Path, jump_clock: trio.testing.MockClock) -> None:
    async with open_node(tmp_path / "alice", "Alice") as alice:
        invite = parse_invite(alice.invite(short=True), now=alice._clock.now_s())
        assert isinstance(invite, ShortInvite)
        async with raw_peer(b"k" * 32) as fetcher:
            record = await fetch_device_record(fetcher, invite, now=alice._clock.now_s,
                                               timeout=WAIT)
            again = await fetch_device_record(fetcher, invite, now=alice._clock.now_s,
                                              timeout=WAIT)
        # Fetched fresh from the device: one-time keys, each handed out once.
        bundle = record.bundle
        assert bundle.one_time_prekey_id is not None and not bundle.kem_last_resort
        assert again.bundle.one_time_prekey_id not in (None, bundle.one_time_prekey_id)
        assert again.bundle.kem_prekey_id != bundle.kem_prekey_id
        # Such a record is refused by the DHT's rules: many would read it there.
        signed = DeviceRecord(identity=record.identity, device=record.device, addrs=(),
                              relays=(), bundle=bundle, seq=1, expires=record.expires,
                              direct=True).sign(alice._identity)
        with pytest.raises(InvalidRecord, match="one-time"):
            validate(record.key, signed, alice._clock.now_s())

        sender = IdentityKeyPair.generate()
        # A thief who copied the directory before the message arrived could read it...
        before_id, before_prekeys, files = _steal(alice.data_dir.path, tmp_path / "before")
        first = forge_first_message(bundle, message_id=MID, token=invite.token, identity=sender)
        assert _opens(before_id, _without_replay_memory(before_prekeys.to_bytes()), sender,
                      first)
        one_time = before_prekeys.one_time_prekey(bundle.one_time_prekey_id)
        assert one_time is not None
        one_time_private = one_time.to_bytes()
        assert one_time_private in files  # stored verbatim (PROTOCOL.md section 17)

        async with raw_peer(b"s" * 32) as transport:
            stream = await raw_stream(transport, alice)
            await stream.send([encode_frame(Msg(MID, first))])
            assert await replies(stream, 1) == [Ack((MID,))]
            await stream.aclose()
        assert [c.name for c in alice.contacts()] == ["stranger"]

        # ...one who copies it after cannot: the one-time keys are gone from every file.
        after_id, after_prekeys, files = _steal(alice.data_dir.path, tmp_path / "after")
        assert after_prekeys.one_time_prekey(bundle.one_time_prekey_id) is None
        assert after_prekeys.kem_prekey(bundle.kem_prekey_id) is None
        assert not _opens(after_id, after_prekeys, sender, first)
        assert one_time_private not in files


async def test_a_first_message_without_one_time_prekeys_is_unreadable_after_rotation_and_grace(
        tmp_path: Path, jump_clock: trio.testing.MockClock) -> None:
    async with open_node(tmp_path / "alice", "Alice") as alice:
        invite = Invite.from_text(alice.invite(), now=alice._clock.now_s())
        bundle = invite.bundle  # a long invite's bundle: signed and last-resort keys only
        assert bundle.one_time_prekey is None and bundle.kem_last_resort
        sender = IdentityKeyPair.generate()
        first = await _send_first(alice, bundle, invite.token, sender, b"s" * 32)

        # A thief who copies the directory now, before the rotation, can read it.
        now_id, now_prekeys, files = _steal(alice.data_dir.path, tmp_path / "now")
        assert _opens(now_id, now_prekeys, sender, first)
        spk = now_prekeys.signed_prekey(bundle.signed_prekey_id)
        assert spk is not None and spk.to_bytes() in files
        spk_private = spk.to_bytes()

        # A week on, the node rotates both keys and republishes; the old ones stay for the
        # grace, so first messages still in flight open.
        jump_clock.jump(SIGNED_PREKEY_ROTATION_S)
        await _wait_until(
            lambda: alice._sessions.prekeys.current_signed_prekey_id != bundle.signed_prekey_id)
        rotated_id, rotated_prekeys, _ = _steal(alice.data_dir.path, tmp_path / "rotated")
        assert rotated_prekeys.current_signed_prekey_id != bundle.signed_prekey_id
        assert _opens(rotated_id, rotated_prekeys, sender, first)

        # After the grace they are deleted, from the database file and its WAL.
        jump_clock.jump(PREKEY_GRACE_S)
        await _wait_until(
            lambda: alice._sessions.prekeys.signed_prekey(bundle.signed_prekey_id) is None)
        late_id, late_prekeys, files = _steal(alice.data_dir.path, tmp_path / "late")
        assert late_prekeys.signed_prekey(bundle.signed_prekey_id) is None
        assert late_prekeys.kem_prekey(bundle.kem_prekey_id) is None
        assert not _opens(late_id, late_prekeys, sender, first)
        assert spk_private not in files
        # The node still works with its new keys: a new first message opens.
        fresh = Invite.from_text(alice.invite(), now=alice._clock.now_s())
        assert fresh.bundle.signed_prekey_id != bundle.signed_prekey_id
        later = IdentityKeyPair.generate()
        await _send_first(alice, fresh.bundle, fresh.token, later, b"t" * 32)
        assert len(alice.contacts()) == 2



async def test_a_long_invites_first_message_uses_one_time_prekeys_when_the_inviter_answers(
        tmp_path: Path, jump_clock: trio.testing.MockClock) -> None:
    async with open_node(tmp_path / "alice", "Alice") as alice, \
            open_node(tmp_path / "bob", "Bob") as bob:
        held = alice._sessions.prekeys.private_key_count()
        with alice.events() as events, trio.fail_after(WAIT):
            await bob.add_contact_from_invite("alice", alice.invite())
            await next_event(events, ContactAdded)
        # The intro used a classical and a PQ one-time prekey, both deleted on receipt (the
        # invite's own bundle carries neither).
        assert alice._sessions.prekeys.private_key_count() == held - 2
        with trio.fail_after(WAIT):
            message_id = await bob.send("alice", "hello")
            assert await bob.wait_delivered(message_id, timeout=WAIT) == "delivered"


async def test_a_long_invite_still_works_when_the_inviter_is_offline(
        tmp_path: Path, jump_clock: trio.testing.MockClock) -> None:
    async with open_node(tmp_path / "alice", "Alice") as alice:
        text = alice.invite()
    async with open_node(tmp_path / "bob", "Bob") as bob:
        with trio.fail_after(WAIT):
            info = await bob.add_contact_from_invite("alice", text)
        assert info.name == "alice"
    # The intro waits in Bob's outbox; once Alice is back it arrives, made from the invite's
    # keys (no one-time prekey was handed out, so none is used).
    async with open_node(tmp_path / "alice", "Alice") as alice, \
            open_node(tmp_path / "bob", "Bob") as bob:
        held = alice._sessions.prekeys.private_key_count()
        with alice.events() as events, trio.fail_after(WAIT):
            await next_event(events, ContactAdded)
        assert alice._sessions.prekeys.private_key_count() == held


async def test_a_rotation_republishes_the_dht_record_with_the_new_keys(
        tmp_path: Path, jump_clock: trio.testing.MockClock) -> None:
    # The prekeys were made a week minus an hour ago: the rotation comes due in an hour, long
    # before the next scheduled republish (12 hours), so only the rotation can explain a new
    # record in the DHT.
    made = int(time.time()) - SIGNED_PREKEY_ROTATION_S + 3600
    init_data_dir(tmp_path / "alice", display_name="Alice",
                  clock=ManualClock(start_ms=made * 1000))
    async with network(2) as servers:
        boot = (servers[0].transport.listen_addrs()[0],)
        async with Node.open(tmp_path / "alice", config("Alice", bootstrap=boot)) as alice:
            directory = alice._directory
            assert directory is not None
            await _wait_until(lambda: directory.published is not None)
            assert directory.published is not None
            first = directory.published.bundle
            jump_clock.jump(3600)
            await _wait_until(lambda: directory.published is not None
                              and directory.published.bundle.signed_prekey_id
                              != first.signed_prekey_id)
            with trio.fail_after(WAIT):
                found = await directory.resolve_device(alice._identity.public, alice._device.public)
            assert found is not None
            assert found.bundle.signed_prekey_id != first.signed_prekey_id
            assert found.bundle.kem_prekey_id != first.kem_prekey_id
            assert found.bundle.one_time_prekey is None and found.bundle.kem_last_resort
