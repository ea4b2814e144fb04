"""The pure protocol core: bytes, keys and the current time in; bytes, state and events out.

Nothing in this package imports trio, libp2p, sqlite3 or socket, and nothing reads the clock:
time is passed in by the caller. That keeps every rule testable in milliseconds, without I/O
(the design of h11's `Connection`).
"""
