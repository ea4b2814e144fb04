"""Shared output for benchmark scripts: a readable table, or one JSON object with `--json`."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Any = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def emit(title: str, rows: list[tuple[str, Any, str]], figures: dict[str, Any], as_json: bool) -> None:
    """rows: (label, value, unit) for the table; figures: the JSON object (units in key names)."""
    if as_json:
        print(json.dumps(figures, sort_keys=True))
        return
    print(title)
    print(f"python {platform.python_version()} on {platform.machine()}")
    width = max(len(label) for label, _, _ in rows)
    for label, value, unit in rows:
        if isinstance(value, float):
            shown = f"{value:,.1f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            shown = f"{value:,}"
        else:
            shown = str(value)
        print(f"  {label:<{width}}  {shown:>14} {unit}")
    sys.stdout.flush()
