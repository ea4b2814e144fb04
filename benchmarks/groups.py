"""Group messages with sender keys against pairwise encryption, per message, by group size.

For 10, 100 and 1,000 member devices, the sender's CPU time and the bytes it writes for one
1 KiB text (PROTOCOL.md section 27.4 and 27.5):

- group: the text is padded and encrypted ONCE with the sender chain (sender-key message), then
  the same `group` content is wrapped in each member device's pairwise session (section 8);
- pairwise: the text is encrypted in each member device's session on its own (section 25.5).

The sender-key part is measured apart: the goal is that it does not grow with the group (only the
fan-out does). Pure core only: no sockets, one core, sessions round-robin over 16 real ones (the
cost of a ratchet step does not depend on which session it is).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import emit, parse_args
from node.protocol.content import GroupMessage, Text, encode_content
from node.protocol.senderkey import SenderChain
from node.protocol.session import SessionRecord
from node.testing import Party, session_pair

SIZES = (10, 100, 1000)
BODY = os.urandom(512).hex()  # a 1 KiB text
SESSIONS = 16
MAX_SECONDS = 2.0  # per measurement; every loop is bounded in count and in time


def sessions() -> list[SessionRecord]:
    """Established sessions (both sides confirmed), as the sender holds them."""
    out = []
    for _ in range(SESSIONS):
        alice, _bob = session_pair()
        out.append(alice.sessions["bob"])
    return out


def group_message(chain: SenderChain, records: list[SessionRecord], devices: int,
                  n: int) -> tuple[float, float, int, int]:
    """(sender-key CPU s, total CPU s, sender-key message bytes, bytes written) for one message."""
    mid = n.to_bytes(16, "big")
    start = time.process_time()
    message = chain.encrypt(encode_content(Text(id=mid, sent_at_ms=n, body=BODY)))
    keyed = time.process_time()
    content = encode_content(GroupMessage(id=mid, sent_at_ms=n, group_id=chain.group_id,
                                          message=message))
    written = 0
    for i in range(devices):
        written += len(records[i % SESSIONS].encrypt(content).message)
    end = time.process_time()
    return keyed - start, end - start, len(message), written


def sender_key_cpu(chain: SenderChain, n: int, count: int = 2000) -> float:
    """CPU seconds per message of padding and encrypting a text with the sender chain."""
    start = time.process_time()
    for i in range(count):
        chain.encrypt(encode_content(Text(id=(n + i).to_bytes(16, "big"), sent_at_ms=n + i,
                                          body=BODY)))
    return (time.process_time() - start) / count


def pairwise_message(records: list[SessionRecord], devices: int, n: int) -> tuple[float, int]:
    """(CPU s, bytes written) for one text encrypted to each device on its own."""
    start = time.process_time()
    content = encode_content(Text(id=n.to_bytes(16, "big"), sent_at_ms=n, body=BODY))
    written = 0
    for i in range(devices):
        written += len(records[i % SESSIONS].encrypt(content).message)
    return time.process_time() - start, written


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    records = sessions()
    chain = SenderChain.generate(b"\x01" * 32)
    Party.create("warm-up")  # import and first-use costs out of the figures
    figures: dict[str, object] = {"text_bytes": len(BODY)}
    rows: list[tuple[str, object, str]] = []
    n = 0
    for devices in SIZES:
        rounds = max(3, 3000 // devices)
        group_cpu = pair_cpu = 0.0
        sk_bytes = group_bytes = pair_bytes = 0
        done, deadline = 0, time.monotonic() + MAX_SECONDS
        while done < rounds and time.monotonic() < deadline:
            n += 1
            _, total, size, written = group_message(chain, records, devices, n)
            cpu, pair_written = pairwise_message(records, devices, n)
            group_cpu, pair_cpu = group_cpu + total, pair_cpu + cpu
            sk_bytes, group_bytes, pair_bytes = size, written, pair_written
            done += 1
        us = 1e6 / done
        # The sender-key step alone, over more messages than the fan-out allows at this size
        # (it is a few tens of microseconds; a handful of samples would be mostly noise).
        sk_cpu = sender_key_cpu(chain, n) * done
        figures[f"devices_{devices}"] = {
            "messages_measured": done,
            "sender_key_encrypt_us_per_message": round(sk_cpu * us, 1),
            "group_total_cpu_us_per_message": round(group_cpu * us, 1),
            "pairwise_total_cpu_us_per_message": round(pair_cpu * us, 1),
            "sender_key_message_bytes": sk_bytes,
            "group_bytes_written_per_message": group_bytes,
            "pairwise_bytes_written_per_message": pair_bytes,
        }
        rows += [
            (f"{devices:>5} devices: sender-key encryption (once)", sk_cpu * us, "us/message"),
            ("             group, sender CPU in all", group_cpu * us, "us/message"),
            ("             pairwise, sender CPU in all", pair_cpu * us, "us/message"),
            ("             sender-key message", sk_bytes, "bytes"),
            ("             group, bytes written", group_bytes, "bytes/message"),
            ("             pairwise, bytes written", pair_bytes, "bytes/message"),
        ]
    small, large = (figures[f"devices_{d}"] for d in (SIZES[0], SIZES[-1]))
    assert isinstance(small, dict) and isinstance(large, dict)
    growth = large["sender_key_encrypt_us_per_message"] / max(
        small["sender_key_encrypt_us_per_message"], 0.1)
    figures["sender_key_cpu_growth_10_to_1000_ratio"] = round(growth, 2)
    figures["goal_sender_key_cpu_independent_of_size"] = growth < 1.5
    rows.append(("sender-key CPU, 1,000 vs 10 devices", growth, "x (goal: about 1)"))
    emit(__doc__.splitlines()[0], rows, figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
