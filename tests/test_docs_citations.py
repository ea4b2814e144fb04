"""Every citation of the repository's docs/ resolves, and no comment cites what a reader cannot open.

Code cites docs/ as "docs/<file>.md <ANCHOR>" (e.g. "docs/libp2p.md L7", or "docs/libp2p.md L3,
L4"), where the anchor is the number that starts a heading of that file ("## L7. ..."). The
forbidden forms are citations of documents that were never part of the repository (notes and
research reports kept elsewhere, paths on a build machine).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCANNED_DIRS = ("node", "tests", "benchmarks", "examples")
SCANNED_FILES = ("README.md", "PROTOCOL.md", "pyproject.toml", ".ci/run")

CITATION = re.compile(
    r"docs/(?P<file>[\w.-]+\.md)(?P<anchors>(?:(?:,\s*|\s+and\s+|\s+)[A-Z]\d+\b)*)"
)
ANCHOR = re.compile(r"[A-Z]\d+")
HEADING = re.compile(r"^#+ (?P<anchor>[A-Z]\d+)\. ", re.MULTILINE)
REPO_PATH = re.compile(r"`((?:node|tests|benchmarks|examples)/[\w/.-]+\.py)`")

FORBIDDEN = {
    "notes outside the repository": re.compile(
        r"LIBP2P_NOTES|DESIGN\.md|\bnotes #\d|\bnotes pitfall"),
    "a research report or prototype": re.compile(r"research (report|prototype)|discovery report"),
    "a numbered report item": re.compile(r"\breport (#|section |\d)"),
    "a numbered pitfall of a report": re.compile(r"\bpitfall \d"),
    "a discovery nobody can look up": re.compile(r"\bfound here\b"),
    "a path on a build machine": re.compile(r"/work/|/root/|/tmp/research"),
    "the issue tracker, which is not in the repository": re.compile(
        r"\b[Ii]ssue \d|\bfindings? \d"),
}


def scanned_files() -> list[Path]:
    this = Path(__file__).resolve()
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).exists()]
    for directory in SCANNED_DIRS:
        files += sorted(p for p in (ROOT / directory).rglob("*.py") if p.resolve() != this)
    return files


def anchors_of(doc: Path) -> list[str]:
    """The anchors a docs/ file defines, in order (one per numbered heading)."""
    return [m["anchor"] for m in HEADING.finditer(doc.read_text(encoding="utf-8"))]


def broken_citations(text: str, docs: Path) -> list[str]:
    """Citations in `text` whose docs/ file or anchor does not exist, as readable strings."""
    problems = []
    known: dict[str, set[str]] = {}
    for match in CITATION.finditer(text):
        name = match["file"]
        doc = docs / name
        if not doc.is_file():
            problems.append(f"docs/{name} does not exist")
            continue
        if name not in known:
            known[name] = set(anchors_of(doc))
        for anchor in ANCHOR.findall(match["anchors"]):
            if anchor not in known[name]:
                problems.append(f"docs/{name} has no section {anchor}")
    return problems


def forbidden_citations(text: str) -> list[str]:
    """Lines of `text` that cite something outside the repository, with what they cite."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                found.append(f"line {number} cites {what}: {line.strip()}")
    return found


# --- the checker itself ---------------------------------------------------------------------------


def test_checker_finds_a_missing_anchor_and_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.md").write_text("# X\n\n## L1. One\n\n## L2. Two\n", encoding="utf-8")
    assert broken_citations("see docs/x.md L1 and docs/x.md L2, L1", tmp_path) == []
    assert broken_citations("# (docs/x.md L3)", tmp_path) == ["docs/x.md has no section L3"]
    assert broken_citations("# docs/x.md L1, L9", tmp_path) == ["docs/x.md has no section L9"]
    assert broken_citations("# docs/y.md L1", tmp_path) == ["docs/y.md does not exist"]


def test_checker_finds_every_forbidden_form() -> None:
    samples = [
        "# see LIBP2P_NOTES.md #7",
        "# (DESIGN.md, \"Layers\")",
        "# (notes #17)",
        "# discovery research report section 1",
        "# (report #11)",
        "# (report 1.4)",
        "# (pitfall 15)",
        "# (found here)",
        "# cite /work/shared/NOTES.md",
        "# (issue 9, finding 8)",
        "# Issue 10: the first dial",
    ]
    for sample in samples:
        assert forbidden_citations(sample), sample
    assert forbidden_citations("# (docs/libp2p.md L7): we report the peer") == []


# --- the repository -------------------------------------------------------------------------------


def test_every_docs_citation_resolves() -> None:
    problems = []
    cited = 0
    for path in scanned_files():
        text = path.read_text(encoding="utf-8")
        cited += len(CITATION.findall(text))
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in broken_citations(text, DOCS)]
    assert problems == []
    assert cited > 0  # the scan looked where the citations are


def test_no_comment_cites_a_document_outside_the_repository() -> None:
    problems = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8")
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in forbidden_citations(text)]
    assert problems == []


def test_docs_anchors_are_unique_and_their_paths_exist() -> None:
    docs = sorted(DOCS.glob("*.md"))
    assert docs, "docs/ holds the documents the code cites"
    for doc in docs:
        anchors = anchors_of(doc)
        assert len(anchors) == len(set(anchors)), f"{doc.name} repeats an anchor"
        text = doc.read_text(encoding="utf-8")
        missing = [p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
        assert missing == [], f"{doc.name} names files that do not exist"
        assert forbidden_citations(text) == []
