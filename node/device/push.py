"""This device's push endpoint (PROTOCOL.md section 29): the URL its relays POST wake-ups to and
the Web Push keys they encrypt them for, kept in `push.json` in the data directory (mode 0600:
it holds the private key). The keys are made once, the first time a URL is set, and kept when
the URL changes; the relay client (node/device/relay_client.py) registers the endpoint at every
relay on every connection.

`decrypt_wakeup` opens a wake-up for whoever received it on the device's behalf (a distributor,
an embedding application): it says "fetch", and the answer to it is `pigeon fetch`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from node.errors import DataDirError
from node.protocol.wakeup import PushKeys, parse_push_url

__all__ = ["PUSH_FILE", "PushEndpoint", "decrypt_wakeup", "load_push", "remove_push", "save_push"]

PUSH_FILE: Final = "push.json"
_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class PushEndpoint:
    """Where this device's wake-ups go (`url`) and the keys they are encrypted for."""

    url: str
    keys: PushKeys


def _path(data_dir: Path | str) -> Path:
    return Path(data_dir) / PUSH_FILE


def load_push(data_dir: Path | str) -> PushEndpoint | None:
    """The endpoint stored in `data_dir`, or None if none was set. DataDirError if the file is
    damaged or readable by others."""
    path = _path(data_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataDirError(f"cannot read {path}: {exc.strerror}") from exc
    if path.stat().st_mode & 0o077:
        raise DataDirError(f"{path} is readable by other users; run `chmod 600 {path}`")
    try:
        data = json.loads(text)
        if data.get("v") != _VERSION:
            raise ValueError(f"unknown version {data.get('v')!r}")
        url = data["url"]
        parse_push_url(url)
        keys = PushKeys(bytes.fromhex(data["private_key"]), bytes.fromhex(data["auth"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataDirError(f"{path} is damaged ({exc}); set the URL again with "
                           "`pigeon push register URL`") from exc
    return PushEndpoint(url, keys)


def save_push(data_dir: Path | str, url: str) -> PushEndpoint:
    """Set the push URL (ValueError if it is not an http(s) URL), keeping the keys if there are
    some, else making them. Written atomically, mode 0600."""
    parse_push_url(url)
    current = load_push(data_dir)
    endpoint = PushEndpoint(url, current.keys if current else PushKeys.generate())
    path = _path(data_dir)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"v": _VERSION, "url": url, "private_key": endpoint.keys.private_key.hex(),
                       "auth": endpoint.keys.auth.hex()})
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return endpoint


def remove_push(data_dir: Path | str) -> bool:
    """Forget the push endpoint (and its keys); False if there was none."""
    try:
        _path(data_dir).unlink()
    except FileNotFoundError:
        return False
    return True


def decrypt_wakeup(data_dir: Path | str, body: bytes) -> bytes:
    """The payload of a wake-up POSTed for the device of `data_dir` (b"fetch").
    DecryptionFailed if it was not made for this device's keys; DataDirError if no endpoint is
    set there."""
    endpoint = load_push(data_dir)
    if endpoint is None:
        raise DataDirError(f"no push endpoint is set in {data_dir}")
    return endpoint.keys.decrypt(body)
