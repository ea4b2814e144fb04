"""Creating a device's data directory (`pigeon init`): keys, database and the first prekeys.

Kept apart from `node.device.node` so that `pigeon init` does not load the network stack.
"""

from __future__ import annotations

from pathlib import Path

from node.clock import Clock, SystemClock
from node.device.datadir import DataDir
from node.device.inbound import clean_name
from node.device.session_store import SessionStore
from node.device.storage import Database

__all__ = ["init_data_dir"]


def init_data_dir(data_dir: Path | str, *, display_name: str = "",
                  clock: Clock | None = None) -> tuple[str, str]:
    """Create keys and database in `data_dir`; returns (account id, peer id). DataDirError if it
    already holds an identity. `clock` dates the first prekeys (the system's by default: this
    runs outside trio too, for `pigeon init`)."""
    dd = DataDir(data_dir)
    dd.lock()
    try:
        identity, device = dd.create_keys()
        db = Database.open(dd.database_file, create=True)
        try:
            SessionStore(db, identity, device, now=(clock or SystemClock()).now_s())
            if display_name:
                db.set_meta("display_name", clean_name(display_name))
        finally:
            db.close()
    finally:
        dd.unlock()
    return identity.public.account_id(), device.public.peer_id()
