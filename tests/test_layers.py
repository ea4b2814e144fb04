"""The layering of README.md ("Layers") is enforced here, statically and at run time.

Static: every `import` and `from ... import` statement under node/ is read with `ast`, including
those inside functions (they load when the function runs) and those under `if TYPE_CHECKING:`.

How TYPE_CHECKING-only imports count (decided here, once):

- In the DIRECT rules (what a module may name) they count: a pure module whose annotations name
  a trio or libp2p type still depends on that layer, and the next refactoring turns the
  annotation into a run-time import.
- In the TRANSITIVE rules (what loads at run time) they do not: they never execute. That is what
  lets `node/__init__.py` name `node.device` for type checkers while `import node` loads nothing
  of it (its public names are imported on first use, PEP 562).

Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, so a module depends at run
time on its parent packages too; the closure follows those edges.

Dynamic: fresh interpreters run `python -X importtime -c "import <module>"` and the modules they
report must not include trio, libp2p, sqlite3, zeroconf or multiaddr (importing the
protocol or running `pigeon --help` must not pay for the I/O stack).

The checker is tested on small fake trees in tmp_path, so a passing run means something.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clitools import Daemon

ROOT = Path(__file__).resolve().parent.parent

#: Third parties that are the network stack: only `node.net` may import them.
NETWORK_LIBRARIES = frozenset({"aioquic", "libp2p", "multiaddr", "zeroconf"})

#: What `node.protocol` must never import (it takes bytes, keys and the time in; README.md,
#: "Layers"), each with the reason shown when it does.
PROTOCOL_FORBIDDEN: Mapping[str, str] = {
    "trio": "async I/O", "asyncio": "async I/O", "anyio": "async I/O",
    "libp2p": "network stack", "multiaddr": "network stack", "zeroconf": "network stack",
    "sqlite3": "storage", "socket": "network I/O", "selectors": "I/O", "ssl": "network I/O",
    "subprocess": "processes", "threading": "threads",
    "time": "a clock: pure code is handed the time",
    "datetime": "a clock: pure code is handed the time",
}


#: Modules whose loading means the I/O stack was paid for.
HEAVY = ("trio", "libp2p", "sqlite3", "_sqlite3", "zeroconf", "multiaddr")


# --- the checker ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Import:
    """One imported module as written in one module's source."""

    importer: str  # dotted name of the importing module
    target: str  # dotted name of the imported module
    path: Path  # relative to the directory holding the top package
    line: int
    source: str  # the statement's first line, as written
    type_checking: bool  # under `if TYPE_CHECKING:` (never runs)

    def __str__(self) -> str:
        tag = " (TYPE_CHECKING only)" if self.type_checking else ""
        return f"{self.importer} imports {self.target}{tag}: {self.path}:{self.line}: {self.source}"


def module_name(path: Path, root: Path) -> str:
    """Dotted name of the module at `path`, `root` being the directory holding the top package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, guarded: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement below `node`, with whether it sits under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, guarded
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                yield from _walk_statement(statement, True)
            for statement in child.orelse:
                yield from _walk_statement(statement, guarded)
        else:
            yield from _walk(child, guarded)


def _walk_statement(statement: ast.stmt, guarded: bool
                    ) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    if isinstance(statement, ast.Import | ast.ImportFrom):
        yield statement, guarded
    else:
        yield from _walk(statement, guarded)


def scan(root: Path, package: str) -> tuple[set[str], list[Import]]:
    """All modules of `package` (a directory under `root`) and every import they make.

    `from X import Y` imports module X.Y when that is a module of the tree, else module X.
    Relative imports are resolved against the importing module's package."""
    files = sorted((root / package).rglob("*.py"))
    modules = {module_name(path, root) for path in files}
    imports: list[Import] = []
    for path in files:
        importer = module_name(path, root)
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        is_package = path.name == "__init__.py"
        for statement, guarded in _walk(ast.parse(text, str(path)), False):
            source = lines[statement.lineno - 1].strip()
            targets: list[str] = []
            if isinstance(statement, ast.Import):
                targets = [alias.name for alias in statement.names]
            else:
                base = statement.module or ""
                if statement.level:
                    anchor = importer.split(".")
                    drop = statement.level - 1 if is_package else statement.level
                    anchor = anchor[:len(anchor) - drop] if drop else anchor
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in statement.names:
                    candidate = f"{base}.{alias.name}"
                    targets.append(candidate if candidate in modules else base)
            for target in dict.fromkeys(targets):
                imports.append(Import(importer, target, path.relative_to(root), statement.lineno,
                                      source, guarded))
    return modules, imports


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def runtime_paths(modules: set[str], imports: list[Import], start: str) -> dict[str, list[str]]:
    """Every module that loads at run time when `start` is imported (our own modules, and the
    top-level names of third-party and standard ones), each with the chain of imports that
    loads it (each step as "module (file:line: statement)")."""
    edges: dict[str, list[tuple[str, str]]] = {}
    for imp in imports:
        if imp.type_checking:
            continue
        edges.setdefault(imp.importer, []).append(
            (imp.target, f"{imp.path}:{imp.line}: {imp.source}"))
    for module in modules:
        for parent in _parents(module):
            if parent in modules:
                edges.setdefault(module, []).append((parent, "parent package"))
    reached: dict[str, list[str]] = {start: [start]}
    queue = [start]
    while queue:
        current = queue.pop(0)
        for target, how in edges.get(current, []):
            owned = target in modules
            key = target if owned else target.split(".")[0]
            if key in reached:
                continue
            reached[key] = [*reached[current], f"{key} ({how})"]
            if owned:
                queue.append(key)
            for parent in _parents(target) if owned else []:
                if parent in modules and parent not in reached:
                    reached[parent] = [*reached[key], f"{parent} (parent package)"]
                    queue.append(parent)
    return reached


def pure_core_may_import(target: str, top: str = "node") -> bool:
    """Whether `node.protocol` may import `target`, one of our own modules: only its own
    package and the exception tree (README.md, "Layers")."""
    return target == top or _within(target, f"{top}.protocol") or target == f"{top}.errors"


def protocol_violations(imports: list[Import], top: str = "node") -> list[str]:
    """Imports of `<top>.protocol` that leave the pure core."""
    found = []
    for imp in imports:
        if not _within(imp.importer, f"{top}.protocol"):
            continue
        first = imp.target.split(".")[0]
        if first in PROTOCOL_FORBIDDEN:
            found.append(f"{imp} -- {PROTOCOL_FORBIDDEN[first]} in the pure core")
        elif first == top and not pure_core_may_import(imp.target, top):
            found.append(f"{imp} -- the pure core may import only {top}.protocol and "
                         f"{top}.errors")
    return found


def network_violations(imports: list[Import], top: str = "node") -> list[str]:
    """Imports of libp2p, multiaddr or zeroconf outside `<top>.net`."""
    return [f"{imp} -- only {top}.net may import {imp.target.split('.')[0]}"
            for imp in imports
            if imp.target.split(".")[0] in NETWORK_LIBRARIES
            and not _within(imp.importer, f"{top}.net")]


def layer_violations(modules: set[str], imports: list[Import], layer: str,
                     forbidden: Iterable[str]) -> list[str]:
    """Modules of `layer` that import one of `forbidden` directly (TYPE_CHECKING included) or
    load it at run time through any chain of imports (shared modules included)."""
    forbidden = tuple(forbidden)
    found = [f"{imp} -- {layer} must not import {bad}"
             for imp in imports for bad in forbidden
             if _within(imp.importer, layer) and _within(imp.target, bad)]
    for module in sorted(m for m in modules if _within(m, layer)):
        for reached, chain in runtime_paths(modules, imports, module).items():
            for bad in forbidden:
                if _within(reached, bad) and len(chain) > 2:  # direct ones are reported above
                    found.append(f"{module} loads {reached} at run time -- {layer} must not "
                                 f"import {bad}; chain: {' -> '.join(chain)}")
    return found


def loaded_by(module: str, *, cwd: Path = ROOT) -> dict[str, list[str]]:
    """Modules a fresh interpreter loads for `import module`, each with the chain of imports
    that loaded it, from `python -X importtime` (its stderr nests each import under the one
    that caused it)."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return parse_importtime(result.stderr)


def parse_importtime(stderr: str) -> dict[str, list[str]]:
    """`-X importtime` output -> {module: [outermost importer, ..., module]}.

    Each line is "import time: self | cumulative | <indent>name", printed when the module
    finished loading, so the modules it imported come before it, indented two spaces more."""
    parent: dict[str, str | None] = {}
    waiting: list[tuple[int, str]] = []  # (depth, name): loaded, importer not printed yet
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.rstrip().endswith("| imported package"):
            continue
        field = line.split("|", 2)[2]
        name = field.strip()
        depth = (len(field) - len(field.lstrip()) - 1) // 2
        parent[name] = None
        for child_depth, child in waiting:
            if child_depth > depth:
                parent[child] = name
        waiting = [(d, n) for d, n in waiting if d <= depth]
        waiting.append((depth, name))
    chains: dict[str, list[str]] = {}
    for name in parent:
        chain: list[str] = [name]
        while (up := parent[chain[0]]) is not None:
            chain.insert(0, up)
        chains[name] = chain
    return chains


# --- the rules, on this repository ---------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> tuple[set[str], list[Import]]:
    return scan(ROOT, "node")


def _report(violations: list[str]) -> str:
    return "\n".join(["layering violated:", *violations])


def test_the_scan_sees_the_whole_tree(graph: tuple[set[str], list[Import]]) -> None:
    modules, imports = graph
    for layer in ("node.protocol.ratchet", "node.net.host", "node.device.node",
                  "node.relay.service", "node.cli"):
        assert layer in modules
    assert any(imp.importer == "node.net.host" and imp.target.startswith("libp2p")
               for imp in imports)


def test_protocol_is_pure(graph: tuple[set[str], list[Import]]) -> None:
    _, imports = graph
    assert not (found := protocol_violations(imports)), _report(found)


def test_protocol_loads_nothing_impure_at_run_time(graph: tuple[set[str], list[Import]]) -> None:
    modules, imports = graph
    found = []
    for module in sorted(m for m in modules if _within(m, "node.protocol")):
        for reached, chain in runtime_paths(modules, imports, module).items():
            outside = reached.split(".")[0] in PROTOCOL_FORBIDDEN or (
                _within(reached, "node") and not pure_core_may_import(reached))
            if outside:
                found.append(f"{module} loads {reached}: {' -> '.join(chain)}")
    assert not found, _report(found)


def test_only_net_imports_the_network_stack(graph: tuple[set[str], list[Import]]) -> None:
    _, imports = graph
    assert not (found := network_violations(imports)), _report(found)


def test_relay_never_imports_the_device(graph: tuple[set[str], list[Import]]) -> None:
    modules, imports = graph
    found = layer_violations(modules, imports, "node.relay", ["node.device", "node.cli"])
    assert not found, _report(found)


def test_net_imports_no_node_above_it(graph: tuple[set[str], list[Import]]) -> None:
    modules, imports = graph
    found = layer_violations(modules, imports, "node.net",
                             ["node.device", "node.relay", "node.cli"])
    assert not found, _report(found)


def test_device_imports_neither_relay_nor_cli(graph: tuple[set[str], list[Import]]) -> None:
    modules, imports = graph
    found = layer_violations(modules, imports, "node.device", ["node.relay", "node.cli"])
    assert not found, _report(found)


@pytest.mark.parametrize("module", ["node.protocol.ratchet", "node", "node.cli", "node.rpc_wire"])
def test_importing_loads_no_io_stack(module: str) -> None:
    """`node.cli` is all `pigeon --help` imports before parsing (node/__main__.py, and the
    console script, import `node.cli.main`); `node.rpc_wire` is how a one-shot command talks to
    the daemon."""
    loaded = loaded_by(module)
    assert module in loaded  # the parse saw the import itself
    heavy = {name: chain for name, chain in loaded.items() if name.split(".")[0] in HEAVY}
    assert not heavy, "\n".join(
        f"`import {module}` loads {name}: {' -> '.join(chain)}" for name, chain in heavy.items())


def test_every_lazy_export_of_node_net_has_a_home() -> None:
    import node.net

    homes = node.net._HOMES
    assert sorted(homes) == sorted(node.net.__all__)
    for name, home in homes.items():
        assert getattr(importlib.import_module(home), name) is getattr(node.net, name), name


def test_a_command_that_checks_addresses_does_not_load_libp2p(tmp_path: Path) -> None:
    """Every `pigeon` command validates its configuration's addresses with `node.net.addresses`,
    and `node.net` exports its names lazily, so that costs no libp2p import (about 0.8 s of CPU
    per command, which the daemon already paid). Checked in real `pigeon init` and `pigeon id`
    processes: neither needs the network."""
    data_dir = tmp_path / "me"
    made = subprocess.run([sys.executable, "-X", "importtime", "-m", "node", "--data-dir",
                           str(data_dir), "init", "--name", "Me"],
                          capture_output=True, text=True, check=True, timeout=60)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in made.stderr.splitlines()
              if line.startswith("import time:")}
    assert "node.device.setup" in loaded and (data_dir / "pigeon.db").exists()
    assert not sorted(m for m in loaded if m.split(".")[0] == "libp2p")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "node", "--data-dir",
                           str(data_dir), "id", "--json"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(done.stdout)["peer_id"]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
              if line.startswith("import time:")}
    assert "node.net.addresses" in loaded  # the check ran
    assert not sorted(m for m in loaded if m.split(".")[0] == "libp2p")


def test_a_command_the_daemon_serves_loads_no_event_loop(tmp_path: Path) -> None:
    """A one-shot command (ONE_SHOT in node/cli/device.py) that a running daemon serves talks to
    it through `node.rpc_wire.BlockingClient`: neither trio nor libp2p is loaded (loading trio
    was most of such a command's time). Real `pigeon run`, real `pigeon status`, and a refused
    `pigeon history` whose error comes back from the daemon as it would through trio."""
    data_dir = tmp_path / "me"
    subprocess.run([sys.executable, "-m", "node", "--data-dir", str(data_dir), "init", "--name",
                    "Me"], capture_output=True, check=True, timeout=60)
    daemon = Daemon(data_dir)
    try:
        status = subprocess.run([sys.executable, "-X", "importtime", "-m", "node", "--data-dir",
                                 str(data_dir), "status", "--json"],
                                capture_output=True, text=True, check=True, timeout=60)
        refused = subprocess.run([sys.executable, "-X", "importtime", "-m", "node",
                                  "--data-dir", str(data_dir), "history", "nobody", "--json"],
                                 capture_output=True, text=True, timeout=60)
    finally:
        daemon.stop()
    value = json.loads(status.stdout)
    assert value["daemon"] is True and value["peer_id"] == daemon.hello["peer_id"]
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["error"]["type"] == "ContactError"
    for done in (status, refused):
        loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                  if line.startswith("import time:")}
        assert "node.rpc_wire" in loaded and "node.rpc" not in loaded
        assert not sorted(m for m in loaded if m.split(".")[0] in ("trio", "libp2p"))


def test_a_broken_config_is_refused_before_libp2p_loads(tmp_path: Path) -> None:
    """A command that would open the node itself (no daemon running) reads its configuration
    first: a broken one is refused without paying for the network stack. Real `pigeon status`."""
    data_dir = tmp_path / "me"
    subprocess.run([sys.executable, "-m", "node", "--data-dir", str(data_dir), "init", "--name",
                    "Me"], capture_output=True, check=True, timeout=60)
    (data_dir / "config.toml").write_text("listen = [")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "node", "--data-dir",
                           str(data_dir), "status"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "is not valid TOML" in done.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
              if line.startswith("import time:")}
    assert "node.device.config" in loaded  # the configuration was read
    assert not sorted(m for m in loaded if m.split(".")[0] == "libp2p")


# --- the checker catches what it should (tiny fake trees) --------------------------------------------


def _tree(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for directory in {p.parent for p in root.rglob("*.py")}:
        (directory / "__init__.py").touch()
    return root


def test_checker_finds_impure_protocol_imports(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "node/errors.py": "",
        "node/files.py": "import sqlite3\n",
        "node/protocol/ok.py": "import hashlib\nimport cbor2\nfrom node.errors import X\n"
                               "from . import other\n",
        "node/protocol/other.py": "",
        "node/protocol/bad.py": "import os\n\ndef f():\n    import trio\n",
        "node/protocol/sneaky.py": "from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    from node.files import open_sqlite\n",
        "node/protocol/clock.py": "from time import monotonic\n",
    })
    _, imports = scan(root, "node")
    found = protocol_violations(imports)
    assert len(found) == 3, found
    assert any(f.startswith("node.protocol.bad imports trio: node/protocol/bad.py:4: import trio")
               for f in found), found
    assert any("node.protocol.sneaky imports node.files (TYPE_CHECKING only)" in f for f in found)
    assert any("node.protocol.clock imports time" in f and "clock" in f for f in found)
    ok = [imp.target for imp in imports if imp.importer == "node.protocol.ok"]
    assert ok == ["hashlib", "cbor2", "node.errors", "node.protocol.other"]  # `from .` resolved


def test_checker_finds_network_imports_outside_net(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "node/net/host.py": "import libp2p\nfrom multiaddr import Multiaddr\n",
        "node/device/node.py": "from libp2p.peer.id import ID\n",
        "node/relay/server.py": "async def serve():\n    import zeroconf\n",
    })
    _, imports = scan(root, "node")
    found = network_violations(imports)
    assert [f.split(" --")[0] for f in found] == [
        "node.device.node imports libp2p.peer.id: node/device/node.py:1: from libp2p.peer.id import ID",
        "node.relay.server imports zeroconf: node/relay/server.py:2: import zeroconf",
    ]


def test_checker_follows_shared_modules_to_the_device(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "node/__init__.py": "from typing import TYPE_CHECKING\n"
                            "if TYPE_CHECKING:\n    from node.device.node import Node\n",
        "node/device/node.py": "",
        "node/shared.py": "from node.device import node\n",
        "node/relay/server.py": "from ..shared import helper\n",
        "node/relay/clean.py": "import json\n",
    })
    modules, imports = scan(root, "node")
    found = layer_violations(modules, imports, "node.relay", ["node.device"])
    # the package's TYPE_CHECKING import of node.device does not load, so only server counts
    assert len(found) == 2, found  # node.device (package) and node.device.node
    assert all(f.startswith("node.relay.server loads node.device") for f in found), found
    assert "node.shared (node/relay/server.py:1: from ..shared import helper)" in found[0]
    assert "node.device.node (node/shared.py:1: from node.device import node)" in "\n".join(found)


def test_checker_finds_a_direct_type_checking_import_of_the_device(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "node/device/node.py": "",
        "node/relay/server.py": "import typing\nif typing.TYPE_CHECKING:\n"
                                "    from node.device.node import Node\n",
    })
    modules, imports = scan(root, "node")
    (found,) = layer_violations(modules, imports, "node.relay", ["node.device"])
    assert found.startswith("node.relay.server imports node.device.node (TYPE_CHECKING only): "
                            "node/relay/server.py:3:")


def test_importtime_parse_names_the_chain() -> None:
    stderr = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:        10 |         10 |       _socket",
        "import time:        20 |         30 |     socket",
        "import time:        30 |         40 |     sniffio",
        "import time:        40 |        110 |   trio",
        "import time:         5 |        115 | node.device.node",
        "import time:         5 |          5 | json",
    ])
    loaded = parse_importtime(stderr)
    assert loaded["_socket"] == ["node.device.node", "trio", "socket", "_socket"]
    assert loaded["sniffio"] == ["node.device.node", "trio", "sniffio"]
    assert loaded["json"] == ["json"]


def test_dynamic_check_sees_a_heavy_import(tmp_path: Path) -> None:
    _tree(tmp_path, {"fake/light.py": "import fake.heavy\n", "fake/heavy.py": "import sqlite3\n"})
    loaded = loaded_by("fake.light", cwd=tmp_path)
    assert loaded["sqlite3"][:3] == ["fake.light", "fake.heavy", "sqlite3"]


# --- the startup benchmark (its figures' shape; the timing itself is the benchmark's job) -------------


def test_startup_benchmark_prints_one_json_object() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--json", "--runs", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)  # exactly one JSON value: anything else fails here
    assert isinstance(figures, dict)
    timed = ["python_pass", "help", *(["pigeon_script"] if figures["pigeon_script_found"] else [])]
    expected = {"runs", "goal_s", "goal_met", "pigeon_script_found", "ratio",
                *(f"{name}_{stat}_s" for name in timed for stat in ("median", "p90")),
                *(["pigeon_script_ratio"] if "pigeon_script" in timed else [])}
    assert set(figures) == expected
    assert figures["runs"] == 2 and figures["goal_s"] == 0.3
    assert isinstance(figures["goal_met"], bool)
    for name in timed:
        assert 0 < figures[f"{name}_median_s"] <= figures[f"{name}_p90_s"] < 30
    assert figures["ratio"] == pytest.approx(
        figures["help_median_s"] / figures["python_pass_median_s"], rel=0.05)
