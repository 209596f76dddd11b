"""Every relative link of the docs leads to a file, every `#anchor` to a heading of its
page, and every page of docs/ can be reached from the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from doc_checks import PAGES, link_problems, shown, unreachable
from harness.nixtools import REPO
from markdown_pages import Page


@pytest.mark.parametrize("path", PAGES, ids=shown)
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    page = Page.read(path)
    assert link_problems(page) == []


def test_every_page_of_docs_is_reachable_from_the_readme() -> None:
    assert [shown(path) for path in unreachable(REPO / "README.md", PAGES)] == []
