"""Startup: how long `pigeon --help` takes, against a bare `python -c pass` started the same way.

Measured: `python -m node --help`, and the installed `pigeon` console script when one sits next
to this interpreter, each as a fresh process (subprocess, output discarded). Baseline: `python -c
pass` with the same interpreter and environment. The commands run interleaved, `--runs` times
each after one unmeasured warm-up run (so the file cache is equally warm for all), and each is
reported as median and p90 wall time and as a ratio of medians to the baseline.

Every process gets PYTHONPATH set to this checkout, so the code measured is the code next to this
script (the console script too: the path entry comes before an installed copy).

Goal: `pigeon --help` returns in under 0.3 s on a 2-core machine; it stays fast because
`node.cli` parses arguments before importing a command's module (tests/test_layers.py checks that
it loads neither trio, libp2p, sqlite3 nor zeroconf).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import emit, parse_args

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 0.3  # `pigeon --help` on a 2-core machine
TIMEOUT_S = 30.0  # one process; a hang aborts the run
DEFAULT_RUNS = 20


def _commands() -> dict[str, list[str]]:
    """What is measured, by the prefix of its figures; the baseline first."""
    commands = {
        "python_pass": [sys.executable, "-c", "pass"],
        "help": [sys.executable, "-m", "node", "--help"],
    }
    script = Path(sys.executable).parent / "pigeon"
    if script.is_file() and os.access(script, os.X_OK):
        commands["pigeon_script"] = [str(script), "--help"]
    return commands


def _time_once(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, timeout=TIMEOUT_S, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {result.returncode}: "
                         f"{result.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def measure(runs: int) -> dict[str, list[float]]:
    """Wall times of `runs` runs of each command, interleaved (one of each per round)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    commands = _commands()
    for command in commands.values():
        _time_once(command, env)  # warm-up: same cache state for all
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            times[name].append(_time_once(command, env))
    return times


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def main() -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                            help="runs of each command, at least 2 (default %(default)s)")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    if args.runs < 2:
        raise SystemExit("--runs must be at least 2 (a p90 needs two values)")
    times = measure(args.runs)
    base = statistics.median(times["python_pass"])
    figures: dict[str, object] = {"runs": args.runs, "goal_s": GOAL_S}
    rows: list[tuple[str, object, str]] = []
    labels = {"python_pass": "python -c pass", "help": "python -m node --help",
              "pigeon_script": "pigeon --help (console script)"}
    goals_met = True
    for name, values in times.items():
        median, p90 = statistics.median(values), _p90(values)
        figures[f"{name}_median_s"] = round(median, 4)
        figures[f"{name}_p90_s"] = round(p90, 4)
        rows += [(f"{labels[name]}: median", median * 1000, "ms"),
                 (f"{labels[name]}: p90", p90 * 1000, "ms")]
        if name != "python_pass":
            ratio = median / base
            figures["ratio" if name == "help" else f"{name}_ratio"] = round(ratio, 2)
            rows.append((f"{labels[name]}: ratio to python -c pass", ratio, "x (medians)"))
            goals_met = goals_met and median < GOAL_S
    figures["pigeon_script_found"] = "pigeon_script" in times
    figures["goal_met"] = goals_met
    rows.append((f"under {GOAL_S} s", str(goals_met), ""))
    emit(f"Pigeon startup: `pigeon --help` against `python -c pass` ({args.runs} runs each)",
         rows, figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
