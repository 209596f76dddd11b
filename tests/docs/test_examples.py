"""Every example of the docs works: each `tsnsrv` command names only flags its
(sub)command has, each Nix example evaluates with the module (a flake at least parses),
and each JSON configuration passes `tsnsrv check`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from doc_checks import PAGES, configures_tsnsrv, json_problems, nix_configuration, nix_problems, shown, unknown_flags
from harness.nixtools import NIXPKGS_LIB, NO_LIB_REASON, REPO, evaluate_module
from markdown_pages import CodeBlock, Page, code_blocks

READ = {path: Page.read(path) for path in PAGES}


def examples(*languages: str) -> list[Any]:
    """The code blocks of these languages on every page, as test parameters."""
    return [pytest.param(page, block, id=f"{shown(path)}:{block.line}")
            for path, page in READ.items() for block in code_blocks(page, *languages)]


@pytest.mark.parametrize("path", PAGES, ids=shown)
def test_tsnsrv_commands_use_flags_that_exist(path: Path) -> None:
    assert unknown_flags(READ[path]) == []


@pytest.mark.parametrize(("page", "block"), examples("nix"))
def test_nix_examples_evaluate(page: Page, block: CodeBlock) -> None:
    if configures_tsnsrv(block) and NIXPKGS_LIB is None:
        pytest.skip(NO_LIB_REASON)
    assert nix_problems(page, block) == []


@pytest.mark.parametrize(("page", "block"), examples("json"))
def test_json_examples_pass_tsnsrv_check(page: Page, block: CodeBlock) -> None:
    assert json_problems(page, block) == []


@pytest.mark.skipif(NIXPKGS_LIB is None, reason=NO_LIB_REASON)
def test_the_blog_post_setup_renders_its_three_services(tmp_path: Path) -> None:
    nixos_guide = READ[REPO / "docs" / "nixos.md"]
    block = next(block for block in code_blocks(nixos_guide, "nix") if "funnel:/kobo/" in block.text)
    example = tmp_path / "blog.nix"
    example.write_text(block.text)
    result = evaluate_module(nix_configuration(example))
    assert sorted(result["expected"]) == ["alertmanager", "books", "home"]
    books = result["expected"]["books"]["settings"]
    assert books["funnel"] is True and books["tags"] == ["tag:books"]
    assert books["prefixes"] == ["tailnet:/", "funnel:/kobo/"] and books["stripPrefix"] is False
    assert result["expected"]["alertmanager"]["settings"]["accessRules"] == ["allow user:me@example.com", "deny"]
