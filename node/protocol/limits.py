"""Every limit of the protocol core, each with the reason for its value.

Crossing one raises `node.errors.LimitExceeded` (or a subclass) naming the constant.
"""

from __future__ import annotations

# --- Double Ratchet (PROTOCOL.md "Double Ratchet") ---------------------------------------------

#: Most message keys one header may ask us to skip in a chain. libsignal's MAX_FORWARD_JUMPS:
#: enough for a long outage of one direction, small enough that deriving the keys is ~70 ms.
MAX_SKIP = 25_000

#: Most message keys the FIRST message of a new session (a prekey message, section 8) may ask the
#: responder to skip. Anyone holding the public bundle can make a first message and so make us
#: derive keys before the AEAD check fails; a genuine initiator's first
#: message to arrive is its first one unless that many were lost. 256 keys cost about as much as
#: the PQXDH agreement itself (~1.5 ms), so a refused first message costs at most ~3x a genuine one.
MAX_NEW_SESSION_SKIP = 256

#: Most skipped message keys stored per session, oldest evicted first. libsignal's
#: MAX_MESSAGE_KEYS: bounds memory and the state size written to SQLite per message.
MAX_SKIPPED_KEYS = 2_000

#: Older sessions kept per remote device so that crossing first messages (both sides starting a
#: session at once) and late messages of a replaced session still decrypt. libsignal keeps 40.
MAX_ARCHIVED_SESSIONS = 40

#: Largest plaintext one ratchet message may carry. Messages are small; media goes in chunks.
MAX_PLAINTEXT_BYTES = 256 * 1024

# --- PQXDH and prekeys (PROTOCOL.md "Prekeys", "PQXDH") ----------------------------------------

#: Responder remembers this many base keys (EK_A) of first messages that used no one-time
#: prekey, per signed prekey, to refuse their replay (PQXDH section 4.2 / X3DH 4.2). 32 bytes
#: each; rotating the signed prekey drops its set, so this is rarely reached.
MAX_SEEN_BASE_KEYS = 50_000

#: One-time prekeys (classical and PQ) kept unused at once. Each PQ key is 64 bytes of seed
#: privately; the public bundle only ever carries one of each.
MAX_ONE_TIME_PREKEYS = 200

#: Signed prekeys (and as many last-resort PQ prekeys) kept after rotation so first messages in
#: flight to the old ones still open; `PREKEY_GRACE_S` deletes them sooner.
MAX_OLD_SIGNED_PREKEYS = 4

#: How often the signed prekey and the last-resort PQ prekey are replaced (PROTOCOL.md section 6,
#: "Rotation"): a week, as PQXDH suggests; it bounds how long a first message made without
#: one-time prekeys stays decryptable from a stolen device, together with the grace below.
SIGNED_PREKEY_ROTATION_S = 7 * 24 * 3600

#: How long a replaced signed or last-resort PQ prekey is kept before it is deleted. A bundle
#: handed out lives at most 7 days (an invite, by default; DHT and fetched records 48 h) and a
#: sender keeps trying for 7 days (node Config.fail_after_s), so 14 days cover a first message
#: made from the last bundle before the rotation; the third week is margin for clocks and
#: relays. A first message later than that fails to decrypt, and its sender starts again.
PREKEY_GRACE_S = 21 * 24 * 3600

#: Refill the one-time pools (20 of each kind) when fewer than this many are left to hand out.
ONE_TIME_PREKEYS_LOW = 5

# --- signed records (PROTOCOL.md "Signed records") ---------------------------------------------

#: Largest encoded signed record (a prekey bundle is ~1.9 KB: the ML-KEM-1024 key is 1568).
MAX_RECORD_BYTES = 8 * 1024

#: Longest validity a record may claim; anything further out is treated as forged or broken.
MAX_RECORD_LIFETIME_S = 90 * 24 * 3600

# --- sealed sender (PROTOCOL.md "Sealed sender") -----------------------------------------------

#: Largest sealed envelope accepted: one ratchet message plus the prekey header and padding.
MAX_SEALED_BYTES = MAX_PLAINTEXT_BYTES + 4 * 1024
