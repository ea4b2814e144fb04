"""Pure pieces of the CLI's output: the terminal sanitizer, the root cause of an error, the exit
status of a command, and the control socket's nesting check."""

from __future__ import annotations

import argparse
import json

import pytest

from node.cli.output import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    format_entry,
    guarded,
    root_causes,
    sanitize,
)
from node.errors import ContactError
from node.rpc import MAX_RPC_DEPTH, _too_deep, encode_line


@pytest.mark.parametrize(("text", "shown"), [
    ("plain text, üñíçødé and emoji 👩\u200d👩\u200d👧", "plain text, üñíçødé and emoji 👩\u200d👩\u200d👧"),
    ("two\nlines\r\tand a tab", "two\\nlines\\r\\tand a tab"),
    ("\x1b]0;pwned\x07\x1b[2J", "\\x1b]0;pwned\\x07\\x1b[2J"),
    ("\x9b31m C1 CSI", "\\x9b31m C1 CSI"),
    ("abc\u202edcba\u2066x\u2069", "abc\\u202edcba\\u2066x\\u2069"),
    ("line\u2028separator", "line\\u2028separator"),
    ("lone \udce9 surrogate", "lone \\udce9 surrogate"),
])
def test_sanitize_keeps_text_and_escapes_what_drives_a_terminal(text: str, shown: str) -> None:
    assert sanitize(text) == shown
    assert "\n" not in sanitize(text) and "\x1b" not in sanitize(text)


def test_history_lines_are_sanitized() -> None:
    entry = {"direction": "in", "text": "hi\nBob: fake", "sent_at_ms": 0, "state": "received",
             "error": None}
    line = format_entry("al\x1bice", entry)
    assert line.endswith("al\\x1bice: hi\\nBob: fake") and "\n" not in line


def test_root_cause_is_found_inside_nested_groups() -> None:
    cause = ContactError("no contact named 'x'")
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [cause])])
    assert root_causes(nested) == [cause]


def _args(json_output: bool = False) -> argparse.Namespace:
    return argparse.Namespace(json=json_output)


def test_guarded_prints_one_line_and_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    def fails() -> int:
        raise ExceptionGroup("trio", [ExceptionGroup("nursery", [ContactError("no such x")])])

    assert guarded(_args(), fails) == EXIT_ERROR
    assert capsys.readouterr().err == "pigeon: no such x\n"
    assert guarded(_args(json_output=True), fails) == EXIT_ERROR
    assert json.loads(capsys.readouterr().out) == {
        "error": {"type": "ContactError", "message": "no such x"}}

    def interrupted() -> int:
        raise BaseExceptionGroup("trio", [KeyboardInterrupt()])

    assert guarded(_args(), interrupted) == EXIT_INTERRUPTED

    def missing_file() -> int:
        open("/nonexistent/pigeon/file")  # noqa: SIM115 - the error is the point
        return EXIT_OK

    assert guarded(_args(), missing_file) == EXIT_ERROR
    assert capsys.readouterr().err == \
        "pigeon: /nonexistent/pigeon/file: No such file or directory\n"


def test_nesting_is_checked_before_parsing() -> None:
    assert not _too_deep(b"[" * MAX_RPC_DEPTH + b"]" * MAX_RPC_DEPTH)
    assert _too_deep(b"[" * (MAX_RPC_DEPTH + 1))
    assert not _too_deep(b'{"text": "' + b"[" * 1000 + b'"}')  # brackets in a string
    assert not _too_deep(b'{"text": "\\"' + b"[" * 1000 + b'"}')  # an escaped quote


def test_replies_with_lone_surrogates_still_encode() -> None:
    assert encode_line({"text": "caf\udce9"}) == b'{"text": "caf\\udce9"}\n'


def test_daemon_lines_are_sanitized() -> None:
    from node.cli.device import _describe_event

    line = _describe_event({"type": "MessageReceived", "contact": "bob",
                            "text": "hi\nalice: fake\x1b]0;t\x07"})
    assert line == "bob: hi\\nalice: fake\\x1b]0;t\\x07"
    failed = _describe_event({"type": "MessageFailed", "contact": "bob", "message_id": "ab" * 16,
                              "reason": "no\x1b[2J"})
    assert failed is not None and "\x1b" not in failed
