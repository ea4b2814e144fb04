"""Short invites (PROTOCOL.md section 14.1) and the key fetch `/pigeon/bundle/1.0.0` (14.2).

Pure parsing tests, node tests with real libp2p hosts on 127.0.0.1 and real SQLite files, the
QR code as `pigeon invite` prints it decoded by a real QR decoder (zxing-cpp on a Pillow image
of the printed characters), and an end-to-end run of real `pigeon` processes with an invite
wrapped at 76 columns.
"""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing

from node import Node
from node.errors import InvalidRecord, InviteError, TransportError
from node.net import FrameStream, Transport
from node.protocol import codec
from node.protocol.bundle import (
    BUNDLE_PROTOCOL,
    BundleError,
    BundleRecord,
    decode_reply,
    decode_request,
    encode_error,
    encode_record,
    encode_request,
)
from node.protocol.directory import DeviceRecord
from node.protocol.invite import (
    SHORT_INVITE_ADDR_BUDGET,
    SHORT_INVITE_MAX_ADDRS,
    Invite,
    ShortInvite,
    invite_record,
    parse_invite,
    short_addresses,
)
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from tests.clitools import Daemon, pigeon, pigeon_json
from tests.conftest import WAIT, next_event, open_node

NOW = 1_764_600_000
RELAY_ID = DeviceKeyPair.generate().public.peer_id()
CIRCUIT = f"/ip4/203.0.113.5/tcp/4001/p2p/{RELAY_ID}/p2p-circuit"


def _short(addrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/40123",),
           identity: IdentityKeyPair | None = None) -> tuple[str, ShortInvite]:
    identity = identity or IdentityKeyPair.generate()
    invite = ShortInvite(identity=identity.public, device=DeviceKeyPair.generate().public,
                         addrs=addrs, token=os.urandom(16), seq=NOW, expires=NOW + 7 * 86400)
    return invite.to_text(identity), invite


def _worst_case_addrs() -> tuple[str, ...]:
    """Addresses that fill a short invite's budget exactly (the largest invite there is)."""
    from node.protocol.multiaddrs import to_binary

    relay2 = DeviceKeyPair.generate().public.peer_id()
    addrs = [CIRCUIT, f"/ip4/198.51.100.9/udp/4001/quic-v1/p2p/{relay2}/p2p-circuit",
             "/ip4/192.168.100.200/tcp/65535", "/ip4/192.168.100.200/udp/65535/quic-v1",
             "/ip6/2001:db8::1/tcp/4001"]
    used = sum(len(to_binary(a)) for a in addrs)
    assert len(addrs) < SHORT_INVITE_MAX_ADDRS
    name = "a" * (SHORT_INVITE_ADDR_BUDGET - used - len(to_binary("/dns4/a/tcp/1")) + 1)
    addrs.append(f"/dns4/{name}/tcp/1")
    assert sum(len(to_binary(a)) for a in addrs) == SHORT_INVITE_ADDR_BUDGET
    assert short_addresses(addrs) == tuple(addrs)
    return tuple(addrs)


# --- the short form --------------------------------------------------------------------------


def test_short_invite_round_trips_and_is_short() -> None:
    text, invite = _short()
    assert text.startswith("pigeon:") and text[7:] == text[7:].upper()
    assert len(text) <= 450, len(text)  # ~420 with one loopback address
    parsed = parse_invite(text, now=NOW)
    assert parsed == invite
    # with a relay circuit address too, still a few hundred characters
    text2, _ = _short(("/ip4/192.168.1.20/tcp/4001", CIRCUIT))
    assert len(text2) <= 600, len(text2)


def test_whitespace_and_case_inside_either_form_are_ignored() -> None:
    text, invite = _short()
    wrapped = "\n".join(textwrap.wrap(text, 76)) + "\n"
    assert parse_invite(wrapped, now=NOW) == invite
    assert parse_invite("  " + " \r\n\t".join(text[i:i + 10] for i in range(0, len(text), 10)),
                        now=NOW) == invite
    assert parse_invite("pigeon:" + text[7:].lower(), now=NOW) == invite  # base32 has one case
    # the long form, wrapped by a mail client, too
    identity, device = IdentityKeyPair.generate(), DeviceKeyPair.generate()
    from node.protocol.prekeys import PreKeyStore
    bundle = PreKeyStore.create(now=NOW, one_time=0).bundle(
        identity, device, seq=NOW, expires=NOW + 3600, one_time=False)
    long = Invite(identity=identity.public, device=device.public, name="a", addrs=(),
                  relays=(), bundle=bundle, token=os.urandom(16), seq=NOW,
                  expires=NOW + 3600).to_text(identity)
    assert len(long) > 2000
    wrapped_long = "\n".join(textwrap.wrap(long, 76))
    assert isinstance(parse_invite(wrapped_long, now=NOW), Invite)
    assert Invite.from_text(wrapped_long, now=NOW).token == Invite.from_text(long, now=NOW).token


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda t: t[:60] + ("A" if t[60] != "A" else "B") + t[61:], "not genuine or is damaged"),
    (lambda t: t[:len(t) // 2], "damaged"),
    (lambda t: t + "8", "damaged"),  # not a base32 character
    (lambda t: t + "A" * 1000, "not genuine or is damaged"),
])
def test_damaged_short_invites_are_refused_clearly(mutate: object, message: str) -> None:
    text, _ = _short()
    with pytest.raises(InviteError, match=message):
        parse_invite(mutate(text), now=NOW)  # type: ignore[operator]


def test_expired_short_invite_and_long_parser_on_short_form() -> None:
    text, invite = _short()
    with pytest.raises(InviteError, match="expired"):
        parse_invite(text, now=invite.expires)
    with pytest.raises(InviteError, match="short invite"):
        Invite.from_text(text, now=NOW)


def test_short_invite_record_fields_are_strict() -> None:
    """A short-invite record with an extra field (say, a bundle) is refused."""
    from node.protocol.records import sign_record
    identity = IdentityKeyPair.generate()
    record = sign_record(identity, {"kind": "short-invite", "seq": NOW, "exp": NOW + 60,
                                    "dev": bytes(32), "addrs": [], "token": bytes(16),
                                    "name": "x"})
    import base64
    text = "pigeon:" + base64.b32encode(record).decode().rstrip("=")
    with pytest.raises(InviteError, match="malformed"):
        parse_invite(text, now=NOW)


def test_short_addresses_keep_a_direct_and_a_relayed_way_in_within_budget() -> None:
    from node.protocol.multiaddrs import to_binary

    direct = [f"/ip4/10.0.0.{i}/tcp/4001" for i in range(1, 9)]
    chosen = short_addresses([*direct, CIRCUIT])
    assert direct[0] in chosen and CIRCUIT in chosen
    assert sum(len(to_binary(a)) for a in chosen) <= SHORT_INVITE_ADDR_BUDGET
    assert len(chosen) <= SHORT_INVITE_MAX_ADDRS
    assert list(chosen) == [a for a in [*direct, CIRCUIT] if a in chosen]  # order kept
    with pytest.raises(ValueError, match="too many addresses"):
        _short(tuple(direct))
    # an address the binary form does not know is left out, not an error
    assert short_addresses(["/ip4/10.0.0.1/tcp/1/noise", direct[0]]) == (direct[0],)


def test_binary_multiaddrs_match_the_multiaddr_library() -> None:
    """Our pure codec gives the bytes of the multiaddr library (the multiformats spec), and
    refuses what it does not know."""
    import multiaddr

    from node.protocol.multiaddrs import UnsupportedAddress, from_binary, to_binary

    for text in ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.1/udp/4001/quic-v1",
                 "/ip6/2001:db8::1/tcp/4001/ws", "/dns4/relay.example.org/tcp/443/wss",
                 "/ip6/::1/udp/1/quic-v1/webtransport", "/dns/a.b/tcp/1/tls/sni/a.b/ws",
                 CIRCUIT, f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY_ID}"]:
        binary = to_binary(text)
        assert binary == multiaddr.Multiaddr(text).to_bytes(), text
        assert from_binary(binary) == text
    for bad in ["", "ip4/1.2.3.4", "/ip4/1.2.3.400/tcp/1", "/tcp/70000", "/ip4", "/onion3/x",
                "/p2p/notbase58!"]:
        with pytest.raises(UnsupportedAddress):
            to_binary(bad)
    from node.errors import DecodeError
    for junk in [b"", b"\x04\x01\x02", b"\xff\xff\xff\xff\x0f", b"\x35\x00", b"\x06\x00",
                 b"\x35\x03a/b", b"\x80\x00"]:
        with pytest.raises(DecodeError):
            from_binary(junk)


# --- the key fetch frames --------------------------------------------------------------------


def test_bundle_frames_round_trip_and_refuse_junk() -> None:
    token = os.urandom(16)
    assert decode_request(encode_request(token)) == token
    assert decode_reply(encode_record(b"rec")) == BundleRecord(record=b"rec")
    assert decode_reply(encode_error("unknown-token")) == BundleError(code="unknown-token")
    for junk in (b"", b"\xa0", codec.encode({"v": 1, "t": "get", "token": b"x" * 15}),
                 codec.encode({"v": 2, "t": "get", "token": token}),
                 codec.encode({"v": 1, "t": "get", "token": token, "more": 1}),
                 b"\x00" * 100):
        with pytest.raises(Exception) as info:
            decode_request(junk)
        assert type(info.value).__module__ == "node.errors"
    with pytest.raises(Exception) as info:
        decode_reply(codec.encode({"v": 1, "t": "record", "record": b"x" * 9000}))
    assert type(info.value).__module__ == "node.errors"


# --- QR code, as printed ---------------------------------------------------------------------


def _decode_printed_qr(printed: str) -> str:
    """Rebuild the module matrix from half-block characters (printed inverted for a dark
    terminal: a block is a light module), render it with Pillow and decode it with zxing-cpp."""
    import zxingcpp
    from PIL import Image

    lines = [line for line in printed.splitlines() if line]
    width = max(len(line) for line in lines)
    # qrcode prints an empty cell as a no-break space
    top = {" ": True, "\xa0": True, "▀": False, "▄": True, "█": False}  # True: dark module
    bottom = {" ": True, "\xa0": True, "▀": True, "▄": False, "█": False}
    rows: list[list[bool]] = []
    for line in lines:
        line = line.ljust(width)
        rows.append([top[c] for c in line])
        rows.append([bottom[c] for c in line])
    # Around the printed text is the terminal's dark background, not a light quiet zone: the
    # code's own printed border must do (dark pixels, as a dark-background terminal shows it).
    scale, quiet = 8, 4
    image = Image.new("L", ((width + 2 * quiet) * scale, (len(rows) + 2 * quiet) * scale), 0)
    image.paste(255, (quiet * scale, quiet * scale, (width + quiet) * scale,
                      (len(rows) + quiet) * scale))
    for y, row in enumerate(rows):
        for x, dark in enumerate(row):
            if dark:
                image.paste(0, ((x + quiet) * scale, (y + quiet) * scale,
                                (x + quiet + 1) * scale, (y + quiet + 1) * scale))
    results = zxingcpp.read_barcodes(image)
    assert results, "no QR code found in the printed invite"
    return str(results[0].text)


@pytest.mark.parametrize("addrs", [("/ip4/127.0.0.1/tcp/40123",), None])
def test_printed_qr_fits_80_columns_and_decodes_to_the_invite(addrs: object) -> None:
    from node.cli.device import _print_qr

    text, _ = _short(addrs if addrs is not None else _worst_case_addrs())  # type: ignore[arg-type]
    out = io.StringIO()
    assert _print_qr(text, out)
    printed = out.getvalue()
    assert max(len(line) for line in printed.splitlines()) <= 80
    assert _decode_printed_qr(printed) == text


def test_long_invite_gets_no_qr_code_but_a_hint() -> None:
    from node.cli.device import _print_qr

    out = io.StringIO()
    assert not _print_qr("pigeon:o" + "A" * 2800, out)
    assert "too long for a QR code" in out.getvalue()


# --- nodes: fetching the keys ----------------------------------------------------------------


async def test_short_invite_adds_contact_and_messages_flow(tmp_path: Path,
                                                           jump_clock: trio.testing.MockClock
                                                           ) -> None:
    async with open_node(tmp_path / "a", "Alice") as alice, \
            open_node(tmp_path / "b", "Bob") as bob:
        text = alice.invite(short=True)
        assert len(text) < 450
        with pytest.raises(InviteError, match="short invite"):
            bob.add_contact("alice", text)  # the sync call cannot fetch
        with alice.events() as a_events, bob.events() as b_events, trio.fail_after(WAIT):
            info = await bob.add_contact_from_invite("alice", "\n".join(textwrap.wrap(text, 76)))
            assert info.account_id == alice.account_id and info.peer_ids == (alice.peer_id,)
            from node import ContactAdded, MessageReceived
            joined = await next_event(a_events, ContactAdded)
            assert joined.contact == "Bob"
            await bob.send("alice", "hi from a short invite")
            got = await next_event(a_events, MessageReceived)
            assert got.text == "hi from a short invite"
            await alice.send("Bob", "welcome")
            assert (await next_event(b_events, MessageReceived)).text == "welcome"


async def test_fetch_refuses_unknown_token_and_unreachable_device(
        tmp_path: Path, jump_clock: trio.testing.MockClock) -> None:
    async with open_node(tmp_path / "a", "Alice") as alice, \
            open_node(tmp_path / "b", "Bob") as bob:
        genuine = parse_invite(alice.invite(short=True), now=_now(alice))
        assert isinstance(genuine, ShortInvite)
        # signed with Alice's key (the test owns her node) but with a token she never issued:
        # her device must refuse it
        identity = alice._identity
        forged = ShortInvite(identity=genuine.identity, device=genuine.device,
                             addrs=genuine.addrs, token=os.urandom(16), seq=genuine.seq,
                             expires=genuine.expires).to_text(identity)
        with trio.fail_after(WAIT), pytest.raises(InviteError, match="does not know this invite"):
            await bob.add_contact_from_invite("alice", forged)
        # a device that does not listen anywhere
        gone = ShortInvite(identity=genuine.identity, device=DeviceKeyPair.generate().public,
                           addrs=("/ip4/127.0.0.1/tcp/9",), token=genuine.token,
                           seq=genuine.seq, expires=genuine.expires).to_text(identity)
        with trio.fail_after(WAIT * 3), pytest.raises(InviteError, match="could not be reached"):
            await bob.add_contact_from_invite("alice", gone)
        assert bob.contacts() == []


async def test_fetched_record_must_be_the_invites_device(tmp_path: Path,
                                                         jump_clock: trio.testing.MockClock
                                                         ) -> None:
    """A device that answers with a record of another account is refused (the record is
    checked against the invite's identity key and device key)."""
    async with open_node(tmp_path / "a", "Alice") as alice, \
            open_node(tmp_path / "b", "Bob") as bob, \
            open_node(tmp_path / "c", "Carol") as carol:
        # Carol's device serves Carol's record; an invite naming Carol's device but signed by
        # Alice (Alice's token) gets Carol's record back: not Alice's keys.
        carol_record = carol._bundles.record()
        served = DeviceRecord.verify(carol_record, _now(carol), direct=True)
        assert served.identity != alice._identity.public
        assert served.bundle.one_time_prekey is not None  # handed to one requester only
        genuine = parse_invite(alice.invite(short=True), now=_now(alice))
        assert isinstance(genuine, ShortInvite)
        token = parse_invite(carol.invite(short=True), now=_now(carol))
        assert isinstance(token, ShortInvite)
        mixed = ShortInvite(identity=genuine.identity, device=token.device, addrs=token.addrs,
                            token=token.token, seq=genuine.seq,
                            expires=genuine.expires).to_text(alice._identity)
        with trio.fail_after(WAIT), pytest.raises(InviteError, match="someone else"):
            await bob.add_contact_from_invite("alice", mixed)
        assert bob.contacts() == []


async def test_bundle_requests_are_rate_limited_and_junk_resets(
        tmp_path: Path, jump_clock: trio.testing.MockClock) -> None:
    async with open_node(tmp_path / "a", "Alice") as alice, \
            Transport.open(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"]) as probe:
        addrs = alice.addresses()
        codes = []
        with trio.fail_after(WAIT * 3):
            for _ in range(40):
                stream: FrameStream = await probe.open_stream(alice.peer_id, addrs,
                                                              BUNDLE_PROTOCOL, timeout=WAIT)
                await stream.send([encode_request(os.urandom(16))])
                frame = await stream.receive()
                assert frame is not None
                reply = decode_reply(frame)
                assert isinstance(reply, BundleError)
                codes.append(reply.code)
                await stream.aclose()
            # a junk request: the stream is reset, the node keeps serving
            stream = await probe.open_stream(alice.peer_id, addrs, BUNDLE_PROTOCOL, timeout=WAIT)
            await stream.send([b"\xff" * 40])
            with pytest.raises(TransportError, match="reset"):
                await stream.receive()
        assert codes.count("unknown-token") >= 20 and "rate-limited" in codes
        assert alice.invite(short=True)  # still running


def _now(node: Node) -> int:
    return node._clock.now_s()


# --- end to end: real processes, an invite wrapped at 76 columns ------------------------------


def test_cli_short_invite_wrapped_at_76_columns_end_to_end(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "alice", tmp_path / "bob"
    pigeon(a_dir, "init", "--name", "Alice")
    pigeon(b_dir, "init", "--name", "Bob")
    daemons: list[Daemon] = []
    try:
        a = Daemon(a_dir)
        daemons.append(a)
        result = pigeon(a_dir, "invite")
        invite = result.stdout.strip()
        assert invite.startswith("pigeon:") and len(invite) <= 450, invite
        qr_lines = [line for line in result.stderr.splitlines() if line and set(line) <= set(" \xa0▀▄█")]
        assert qr_lines and max(len(line) for line in qr_lines) <= 80
        assert _decode_printed_qr("\n".join(qr_lines)) == invite
        b = Daemon(b_dir)
        daemons.append(b)
        wrapped = "\n".join(textwrap.wrap(invite, 76))
        added = pigeon_json(b_dir, "contact", "add", "alice", wrapped)
        assert added["name"] == "alice"
        assert a.next_event("ContactAdded", timeout=30)["contact"] == "Bob"
        pigeon(b_dir, "send", "alice", "hello alice", "--wait", "20")
        got = a.next_event("MessageReceived", timeout=30)
        assert got["text"] == "hello alice"
        pigeon(a_dir, "send", "Bob", "hello bob", "--wait", "20")
        assert b.next_event("MessageReceived", timeout=30)["text"] == "hello bob"
    finally:
        for daemon in daemons:
            daemon.stop()


def test_invite_record_of_either_form() -> None:
    text, _ = _short()
    assert invite_record(text)[:1] == b"\xa3"


def test_short_invite_vectors_decode_as_specified() -> None:
    """The committed vectors of PROTOCOL.md sections 14.1 and 14.2 parse with the rules there."""
    import json

    from tests.vectors.generate import PATH

    document = json.loads(PATH.read_text())
    inputs, outputs = document["inputs"], document["outputs"]
    now = inputs["now"]
    invite = parse_invite(outputs["short_invite_text"], now=now)
    assert isinstance(invite, ShortInvite)
    assert invite.token.hex() == inputs["short_invite_token"]
    assert invite.identity.to_bytes().hex() == outputs["bob_identity_public"]
    assert invite_record(outputs["short_invite_text"]).hex() == outputs["short_invite_record"]
    assert decode_request(bytes.fromhex(outputs["bundle_request_frame"])) == invite.token
    # The bound reply (PROTOCOL.md section 18: "bundle_reply_frame" is the pre-binding form).
    reply = decode_reply(bytes.fromhex(outputs["bundle_reply_frame_bound"]))
    assert isinstance(reply, BundleRecord)
    record = DeviceRecord.verify(reply.record, now)
    assert (record.identity, record.device) == (invite.identity, invite.device)
    assert record.seq == inputs["device_record_seq"] and record.bundle.one_time_prekey_id is None
    assert (record.bundle.signed_prekey_id, record.bundle.kem_prekey_id) == (1, 2)
    # The reply as devices send it now: one-time keys, accepted only from the device itself.
    direct = decode_reply(bytes.fromhex(outputs["bundle_reply_frame_one_time"]))
    assert isinstance(direct, BundleRecord)
    with pytest.raises(InvalidRecord, match="one-time"):
        DeviceRecord.verify(direct.record, now)
    bundle = DeviceRecord.verify(direct.record, now, direct=True).bundle
    assert (bundle.signed_prekey_id, bundle.one_time_prekey_id, bundle.kem_prekey_id,
            bundle.kem_last_resort) == (1, 5, 6, False)


# --- through a relay: the circuit, and the DHT when the inviter is offline -------------------


async def test_short_invite_with_only_a_relayed_address(tmp_path: Path) -> None:
    """Bob is reachable only through his relay's circuit: the key fetch goes through it, and the
    relays Alice learns come from his device record, not from the invite."""
    from node import ContactAdded, MessageReceived
    from node.relay.config import RelayConfig
    from node.relay.service import open_relay
    from tests.conftest import LOOPBACK

    async with open_relay(RelayConfig(data_dir=tmp_path / "relay", listen=(LOOPBACK,),
                                      log_level="WARNING")) as relay:
        relays = (relay.addresses()[0],)
        async with open_node(tmp_path / "alice", "alice") as alice, \
                open_node(tmp_path / "bob", "Bob", relays=relays) as bob:
            with trio.fail_after(WAIT):
                while not any("/p2p-circuit" in a for a in bob.contact_addresses()):
                    await trio.sleep(0.05)
            full = parse_invite(bob.invite(short=True), now=_now(bob))
            assert isinstance(full, ShortInvite)
            circuit = tuple(a for a in full.addrs if "/p2p-circuit" in a)
            assert circuit and f"/p2p/{relays[0].rsplit('/p2p/', 1)[1]}/p2p-circuit" in circuit[0]
            text = ShortInvite(identity=full.identity, device=full.device, addrs=circuit,
                               token=full.token, seq=full.seq,
                               expires=full.expires).to_text(bob._identity)
            with bob.events() as b_events, trio.fail_after(WAIT * 2):
                info = await alice.add_contact_from_invite("bob", text)
                assert info.peer_ids == (bob.peer_id,)
                device = alice._db.devices(alice._db.contact_by_name("bob").id)[0]  # type: ignore[union-attr]
                assert device.relays == relays  # from the fetched record
                assert (await next_event(b_events, ContactAdded)).contact == "alice"
                await alice.send("bob", "hello through the circuit")
                assert (await next_event(b_events, MessageReceived)).text == \
                    "hello through the circuit"


@pytest.mark.slow(seconds=2)
async def test_short_invite_falls_back_to_the_dht_when_the_inviter_is_offline(
        tmp_path: Path) -> None:
    """Bob published his device record in the DHT (a relay serves it) and went offline: Alice
    gets his keys from the DHT, the intro waits at his relay, and he accepts it when back."""
    from node.relay.config import RelayConfig
    from node.relay.service import open_relay
    from tests.conftest import LOOPBACK

    async with open_relay(RelayConfig(data_dir=tmp_path / "relay", listen=(LOOPBACK,),
                                      log_level="WARNING")) as relay:
        boot = relays = (relay.addresses()[0],)
        async with open_node(tmp_path / "bob", "Bob", bootstrap=boot, relays=relays,
                             relay_reservations=False) as bob:
            with trio.fail_after(WAIT):
                while bob._directory is None or bob._directory.published is None:
                    await trio.sleep(0.05)
            text = bob.invite(short=True)
        async with open_node(tmp_path / "alice", "alice", bootstrap=boot) as alice:
            with trio.fail_after(WAIT * 3):
                info = await alice.add_contact_from_invite("bob", text)
            assert info.peer_ids == (bob.peer_id,)
            device = alice._db.devices(alice._db.contact_by_name("bob").id)[0]  # type: ignore[union-attr]
            assert device.relays == relays  # from the DHT record
            with trio.fail_after(WAIT * 3):  # the intro is left at Bob's relay
                while alice.status().contacts[0].relayed != 1:
                    await trio.sleep(0.05)
        async with open_node(tmp_path / "bob", "Bob", bootstrap=boot, relays=relays,
                             relay_reservations=False) as bob:
            with trio.fail_after(WAIT * 3):
                while not bob.contacts():
                    await trio.sleep(0.05)
            assert [c.account_id for c in bob.contacts()] == [alice.account_id]
