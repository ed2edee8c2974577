"""Every relative link and #anchor in README.md and docs/*.md resolves.

Anchors follow GitHub's heading slugs: the heading's text (inline code and
emphasis markers dropped, link text kept), lower-cased, every character other
than a letter, digit, `_`, `-` or space removed, spaces turned into `-`; a
repeated slug gets `-1`, `-2`, ... appended.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) or [text](target "title"); images too. Text may hold one level of brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(path.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list[str]:
    found = []
    for line in prose_lines(path.read_text()):
        found.extend(LINK.findall(CODE_SPAN.sub("", line)))
    return found


def test_the_slugs_follow_githubs_rules() -> None:
    assert slug("Multi-core: `workers`") == "multi-core-workers"
    assert slug("`upstreams.<name>`") == "upstreamsname"
    assert slug("When HTTP/2 helps, and when it costs") == "when-http2-helps-and-when-it-costs"
    assert slug("`queue_full` and `pool_timeout`") == "queue_full-and-pool_timeout"
    assert slug("1 vs 2 workers") == "1-vs-2-workers"


def test_links_are_found_outside_code_only() -> None:
    assert LINK.findall("see [a](b.md#c) and [`x`](../y) and `[no](z)`") == ["b.md#c", "../y", "z"]
    assert links(ROOT / "README.md"), "README.md has no links at all: the link pattern is broken"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)
