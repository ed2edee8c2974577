"""mkdocs hook: the repository files the docs link to become part of the site.

The pages in docs/ link to files beside them in the repository
(``../SECURITY.md``, ``../config/upstreams.yaml``, ``../bench/results/...``),
which read well on a code host but lie outside the site.  This hook copies
every such file into the site under ``repository/`` (Markdown files become
pages, anything else a plain file) and rewrites the links to point there; the
links inside those Markdown files are rewritten the same way (a link back into
docs/ points at the site's page).  A link to a file that does not exist is
left alone, so ``mkdocs build --strict`` still fails on it.

A link to a directory (``../deploy``) is rewritten to the repository folder's
listing when one is generated: here a short index page of the files in it
that the docs link to.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

PREFIX = "repository"
# [text](target) and [text](target "title"); images too. Not inside code spans
# (none of the docs put links there).
_LINK = re.compile(r"(\]\()([^)\s#]+)([^)]*\))")

_root: Path | None = None
_directories: dict[str, set[str]] = {}


def _repo_path(page_repo_path: str, target: str) -> str | None:
    """The repository path a relative link from ``page_repo_path`` points at, or None."""
    if "://" in target or target.startswith(("/", "mailto:")):
        return None
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo_path), target))
    return None if resolved.startswith("..") else resolved


def _site_path(repo_path: str) -> str:
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/") :]
    return f"{PREFIX}/{repo_path}"


def _linked(text: str, page_repo_path: str) -> set[str]:
    found = set()
    for match in _LINK.finditer(text):
        target = _repo_path(page_repo_path, match.group(2))
        if target is not None and not target.startswith("docs/"):
            found.add(target)
    return found


def on_files(files: Files, config: Any) -> Files:
    global _root
    _root = Path(config["docs_dir"]).resolve().parent
    root = _root
    todo = [f"docs/{file.src_uri}" for file in files.documentation_pages()]
    seen: set[str] = set()
    _directories.clear()
    while todo:
        repo_path = todo.pop()
        source = root / repo_path
        text = source.read_text(encoding="utf-8") if source.is_file() and source.suffix == ".md" else ""
        for target in _linked(text, repo_path):
            if target in seen:
                continue
            seen.add(target)
            path = root / target
            if path.is_dir():
                _directories.setdefault(target, set())
                continue
            if not path.is_file():
                continue  # left as it is: --strict reports it
            parent = posixpath.dirname(target)
            if parent in _directories or any(parent == d for d in _directories):
                _directories.setdefault(parent, set()).add(target)
            files.append(File.generated(config, _site_path(target), abs_src_path=str(path)))
            if path.suffix == ".md":
                todo.append(target)
    # A listing page for each linked directory: the files of it the site carries.
    for directory in _directories:
        carried = sorted(f for f in seen if f.startswith(directory + "/") and (root / f).is_file())
        lines = [f"# `{directory}/`", "", "Files of this folder in the repository that the documentation refers to:", ""]
        lines += [f"- [`{posixpath.relpath(f, directory)}`]({posixpath.relpath(f, directory)})" for f in carried]
        files.append(File.generated(config, f"{PREFIX}/{directory}/index.md", content="\n".join(lines) + "\n"))
    return files


def on_page_markdown(markdown: str, page: Page, config: Any, files: Files) -> str:
    src_uri = page.file.src_uri
    page_repo_path = src_uri[len(PREFIX) + 1 :] if src_uri.startswith(PREFIX + "/") else f"docs/{src_uri}"
    page_site_dir = posixpath.dirname(src_uri)
    root = _root
    assert root is not None

    def rewrite(match: re.Match[str]) -> str:
        target = _repo_path(page_repo_path, match.group(2))
        if target is None:
            return match.group(0)
        if target.startswith("docs/") and not page_repo_path.startswith("docs/"):
            site = _site_path(target)
        elif target.startswith("docs/") or not (root / target).exists():
            return match.group(0)
        elif (root / target).is_dir():
            site = f"{PREFIX}/{target}/index.md"
        else:
            site = _site_path(target)
        return match.group(1) + posixpath.relpath(site, page_site_dir or ".") + match.group(3)

    return _LINK.sub(rewrite, markdown)
