"""The README is a short front door: under 12 KB, saying first what tsnsrv is built on,
and giving the test command that CI runs."""

from __future__ import annotations

from doc_checks import README_LIMIT
from harness.nixtools import REPO
from markdown_pages import Page, code_blocks

README = REPO / "README.md"


def test_the_readme_fits_in_12_kib() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move text to a page of docs/"


def test_the_first_paragraph_says_what_the_proxy_is_built_on() -> None:
    first_paragraph = README.read_text().split("\n\n")[1]
    assert "aiohttp" in first_paragraph and "tailscaled" in first_paragraph


def test_the_quick_start_gives_the_command_that_ci_runs() -> None:
    # .ci/run says it runs exactly the test command of the README.
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1].removeprefix("exec ")
    page = Page.read(README)
    quick_start = page.text[page.text.index("\n## Quick start\n"):]
    commands = [line.split("#")[0].strip() for block in code_blocks(Page.parse(README, quick_start), "sh")
                for line in block.text.splitlines()]
    assert ci_command in commands and "scripts/demo" in commands
