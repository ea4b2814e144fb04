"""`pigeon device list` and `pigeon device remove` in real processes (PROTOCOL.md section 25.7).

The second device is linked with `pigeon link` and `pigeon device add`; everything goes through
the command."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.device.node import init_data_dir
from node.errors import DeviceError
from node.protocol.devicelist import DeviceEntry
from node.protocol.directory import MAX_DEVICES
from node.protocol.keys import DeviceKeyPair
from tests.clitools import FAST_RETRIES_TOML, Linking, pigeon, pigeon_json
from tests.conftest import open_node


def test_device_list_and_remove_from_the_command_line(tmp_path: Path) -> None:
    a1, a2 = tmp_path / "a1", tmp_path / "a2"
    pigeon(a1, "init", "--name", "alice")
    first = pigeon_json(a1, "id")["peer_id"]
    # No daemon on a1 serves the history after the link: the new device need not wait for it.
    linking = Linking(a2, FAST_RETRIES_TOML, "--history-wait", "0")
    try:
        second = pigeon_json(a1, "device", "add", linking.code)["peer_id"]
        assert linking.next("Linked", timeout=60)["peer_id"] == second
    finally:
        linking.stop()
    listed = pigeon_json(a1, "device", "list")
    assert [(d["number"], d["peer_id"], d["this_device"]) for d in listed] == [
        (1, first, True), (2, second, False)]
    human = pigeon(a1, "device", "list").stdout
    assert f" 1. {first}  (this device)" in human and f" 2. {second}" in human
    # This device cannot remove itself: exit 1 and one line saying so (the Node API's other
    # refusals are in tests/test_fanout.py).
    result = pigeon(a1, "device", "remove", first[:16], check=False)
    assert result.returncode == 1 and "cannot remove itself" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    removed = pigeon_json(a1, "device", "remove", "2")
    assert removed["removed"] == second
    assert [d["peer_id"] for d in removed["devices"]] == [first]


async def test_a_seventeenth_device_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    a1 = tmp_path / "a1"
    init_data_dir(a1, display_name="alice")
    async with open_node(a1, "alice") as node:
        identity = node._identity.public
        for _ in range(MAX_DEVICES - 1):
            node.add_device(DeviceEntry.make(DeviceKeyPair.generate(), identity))
        with pytest.raises(DeviceError, match=f"already has {MAX_DEVICES} devices"):
            node.add_device(DeviceEntry.make(DeviceKeyPair.generate(), identity))
        assert len(node.devices()) == MAX_DEVICES
    assert len(pigeon_json(a1, "device", "list")) == MAX_DEVICES
