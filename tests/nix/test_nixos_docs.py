"""docs/options.md agrees with the module: its NixOS options table is generated from it,
lists every option, and shows literal values (patterns, enum values) as code.

The Nix examples of every page are checked by tests/docs."""

from __future__ import annotations

import re

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
