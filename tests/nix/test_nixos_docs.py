"""docs/options.md agrees with the module: its NixOS options table is generated from it,
lists every option, and shows literal values (patterns, enum values) as code.

The Nix examples of every page are checked by tests/docs."""

from __future__ import annotations

import json
import re

import pytest

import options_table
from harness.nixtools import REPO, TESTS, nix_eval, nix_string

DOC = REPO / "docs" / "options.md"


def test_options_table_is_generated_from_the_module() -> None:
    document = DOC.read_text()
    assert options_table.splice(document) == document, (
        "docs/options.md's NixOS options table is stale: run "
        "`python tests/nix/options_table.py --write docs/options.md`")


def test_options_table_lists_every_option() -> None:
    listed = set(re.findall(r"^\| `([A-Za-z.]+)` \|", DOC.read_text(), flags=re.M))
    data = nix_eval(f"import {nix_string(TESTS / 'options-eval.nix')}")
    assert set(data["services"]) <= listed, sorted(set(data["services"]) - listed)


def type_cell(option: str) -> str:
    row = next(line for line in options_table.table().splitlines() if line.startswith(f"| `{option}` |"))
    return row.split(" | ")[1]


def test_the_name_pattern_renders_as_code_not_as_a_link() -> None:
    assert type_cell("name") == "string matching the pattern `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`"


def test_literals_keep_their_pipes_escaped_inside_code() -> None:
    # GitHub splits table cells at every unescaped `|`, inside code spans too.
    assert type_cell("accessRules") == "list of (string matching the pattern `(allow\\|deny)( .*)?` or (submodule))"
    assert type_cell("logLevel") == 'one of `"debug"`, `"info"`, `"warning"`, `"error"`'


@pytest.mark.parametrize(("literal", "span"), [("https?://.+", "`https?://.+`"), ("a`b", "`` a`b ``")])
def test_a_literal_becomes_a_code_span_that_holds_it(literal: str, span: str) -> None:
    assert nix_eval(f"import {nix_string(TESTS / 'markdown-code.nix')} {json.dumps(literal)}") == span
