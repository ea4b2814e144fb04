"""Wake-ups at the relay (PROTOCOL.md section 29), in-process: a real relay on 127.0.0.1 with its
SQLite store, real mailbox clients, and the stand-in push distributor (a real HTTP server on
127.0.0.1) receiving the relay's real POSTs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from node.errors import ConfigError, RelayRefused
from node.protocol import mailbox as mb
from node.protocol.keys import DeviceKeyPair
from node.protocol.wakeup import PushKeys
from tests.pushtools import Distributor, next_post, no_post, private_ca
from tests.relaytools import WAIT, box_of, client, peer, relay_config, running_relay

LOCAL = ("127.0.0.1/32",)


def mid() -> bytes:
    return os.urandom(16)


async def deposit(relay_peer_id: str, addrs: list[str], device: DeviceKeyPair, count: int = 1
                  ) -> None:
    """Deposit `count` messages into `device`'s mailbox, as a stranger would."""
    async with peer() as t, client(t, relay_peer_id, addrs) as depositor:
        for _ in range(count):
            await depositor.deposit(box_of(device.public), mid(), b"sealed", ttl=3600)


async def register_wake(relay_peer_id: str, addrs: list[str], device: DeviceKeyPair, url: str,
                        keys: PushKeys) -> None:
    async with peer() as t, client(t, relay_peer_id, addrs) as owner:
        await owner.authenticate(device)
        await owner.set_wake(url, keys.p256dh, keys.auth)


@pytest.mark.slow(seconds=1)
async def test_a_deposit_for_a_sleeping_mailbox_posts_an_encrypted_wakeup(tmp_path: Path) -> None:
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    with Distributor().running() as dist:
        async with running_relay(tmp_path / "relay", push_allow=LOCAL) as relay:
            await register_wake(relay.peer_id, relay.addresses(), bob, dist.url("/up/bob"), keys)
            await deposit(relay.peer_id, relay.addresses(), bob)
            post = await next_post(dist, WAIT)
            assert post.path == "/up/bob"
            assert keys.decrypt(post.body) == b"fetch"
            headers = {k.lower(): v for k, v in post.headers.items()}
            assert headers["content-encoding"] == "aes128gcm"
            assert headers["ttl"] == "86400" and headers["urgency"] == "high"
            assert headers["topic"] == "pigeon-fetch"
            with trio.fail_after(WAIT):  # counted once the distributor's answer is read
                while relay.relay.waker.m_sent.value() != 1:
                    await trio.sleep(0.01)
            assert relay.relay.status()["wakeups_sent"] == 1
            exposition, _ = relay.relay.registry.exposition()
            assert b"pigeon_relay_wakeups_sent_total 1.0" in exposition
        # The registration survives a restart of the relay.
        async with running_relay(tmp_path / "relay", push_allow=LOCAL) as relay:
            await deposit(relay.peer_id, relay.addresses(), bob)
            assert keys.decrypt((await next_post(dist, WAIT)).body) == b"fetch"


@pytest.mark.slow(seconds=1)
async def test_a_wakeup_due_when_the_relay_stopped_is_sent_after_it_starts_again(
        tmp_path: Path) -> None:
    # The push service is down: the relay's POST fails and waits for its retry when the relay
    # stops. Due wake-ups live in memory only; the messages and the registration are stored,
    # so the relay that starts again wakes the device without a new deposit.
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    with Distributor().running() as dist:
        port, url = dist.port, dist.url("/up/bob")
        async with running_relay(tmp_path / "relay", push_allow=LOCAL) as relay:
            await register_wake(relay.peer_id, relay.addresses(), bob, url, keys)
    async with running_relay(tmp_path / "relay", push_allow=LOCAL) as relay:
        await deposit(relay.peer_id, relay.addresses(), bob)
        with trio.fail_after(WAIT):  # the first POST found nobody listening
            while relay.relay.waker.m_attempts.value() < 1:
                await trio.sleep(0.01)
    with Distributor().running(port) as dist:
        async with running_relay(tmp_path / "relay", push_allow=LOCAL):
            post = await next_post(dist, WAIT)
            assert post.path == "/up/bob"
            assert keys.decrypt(post.body) == b"fetch"


@pytest.mark.slow(seconds=1)
async def test_a_subscribed_mailbox_is_not_woken(tmp_path: Path) -> None:
    awake, asleep = DeviceKeyPair.generate(), DeviceKeyPair.generate()
    keys = PushKeys.generate()
    with Distributor().running() as dist:
        async with running_relay(tmp_path / "relay", push_allow=LOCAL) as relay, \
                peer() as t, client(t, relay.peer_id, relay.addresses()) as inbox:
            addrs = relay.addresses()
            await inbox.authenticate(awake)
            await inbox.set_wake(dist.url("/up/awake"), keys.p256dh, keys.auth)
            await inbox.subscribe()
            await register_wake(relay.peer_id, addrs, asleep, dist.url("/up/asleep"), keys)
            await deposit(relay.peer_id, addrs, awake)
            with trio.fail_after(WAIT):
                pushed = await inbox.pushes().__anext__()
            assert pushed.env == b"sealed"
            # Wake-ups go out in deposit order: the sleeping mailbox's is the first POST.
            await deposit(relay.peer_id, addrs, asleep)
            assert (await next_post(dist, WAIT)).path == "/up/asleep"
            # A wake-up of the subscribed mailbox would have been attempted first.
            assert relay.relay.waker.m_attempts.value() == 1
            assert no_post(dist)


@pytest.mark.slow(seconds=1)
async def test_deposits_are_coalesced_and_rate_limited_per_mailbox(tmp_path: Path) -> None:
    bob, carol, keys = DeviceKeyPair.generate(), DeviceKeyPair.generate(), PushKeys.generate()
    with Distributor().running() as dist:
        # One wake-up per mailbox, and no second one for hours.
        async with running_relay(tmp_path / "relay", push_allow=LOCAL, push_burst=1,
                                 push_rate_per_s=1e-4) as relay:
            addrs = relay.addresses()
            await register_wake(relay.peer_id, addrs, bob, dist.url("/up/bob"), keys)
            await register_wake(relay.peer_id, addrs, carol, dist.url("/up/carol"), keys)
            await deposit(relay.peer_id, addrs, bob, count=20)
            assert (await next_post(dist, WAIT)).path == "/up/bob"
            await deposit(relay.peer_id, addrs, bob, count=3)  # rate-limited: delayed
            await deposit(relay.peer_id, addrs, carol)
            assert (await next_post(dist, WAIT)).path == "/up/carol"
            waker = relay.relay.waker
            with trio.fail_after(WAIT):  # carol's is done once her distributor's answer is read
                while set(waker._jobs) != {box_of(bob.public)}:
                    await trio.sleep(0.01)
            assert not waker._jobs[box_of(bob.public)].in_flight  # waiting for a token
            assert no_post(dist)


async def test_failed_posts_are_retried_with_backoff(tmp_path: Path) -> None:
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    with Distributor(statuses=[503, 429, 201]).running() as dist:
        async with running_relay(tmp_path / "relay", push_allow=LOCAL,
                                 push_retry_initial_s=0.01) as relay:
            await register_wake(relay.peer_id, relay.addresses(), bob, dist.url(), keys)
            await deposit(relay.peer_id, relay.addresses(), bob)
            posts = [await next_post(dist, WAIT) for _ in range(3)]
            assert all(keys.decrypt(p.body) == b"fetch" for p in posts)
            assert posts[1].at - posts[0].at >= 0.005 and posts[2].at - posts[1].at >= 0.01
            waker = relay.relay.waker
            with trio.fail_after(WAIT):
                while waker.m_sent.value() != 1:
                    await trio.sleep(0.01)
            assert waker.m_attempts.value() == 3


async def test_retries_are_bounded(tmp_path: Path) -> None:
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    with Distributor(statuses=[500]).running() as dist:
        async with running_relay(tmp_path / "relay", push_allow=LOCAL, push_attempts=2,
                                 push_retry_initial_s=0.01) as relay:
            await register_wake(relay.peer_id, relay.addresses(), bob, dist.url(), keys)
            await deposit(relay.peer_id, relay.addresses(), bob)
            for _ in range(2):
                await next_post(dist, WAIT)
            waker = relay.relay.waker
            with trio.fail_after(WAIT):
                while waker.m_failed.value("unreachable") != 1:
                    await trio.sleep(0.01)
            assert not waker._jobs and waker.m_sent.value() == 0


#: "localhost" may resolve to ::1 as well as 127.0.0.1 (it does where /etc/hosts says so).
LOCALHOST = ("127.0.0.1/32", "::1/128")


async def test_wakeups_go_over_https_verified_against_the_operators_ca(tmp_path: Path) -> None:
    """A real distributor is an HTTPS server by name: the POST goes over TLS and the certificate
    is verified for the URL's host name, here against a CA the operator named."""
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    ca_file, server_tls = private_ca(tmp_path / "tls")
    with Distributor().running(tls=server_tls) as dist:
        assert dist.url("/up/bob").startswith("https://localhost:")
        async with running_relay(tmp_path / "relay", push_allow=LOCALHOST,
                                 push_ca_file=str(ca_file)) as relay:
            await register_wake(relay.peer_id, relay.addresses(), bob, dist.url("/up/bob"), keys)
            await deposit(relay.peer_id, relay.addresses(), bob)
            post = await next_post(dist, WAIT)
            assert post.path == "/up/bob" and keys.decrypt(post.body) == b"fetch"
            assert post.headers["Host"] == f"localhost:{dist.port}"


async def test_a_distributor_whose_certificate_does_not_verify_gets_nothing(
        tmp_path: Path) -> None:
    """Without the private CA (the public ones only), the relay refuses the distributor's
    certificate: the wake-up is never sent, and is counted as failed after its attempts."""
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    _, server_tls = private_ca(tmp_path / "tls")
    with Distributor().running(tls=server_tls) as dist:
        async with running_relay(tmp_path / "relay", push_allow=LOCALHOST, push_attempts=2,
                                 push_retry_initial_s=0.01) as relay:
            await register_wake(relay.peer_id, relay.addresses(), bob, dist.url("/up/bob"), keys)
            await deposit(relay.peer_id, relay.addresses(), bob)
            waker = relay.relay.waker
            with trio.fail_after(WAIT):
                while waker.m_failed.value("unreachable") != 1:
                    await trio.sleep(0.01)
            assert waker.m_attempts.value() == 2 and waker.m_sent.value() == 0
            assert no_post(dist)


@pytest.mark.parametrize("content, error", [
    (None, "no such file"), ("not a certificate\n", "holds no PEM certificates")])
def test_a_push_ca_file_that_is_missing_or_not_pem_is_a_clear_config_error(
        tmp_path: Path, content: str | None, error: str) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=error):
        relay_config(tmp_path / "relay", push_ca_file=str(path))


async def test_a_gone_endpoint_is_unregistered(tmp_path: Path) -> None:
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    with Distributor(statuses=[410]).running() as dist:
        async with running_relay(tmp_path / "relay", push_allow=LOCAL) as relay:
            await register_wake(relay.peer_id, relay.addresses(), bob, dist.url(), keys)
            assert relay.relay.store.wake_of(box_of(bob.public)) is not None
            await deposit(relay.peer_id, relay.addresses(), bob)
            await next_post(dist, WAIT)
            with trio.fail_after(WAIT):
                while relay.relay.waker.m_failed.value("gone") != 1:
                    await trio.sleep(0.01)
            assert relay.relay.store.wake_of(box_of(bob.public)) is None


@pytest.mark.parametrize("url", [
    "http://10.1.2.3/up/x", "http://127.0.0.1:9/up/x", "http://[::1]:9/up/x",
    "http://169.254.169.254/latest/meta-data", "http://[::ffff:192.168.0.1]/x",
    "ftp://8.8.8.8/x", "http://no-such-host.invalid/x",
])
async def test_push_urls_to_addresses_not_allowed_are_refused(tmp_path: Path, url: str) -> None:
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    async with running_relay(tmp_path / "relay") as relay, peer() as t, \
            client(t, relay.peer_id, relay.addresses()) as owner:
        await owner.authenticate(bob)
        with pytest.raises(RelayRefused) as refused:
            await owner.set_wake(url, keys.p256dh, keys.auth)
        assert refused.value.code == mb.WAKE_REFUSED
        assert relay.relay.store.wake_of(box_of(bob.public)) is None
        # The stream goes on.
        await owner.subscribe()


async def test_wake_needs_an_authenticated_mailbox_and_can_be_removed(tmp_path: Path) -> None:
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    async with running_relay(tmp_path / "relay", push_allow=LOCAL) as relay, peer() as t, \
            client(t, relay.peer_id, relay.addresses()) as owner:
        with pytest.raises(RelayRefused) as refused:
            await owner.set_wake("http://127.0.0.1:9/x", keys.p256dh, keys.auth)
        assert refused.value.code == mb.UNAUTHORIZED
        await owner.authenticate(bob)
        await owner.set_wake("http://127.0.0.1:9/x", keys.p256dh, keys.auth)
        assert relay.relay.store.wake_of(box_of(bob.public)) is not None
        await owner.set_wake(None)
        assert relay.relay.store.wake_of(box_of(bob.public)) is None


async def test_a_relay_without_wakeups_refuses_registrations(tmp_path: Path) -> None:
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    async with running_relay(tmp_path / "relay", push=False, push_allow=LOCAL) as relay, \
            peer() as t, client(t, relay.peer_id, relay.addresses()) as owner:
        await owner.authenticate(bob)
        with pytest.raises(RelayRefused, match="no wake-ups"):
            await owner.set_wake("http://127.0.0.1:9/x", keys.p256dh, keys.auth)


def test_the_example_distributor_prints_the_wakeups_it_gets(tmp_path: Path) -> None:
    """examples/push_distributor.py as a program: it decrypts what it gets with the device's
    keys (from `pigeon push register`'s push.json) and prints one JSON line per POST."""
    import json
    import subprocess
    import sys
    import urllib.request

    from node.device.push import save_push
    from node.protocol.wakeup import WAKEUP_PLAINTEXT, encrypt

    endpoint = save_push(tmp_path, "http://127.0.0.1:9/up/me")
    script = Path(__file__).resolve().parent.parent / "examples" / "push_distributor.py"
    process = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--count", "1", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        listening = json.loads(process.stdout.readline())["listening"]
        body = encrypt(WAKEUP_PLAINTEXT, endpoint.keys.p256dh, endpoint.keys.auth)
        request = urllib.request.Request(listening + "up/me", data=body, method="POST",
                                         headers={"Content-Encoding": "aes128gcm"})
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            assert response.status == 201
        line = json.loads(process.stdout.readline())
        assert line == {"path": "/up/me", "bytes": len(body), "encoding": "aes128gcm",
                        "payload": "fetch"}
        assert process.wait(timeout=WAIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WAIT)


async def test_wake_requests_are_rate_limited_per_stream(tmp_path: Path) -> None:
    """Each registration may cost the relay a name lookup: a stream gets WAKE_REQUEST_BURST of
    them at once, then is refused `rate-limited` (and the stream goes on)."""
    from node.relay.push import WAKE_REQUEST_BURST

    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    async with running_relay(tmp_path / "relay", push_allow=LOCAL) as relay, peer() as t, \
            client(t, relay.peer_id, relay.addresses()) as owner:
        await owner.authenticate(bob)
        for i in range(WAKE_REQUEST_BURST):
            await owner.set_wake(f"http://127.0.0.1:9/{i}", keys.p256dh, keys.auth)
        with pytest.raises(RelayRefused) as refused:
            await owner.set_wake("http://127.0.0.1:9/again", keys.p256dh, keys.auth)
        assert refused.value.code == mb.RATE_LIMITED
        stored = relay.relay.store.wake_of(box_of(bob.public))
        assert stored is not None and stored.url == f"http://127.0.0.1:9/{WAKE_REQUEST_BURST - 1}"
        await owner.subscribe()


@pytest.mark.slow(seconds=1)
async def test_a_rate_limited_wakeup_is_delayed_not_dropped(
        tmp_path: Path, jump_clock: trio.testing.MockClock) -> None:
    bob, keys = DeviceKeyPair.generate(), PushKeys.generate()
    box = box_of(bob.public)
    with Distributor().running() as dist:
        async with running_relay(tmp_path / "relay", push_allow=LOCAL, push_burst=1,
                                 push_rate_per_s=1 / 30) as relay:
            addrs = relay.addresses()
            await register_wake(relay.peer_id, addrs, bob, dist.url(), keys)
            await deposit(relay.peer_id, addrs, bob)
            first = trio.current_time()
            await next_post(dist, WAIT)
            await deposit(relay.peer_id, addrs, bob)
            waker = relay.relay.waker
            with trio.fail_after(WAIT):  # the waker takes the job up and finds no token
                while box not in waker._jobs or waker._jobs[box].due < first + 20:
                    await trio.sleep(0.01)
            assert no_post(dist)
            jump_clock.jump(30)
            post = await next_post(dist, WAIT)
            assert keys.decrypt(post.body) == b"fetch"
            assert trio.current_time() - first >= 30


# --- the device's push endpoint (node/device/push.py) ---------------------------------------------


def test_the_device_keeps_its_push_keys_when_the_url_changes(tmp_path: Path) -> None:
    from node.device.push import PUSH_FILE, decrypt_wakeup, load_push, remove_push, save_push
    from node.protocol.wakeup import WAKEUP_PLAINTEXT, encrypt

    assert load_push(tmp_path) is None
    first = save_push(tmp_path, "https://push.example/up/1")
    assert (tmp_path / PUSH_FILE).stat().st_mode & 0o777 == 0o600
    second = save_push(tmp_path, "https://push.example/up/2")
    assert second.keys == first.keys and load_push(tmp_path) == second
    body = encrypt(WAKEUP_PLAINTEXT, first.keys.p256dh, first.keys.auth)
    assert decrypt_wakeup(tmp_path, body) == b"fetch"
    with pytest.raises(ValueError):
        save_push(tmp_path, "ftp://push.example/")
    assert load_push(tmp_path) == second
    assert remove_push(tmp_path) and load_push(tmp_path) is None and not remove_push(tmp_path)


@pytest.mark.parametrize("text", [
    "", "[]", '{"v": 2}', '{"v": 1, "url": "https://p.example/", "private_key": "zz", "auth": ""}',
    '{"v": 1, "url": "gopher://x/", "private_key": "' + "11" * 32 + '", "auth": "' + "22" * 16
    + '"}',
])
def test_a_damaged_push_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    from node.device.push import PUSH_FILE, load_push
    from node.errors import DataDirError

    path = tmp_path / PUSH_FILE
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(DataDirError, match="damaged"):
        load_push(tmp_path)
    path.chmod(0o644)
    with pytest.raises(DataDirError, match="readable by other users"):
        load_push(tmp_path)


# --- the node's side ------------------------------------------------------------------------------


@pytest.mark.slow(seconds=1)
async def test_a_node_registers_its_push_endpoint_at_both_mailboxes_and_removes_it(
        tmp_path: Path) -> None:
    """`Node.register_push` registers at every relay for both of the device's mailboxes
    (PROTOCOL.md section 21 "Two mailboxes"), a refusal shows per relay, and `remove_push`
    unregisters everywhere; a restarted node registers again without being asked."""
    from node.device.push import load_push
    from node.protocol.mailbox import mailbox_key
    from tests.conftest import open_node

    with Distributor().running() as dist:
        async with running_relay(tmp_path / "relay", push_allow=LOCAL) as relay:
            store, relays = relay.relay.store, (relay.addresses()[0],)
            async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
                device = bob._device
                boxes = [box_of(device.public), box_of(mailbox_key(device).public)]
                refused = await bob.register_push("http://10.9.9.9/up/bob", timeout=WAIT)
                ((_, answer),) = refused.relays
                assert answer is not None and answer.startswith("refused: wake-refused")
                assert all(store.wake_of(b) is None for b in boxes)
                done = await bob.register_push(dist.url("/up/bob"), timeout=WAIT)
                assert done.relays == ((relays[0], "registered"),)
                stored = [store.wake_of(b) for b in boxes]
                assert all(w is not None and w.url == dist.url("/up/bob") for w in stored)
                keys = load_push(tmp_path / "bob")
                assert keys is not None and stored[0] is not None
                assert stored[0].key == keys.keys.p256dh
                for b in boxes:
                    store.set_wake(b, None)  # as if the relay lost them
            async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
                with trio.fail_after(WAIT):
                    while any(store.wake_of(b) is None for b in boxes):
                        await trio.sleep(0.01)
                assert await bob.remove_push(timeout=WAIT)
                assert all(store.wake_of(b) is None for b in boxes)
                assert bob.status().relays[0].wake is None
