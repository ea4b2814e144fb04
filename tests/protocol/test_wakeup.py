"""Wake-ups (PROTOCOL.md section 29): RFC 8291 payload encryption against the RFC's example, the
`wake` request of the mailbox protocol, push URLs and the relay's address rule."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cbor2
import pytest

from node.errors import DecryptionFailed
from node.protocol import mailbox as mb
from node.protocol import wakeup
from node.testing import DeterministicRandom

VECTOR = json.loads((Path(__file__).parent.parent / "vectors" / "rfc8291.json").read_text())


def b64(name: str) -> bytes:
    text = VECTOR[name]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_encryption_matches_the_rfc_8291_example_byte_for_byte() -> None:
    body = wakeup.encrypt(b64("plaintext"), b64("ua_public"), b64("auth_secret"),
                          server_key=b64("as_private"), salt=b64("salt"))
    assert body == b64("body")
    # The header names the application server's public key of the example (RFC 8188 key id).
    assert body[21:86] == b64("as_public")


def test_the_rfc_example_decrypts_with_the_user_agents_keys() -> None:
    keys = wakeup.PushKeys(b64("ua_private"), b64("auth_secret"))
    assert keys.p256dh == b64("ua_public")
    assert keys.decrypt(b64("body")) == b"When I grow up, I want to be a watermelon"


def test_a_wakeup_round_trips_and_says_only_fetch() -> None:
    keys = wakeup.PushKeys.generate(DeterministicRandom(b"push keys"))
    body = wakeup.encrypt(wakeup.WAKEUP_PLAINTEXT, keys.p256dh, keys.auth)
    assert keys.decrypt(body) == b"fetch"
    # Fresh server key and salt per wake-up: two wake-ups share no bytes of header or record.
    again = wakeup.encrypt(wakeup.WAKEUP_PLAINTEXT, keys.p256dh, keys.auth)
    assert again[:16] != body[:16] and again[21:86] != body[21:86] and again[86:] != body[86:]


@pytest.mark.parametrize("damage", [
    lambda b: b[:-1] + bytes([b[-1] ^ 1]),          # the tag
    lambda b: bytes([b[0] ^ 1]) + b[1:],            # the salt
    lambda b: b[:20] + b"\x20" + b[21:],            # key id length
    lambda b: b[:16] + b"\x00\x00\x00\x05" + b[20:],  # record size below one tag
    lambda b: b[:50],                               # truncated
    lambda b: b"",
    lambda b: b + b"\x00" * wakeup.MAX_WAKEUP_BYTES,  # too long
])
def test_a_damaged_wakeup_is_refused_opaquely(damage) -> None:  # type: ignore[no-untyped-def]
    keys = wakeup.PushKeys(b64("ua_private"), b64("auth_secret"))
    with pytest.raises(DecryptionFailed):
        keys.decrypt(damage(b64("body")))


def test_another_devices_keys_do_not_decrypt() -> None:
    body = b64("body")
    with pytest.raises(DecryptionFailed):
        wakeup.PushKeys.generate().decrypt(body)
    with pytest.raises(DecryptionFailed):
        wakeup.decrypt(body, b64("ua_private"), bytes(16))


def test_bad_keys_are_refused_before_encrypting() -> None:
    with pytest.raises(ValueError):
        wakeup.encrypt(b"fetch", b64("ua_public")[:64], b64("auth_secret"))
    with pytest.raises(ValueError):
        wakeup.encrypt(b"fetch", b"\x03" + b64("ua_public")[1:], b64("auth_secret"))
    with pytest.raises(ValueError):
        wakeup.encrypt(b"fetch", b64("ua_public"), b"short")
    with pytest.raises(ValueError):
        wakeup.encrypt(b"x" * 4096, b64("ua_public"), b64("auth_secret"))


# --- the wake request -----------------------------------------------------------------------------

KEYS = wakeup.PushKeys(b64("ua_private"), b64("auth_secret"))


def test_wake_requests_round_trip() -> None:
    for request in (mb.Wake(rid=3, url="https://push.example/u/1", key=KEYS.p256dh,
                            auth=KEYS.auth),
                    mb.Wake(rid=4)):
        assert mb.decode_request(mb.encode_frame(request)) == request


@pytest.mark.parametrize("fields", [
    {"url": "https://push.example/x"},                        # key and auth missing
    {"url": "https://push.example/x", "key": KEYS.p256dh},    # auth missing
    {"key": KEYS.p256dh, "auth": KEYS.auth},                  # url missing
    {"url": "", "key": KEYS.p256dh, "auth": KEYS.auth},
    {"url": "https://push.example/x", "key": KEYS.p256dh[:64], "auth": KEYS.auth},
    {"url": "https://push.example/x", "key": KEYS.p256dh, "auth": KEYS.auth + b"x"},
    {"url": "h" * (wakeup.MAX_PUSH_URL_BYTES + 1), "key": KEYS.p256dh, "auth": KEYS.auth},
    {"url": b"https://push.example/x", "key": KEYS.p256dh, "auth": KEYS.auth},
    {"url": "https://push.example/x", "key": KEYS.p256dh, "auth": KEYS.auth, "extra": 1},
])
def test_bad_wake_requests_are_answered_malformed(fields: dict[str, object]) -> None:
    raw = cbor2.dumps({"v": 1, "t": "wake", "rid": 9, **fields}, canonical=True)
    with pytest.raises(mb.MalformedRequest) as caught:
        mb.decode_request(raw)
    assert (caught.value.rid, caught.value.code) == (9, mb.MALFORMED)


def test_wake_refused_is_a_code_clients_know() -> None:
    assert mb.WAKE_REFUSED in mb.ERROR_CODES
    reply = mb.ErrorReply(rid=1, code=mb.WAKE_REFUSED, msg="10.0.0.1 is not allowed")
    assert mb.decode_reply(mb.encode_frame(reply)) == reply


# --- URLs and addresses ---------------------------------------------------------------------------


def test_push_urls_are_parsed() -> None:
    t = wakeup.parse_push_url("https://push.example:8443/up/abc?x=1")
    assert (t.scheme, t.host, t.port) == ("https", "push.example", 8443)
    assert wakeup.parse_push_url("http://127.0.0.1/p").port == 80
    assert wakeup.parse_push_url("https://[2001:db8::1]/p").host == "2001:db8::1"


@pytest.mark.parametrize("url", [
    "ftp://push.example/x", "file:///etc/passwd", "https:///nohost", "https://u:p@push.example/",
    "https://push.example/#frag", "https://push.example:99999/", "https://push.example/ x",
    "https://pushé.example/", "https://push.example/" + "a" * 1100, "",
])
def test_bad_push_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        wakeup.parse_push_url(url)


@pytest.mark.parametrize(("address", "allowed"), [
    ("8.8.8.8", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("::1", False), ("10.1.2.3", False), ("192.168.1.1", False),
    ("172.16.0.1", False), ("169.254.169.254", False), ("fe80::1", False), ("fd00::1", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("not an address", False),
])
def test_only_global_addresses_are_allowed_by_default(address: str, allowed: bool) -> None:
    assert wakeup.address_allowed(address) is allowed


def test_the_operator_allows_ranges_explicitly() -> None:
    allow = wakeup.parse_networks(["127.0.0.1/32", "fd00::/8"])
    assert wakeup.address_allowed("127.0.0.1", allow)
    assert wakeup.address_allowed("::ffff:127.0.0.1", allow)
    assert wakeup.address_allowed("fd12::5", allow)
    assert not wakeup.address_allowed("127.0.0.2", allow)
    assert not wakeup.address_allowed("10.0.0.1", allow)
    with pytest.raises(ValueError):
        wakeup.parse_networks(["127.0.0.1/33"])


def test_the_committed_wakeup_vector_decrypts_with_the_rfc_user_agent() -> None:
    """pigeon-v1.json's wake-up was made for RFC 8291's example user agent: its private key
    opens it, and the `wake` frame there registers that user agent's keys."""
    vectors = json.loads((Path(__file__).parent.parent / "vectors" / "pigeon-v1.json").read_text())
    out = vectors["outputs"]
    assert KEYS.decrypt(bytes.fromhex(out["wakeup_body"])) == wakeup.WAKEUP_PLAINTEXT
    frame = mb.decode_request(bytes.fromhex(out["mailbox_wake_frame"]))
    assert isinstance(frame, mb.Wake) and (frame.key, frame.auth) == (KEYS.p256dh, KEYS.auth)
