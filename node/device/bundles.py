"""Serving and fetching signed device records for short invites (PROTOCOL.md section 14.2),
and for devices that joined a known account (section 25.4).

A short invite carries no prekey bundle. Whoever uses it asks the inviting device for its signed
device record over `/pigeon/bundle/1.0.0` (directly, or through the relay circuit address the
invite lists), with the invite's token; failing that, it looks the record up in the DHT. Either
way the record must be signed by the invite's identity key and name the invite's device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from node.clock import Clock
from node.device.session_store import SessionStore
from node.device.storage import Database
from node.errors import DecodeError, InviteError, NodeError, TransportError
from node.net import FrameStream, Transport
from node.protocol.bundle import (
    BUNDLE_PROTOCOL,
    MAX_BUNDLE_REPLY_BYTES,
    RATE_LIMITED,
    UNKNOWN_DEVICE,
    UNKNOWN_TOKEN,
    BundleError,
    decode_reply,
    decode_request,
    encode_error,
    encode_record,
    encode_request,
)
from node.protocol.directory import RECORD_LIFETIME_S, DeviceRecord
from node.protocol.invite import Invite, ShortInvite
from node.protocol.keys import DeviceKey, DeviceKeyPair, IdentityKey, IdentityKeyPair
from node.protocol.ratelimit import TokenBucket

log = logging.getLogger("pigeon.bundles")

__all__ = ["BUNDLE_PROTOCOL", "BundleServer", "checked_dht_record", "fetch_device_record",
           "fetch_known_device_record"]

#: Requests a device answers, all peers together: a record costs a signature and some SQLite
#: reads, and an invite is used by a few people, so this is generous for them and bounds what
#: anyone who learned a token can make the device do.
REQUESTS_PER_SECOND = 5.0
REQUEST_BURST = 20.0
#: How long a requester may take to send its one request frame.
REQUEST_TIMEOUT_S = 10.0


class BundleServer:
    """Answers `/pigeon/bundle/1.0.0` requests that carry the token of one of our unexpired
    invites, or no token from a device we know (a contact's or our own, section 25.4), with
    this device's signed device record (its current addresses, relays and a prekey bundle with a
    classical and a PQ one-time prekey while the pools have any: each is handed to this one
    requester only, PROTOCOL.md section 14.2)."""

    def __init__(self, *, db: Database, identity: IdentityKeyPair, device: DeviceKeyPair,
                 sessions: SessionStore, addresses: Callable[[], Sequence[str]],
                 relays: Callable[[], Sequence[str]], clock: Clock) -> None:
        self._db = db
        self._identity = identity
        self._device = device
        self._sessions = sessions
        self._addresses = addresses
        self._relays = relays  # ours as they are now (PROTOCOL.md section 28.3)
        self._clock = clock
        self._bucket = TokenBucket(REQUESTS_PER_SECOND, REQUEST_BURST, now=clock.monotonic())

    async def handle_stream(self, stream: FrameStream) -> None:
        """One request, one reply. A malformed request resets the stream (DecodeError)."""
        frame = None
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            frame = await stream.receive()
        if frame is None:
            raise DecodeError("bundle request: none arrived")
        token = decode_request(frame)
        if not self._bucket.take(1, now=self._clock.monotonic()):
            await stream.send([encode_error(RATE_LIMITED)])
            return
        if token is None:
            if self._db.device_by_peer_id(stream.remote_peer_id) is None:
                log.info("bundle request without a token from unknown %s",
                         stream.remote_peer_id)
                await stream.send([encode_error(UNKNOWN_DEVICE)])
                return
        elif not self._db.invite_is_valid(token, now_ms=self._clock.now_ms()):
            log.info("bundle request from %s with an unknown token", stream.remote_peer_id)
            await stream.send([encode_error(UNKNOWN_TOKEN)])
            return
        await stream.send([encode_record(self.record())])

    def record(self) -> bytes:
        """A freshly signed device record of this device (PROTOCOL.md section 23.3): `seq` in
        milliseconds from the sequence of the DHT records and intros, so the newest wins
        wherever several are seen (section 21 "Where a device is"). Its bundle takes one-time
        prekeys nobody was given yet; the store is saved (they are offered now) and its pools
        refilled when low."""
        now_ms = self._clock.now_ms()
        expires = now_ms // 1000 + RECORD_LIFETIME_S
        return DeviceRecord(identity=self._identity.public, device=self._device.public,
                            addrs=tuple(self._addresses())[:16], relays=tuple(self._relays())[:16],
                            bundle=self._sessions.hand_out_bundle(now=now_ms // 1000, seq=now_ms,
                                                                  expires=expires),
                            seq=self._db.next_location_stamp(now_ms), expires=expires,
                            direct=True).sign(self._identity)


def _check(record: DeviceRecord, invite: Invite | ShortInvite) -> DeviceRecord:
    if record.identity != invite.identity or record.device != invite.device:
        raise InviteError("the inviter's device answered with keys of someone else")
    return record


async def fetch_device_record(transport: Transport, invite: Invite | ShortInvite, *,
                              now: Callable[[], int], timeout: float) -> DeviceRecord:
    """Ask the invite's device for its signed device record, at the invite's addresses (relayed
    ones after direct ones: `Transport.open_stream`). InviteError when it cannot be had: the
    reason says whether the device was unreachable or refused. Either form of invite: a long
    one carries keys too, but the device's answer has one-time prekeys (PROTOCOL.md 14.2)."""
    peer_id = invite.device.peer_id()
    try:
        with trio.fail_after(timeout):
            stream = await transport.open_stream(peer_id, invite.addrs, BUNDLE_PROTOCOL,
                                                 timeout=timeout,
                                                 max_frame_bytes=MAX_BUNDLE_REPLY_BYTES)
    except (TransportError, trio.TooSlowError) as exc:
        raise InviteError("the inviter's device could not be reached to fetch its keys (a short"
                          " invite needs it online); try again when it is") from exc
    try:
        with trio.fail_after(timeout):
            try:
                await stream.send([encode_request(invite.token)])
                frame = await stream.receive()
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
    except (TransportError, trio.TooSlowError) as exc:
        raise InviteError(f"the inviter's device broke off while giving its keys ({exc});"
                          " try again") from exc
    except DecodeError as exc:
        raise InviteError(f"the inviter's device answered badly ({exc})") from exc
    if frame is None:
        raise InviteError("the inviter's device did not answer with its keys")
    try:
        reply = decode_reply(frame)
        if isinstance(reply, BundleError):
            if reply.code == UNKNOWN_TOKEN:
                raise InviteError("the inviter's device does not know this invite (withdrawn or"
                                  " expired); ask for a new one")
            raise InviteError(f"the inviter's device refused to give its keys ({reply.code});"
                              " try again later")
        return _check(DeviceRecord.verify(reply.record, now(), direct=True), invite)
    except InviteError:
        raise
    except (NodeError, ValueError) as exc:
        raise InviteError(f"the inviter's device answered with invalid keys ({exc})") from exc


async def fetch_known_device_record(transport: Transport, device: DeviceKey,
                                   account: IdentityKey, addrs: Sequence[str], *,
                                   now: Callable[[], int], timeout: float) -> DeviceRecord:
    """Ask `device` (of `account`, which we know) for its signed device record at `addrs`, as a
    device it knows (a request without a token, PROTOCOL.md section 25.4). NodeError (with the
    reason) when it cannot be had; the record is checked to be `account`'s for `device`."""
    try:
        with trio.fail_after(timeout):
            stream = await transport.open_stream(device.peer_id(), addrs, BUNDLE_PROTOCOL,
                                                 timeout=timeout,
                                                 max_frame_bytes=MAX_BUNDLE_REPLY_BYTES)
            try:
                await stream.send([encode_request(None)])
                frame = await stream.receive()
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
    except trio.TooSlowError as exc:
        raise TransportError(f"no keys from {device.peer_id()} in {timeout:g} s") from exc
    if frame is None:
        raise TransportError(f"{device.peer_id()} did not answer with its keys")
    reply = decode_reply(frame)
    if isinstance(reply, BundleError):
        raise TransportError(f"{device.peer_id()} refused to give its keys ({reply.code})")
    try:
        # Handed to us alone, so it may carry one-time prekeys (PROTOCOL.md section 14.2).
        record = DeviceRecord.verify(reply.record, now(), direct=True)
    except ValueError as exc:
        raise DecodeError(f"keys of {device.peer_id()}: {exc}") from exc
    if record.identity != account or record.device != device:
        raise DecodeError(f"{device.peer_id()} answered with keys of someone else")
    return record


def checked_dht_record(record: DeviceRecord | None, invite: ShortInvite) -> DeviceRecord | None:
    """A device record found in the DHT, if it is the invite's device of the invite's account."""
    if record is None:
        return None
    try:
        return _check(record, invite)
    except InviteError:
        log.info("DHT record for %s is not the invite's", invite.device.peer_id())
        return None
