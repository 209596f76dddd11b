"""README.md agrees with the module: its options table is generated from it, every
Nix example parses, and (with a nixpkgs lib) the blog post's configuration evaluates."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

import options_table
from harness.nixtools import NIXPKGS_LIB, NO_LIB_REASON, REPO, TESTS, TSNSRV, nix_eval, nix_string, run_nix

DOC = REPO / "README.md"


def nix_blocks() -> list[str]:
    return re.findall(r"```nix\n(.*?)```", DOC.read_text(), flags=re.S)


def test_options_table_is_generated_from_the_module() -> None:
    document = DOC.read_text()
    assert options_table.splice(document) == document, (
        "README.md's options table is stale: run `python tests/nix/options_table.py --write README.md`")


def test_options_table_lists_every_option() -> None:
    listed = set(re.findall(r"^\| `([A-Za-z.]+)` \|", DOC.read_text(), flags=re.M))
    data = nix_eval(f"import {nix_string(TESTS / 'options-eval.nix')}")
    assert set(data["services"]) <= listed, sorted(set(data["services"]) - listed)


@pytest.mark.parametrize("index", range(len(nix_blocks())))
def test_nix_examples_parse(index: int, tmp_path) -> None:
    path = tmp_path / "example.nix"
    path.write_text(nix_blocks()[index])
    result = run_nix(["--parse", str(path)])
    assert result.returncode == 0, f"example {index} of README.md does not parse:\n{result.stderr}"


def tsnsrv_settings(block: str) -> str:
    """The `services.tsnsrv = { ... };` definition of an example, by brace matching."""
    start = block.index("services.tsnsrv = {")
    depth = 0
    for position in range(block.index("{", start), len(block)):
        depth += {"{": 1, "}": -1}.get(block[position], 0)
        if depth == 0:
            return block[start:position + 1] + ";"
    raise AssertionError("unbalanced example")


@pytest.mark.skipif(NIXPKGS_LIB is None, reason=NO_LIB_REASON)
def test_the_blog_configuration_evaluates() -> None:
    block = next(b for b in nix_blocks() if "funnel:/kobo/" in b)
    configuration = "{ " + tsnsrv_settings(block) + " }"
    lib = nix_string(NIXPKGS_LIB)
    result = nix_eval(f"import {nix_string(TESTS / 'eval-module.nix')} {{ lib = import {lib}; "
                      f"configuration = {configuration}; }}")
    assert result["failedAssertions"] == []
    assert sorted(result["expected"]) == ["alertmanager", "books", "home"]
    books = result["expected"]["books"]["settings"]
    assert books["funnel"] is True and books["tags"] == ["tag:books"]
    # Each rendered file passes the runtime's validator.
    for name, expected in result["expected"].items():
        check = subprocess.run([*TSNSRV, "check", "--config", "/dev/stdin"],
                               input=json.dumps(expected["settings"]), capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO / "python")))
        assert check.returncode == 0, f"{name}: {check.stderr}"
