"""The repository's documents stand alone: nothing names a document or a tracker that a clone
does not have, the README stays short, and every relative link in README.md and docs/ leads to a
file (and heading) of this clone."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 15 * 1024

# Names of things outside the clone: an outside contract's file and its lettered parts, and
# issue numbers of a tracker. (Written so that this file does not match them itself.)
OUTSIDE_NAMES = re.compile(r"PROTOCOL\.md|\b[Pp]arts? [A-D]\b|\b[Ii]ssues? #?[0-9]+")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in listed.decode().split("\0") if name and (REPO / name).is_file()]


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(h) for h in HEADING.findall(text)}


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans show link syntax, they are not links
    return LINK.findall(text) + REFERENCE.findall(text)


def broken_link(source: Path, target: str) -> str | None:
    """Why `target`, a link in `source`, does not resolve inside the clone (None when it does)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto: ...
        return None
    path_part, _, anchor = target.partition("#")
    resolved = (source.parent / unquote(path_part)).resolve() if path_part else source
    if not resolved.is_relative_to(REPO):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"no heading #{anchor} in {resolved.relative_to(REPO)}"
    return None


def test_no_tracked_file_names_an_outside_contract_or_an_issue_number() -> None:
    found = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (images, quotes)
        for number, line in enumerate(text.splitlines(), 1):
            for match in OUTSIDE_NAMES.finditer(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)!r}")
    assert not found, "name things a clone has (docs/protocol.md, a section title):\n" + "\n".join(found)


def test_the_readme_stays_short() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move details into docs/"


@pytest.mark.parametrize("document", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_clone(document: Path) -> None:
    problems = [f"{target}: {why}" for target in links(document) if (why := broken_link(document, target))]
    assert not problems, f"{document.relative_to(REPO)}:\n" + "\n".join(problems)


def test_the_link_check_sees_broken_links_and_anchors(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing heading and a path out of the clone fail."""
    docs = REPO / "docs"
    assert broken_link(docs / "x.md", "protocol.md") is None
    assert broken_link(docs / "x.md", "no-such-file.md") == "no such file"
    assert broken_link(docs / "x.md", "../../outside.md") == "points outside the repository"
    assert broken_link(docs / "x.md", "protocol.md#no-such-heading").startswith("no heading")
    assert broken_link(docs / "x.md", "https://example.org/a.md") is None
    assert slug("5. Key epochs, replays and errors") == "5-key-epochs-replays-and-errors"
    assert slug("Attested TLS (`https://`)") == "attested-tls-https"
    assert OUTSIDE_NAMES.search("see " + "PROTOCOL" + ".md") and OUTSIDE_NAMES.search("as in part " + "C")
    assert OUTSIDE_NAMES.search("since issue " + "16") and not OUTSIDE_NAMES.search("a part of the key")
