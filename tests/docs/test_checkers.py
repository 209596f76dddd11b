"""The docs checks, seen failing: each is fed a small page with one mistake and must report
exactly that mistake (and nothing on the same page without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from doc_checks import json_problems, link_problems, nix_problems, unknown_flags, unreachable
from harness.nixtools import NIXPKGS_LIB, NO_LIB_REASON
from markdown_pages import Page, anchors, code_blocks, slug

needs_lib = pytest.mark.skipif(NIXPKGS_LIB is None, reason=NO_LIB_REASON)


def page(tmp_path: Path, text: str, name: str = "page.md") -> Page:
    path = tmp_path / name
    path.write_text(text)
    return Page.read(path)


# --- headings and links ------------------------------------------------------------------

@pytest.mark.parametrize(("heading", "anchor"), [
    ("The blog post's setup, complete", "the-blog-posts-setup-complete"),
    ("Containers: `virtualisation.oci-sidecars.tsnsrv`", "containers-virtualisationoci-sidecarstsnsrv"),
    ("Soak under faults (`bench/soak`)", "soak-under-faults-benchsoak"),
    ("What runs: two units per service", "what-runs-two-units-per-service"),
    ("A [linked](other.md) **bold** heading", "a-linked-bold-heading"),
])
def test_headings_get_githubs_anchors(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor() -> None:
    assert anchors(["What runs", "Faults", "What runs", "What runs"]) == ["what-runs", "faults", "what-runs-1",
                                                                          "what-runs-2"]


def test_links_in_code_are_not_links(tmp_path: Path) -> None:
    text = ("See [this](real.md), not `[that](code.md)`.\n\n```sh\necho [x](block.md)\n```\n"
            "  ```text\n  [y](z.md)\n  ```\n")
    assert [link.target for link in page(tmp_path, text).links] == ["real.md"]


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# There\n")
    checked = page(tmp_path, "# Page\n\nGood: [there](there.md), [web](https://example.com/x.md).\n"
                             "Broken: [gone](gone.md).\n")
    assert link_problems(checked) == [f"{checked.path}:4: gone.md: gone.md does not exist"]


def test_a_wrong_anchor_is_reported_on_the_page_it_names(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Some section\n")
    checked = page(tmp_path, "# Page\n\n## Here\n\n[fine](other.md#some-section), [fine](#here),\n"
                             "[wrong](other.md#some-sectoin), [wrong](#nowhere)\n")
    assert link_problems(checked) == [
        f"{checked.path}:6: other.md#some-sectoin: no heading of other.md has the anchor #some-sectoin",
        f"{checked.path}:6: #nowhere: no heading of page.md has the anchor #nowhere",
    ]


def test_a_page_no_link_reaches_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("[a](docs/a.md)\n")
    (tmp_path / "docs" / "a.md").write_text("[b](b.md#top)\n")
    (tmp_path / "docs" / "b.md").write_text("# Top\n")
    (tmp_path / "docs" / "orphan.md").write_text("[a](a.md)\n")
    pages = sorted((tmp_path / "docs").glob("*.md"))
    assert unreachable(readme, pages) == [tmp_path / "docs" / "orphan.md"]


# --- tsnsrv flags ------------------------------------------------------------------------

def test_an_unknown_flag_is_reported(tmp_path: Path) -> None:
    checked = page(tmp_path, "```sh\ntsnsrv --name books --no-such-flag http://127.0.0.1:8083\n```\n")
    assert unknown_flags(checked) == [f"{checked.path}:2: `tsnsrv --name books --no-such-flag http://127.0.0.1:8083`: "
                                      "tsnsrv has no flag --no-such-flag"]


def test_flags_are_those_of_the_subcommand(tmp_path: Path) -> None:
    checked = page(tmp_path, "```console\n$ tsnsrv status --json\n$ tsnsrv status --name books\n"
                             "$ tsnsrv check --config f.json --plaintext\n$ tsnsrv jwks --socket s --json\n```\n")
    assert unknown_flags(checked) == [
        f"{checked.path}:3: `tsnsrv status --name books`: tsnsrv status has no flag --name",
        f"{checked.path}:5: `tsnsrv jwks --socket s --json`: tsnsrv jwks has no flag --json",
    ]


def test_continued_lines_inline_code_and_flag_values_are_read(tmp_path: Path) -> None:
    checked = page(tmp_path, "```bash\ntsnsrv --name books \\\n       --upstream-tcp-addr=h:1 --bogus \\\n"
                             "       http://x  # a --comment-flag\n```\n\nRun `tsnsrv status --jsn`.\n")
    problems = unknown_flags(checked)
    assert len(problems) == 2
    assert problems[0].endswith("tsnsrv has no flag --bogus") and problems[0].startswith(f"{checked.path}:2:")
    assert problems[1] == f"{checked.path}:7: `tsnsrv status --jsn`: tsnsrv status has no flag --jsn"


def test_wrong_values_of_real_flags_and_the_output_are_no_flag_problems(tmp_path: Path) -> None:
    checked = page(tmp_path, "```text\n$ tsnsrv --name Books --listen-port 8080 --funnel ftp://nas\n"
                             "tsnsrv: invalid configuration:\n  - --name: \"Books\" is not a machine name\n```\n")
    assert unknown_flags(checked) == []


# --- JSON --------------------------------------------------------------------------------

def test_a_json_configuration_tsnsrv_refuses_is_reported(tmp_path: Path) -> None:
    checked = page(tmp_path, '```json\n{"name": "books", "toURL": "http://127.0.0.1:8083"}\n```\n\n'
                             '```json\n{"name": "Books", "toURL": "http://127.0.0.1:8083"}\n```\n\n'
                             '```jsonc\n{ "acls": [] } // a tailnet policy\n```\n')
    good, bad = code_blocks(checked, "json")
    assert json_problems(checked, good) == []
    [problem] = json_problems(checked, bad)
    assert problem.startswith(f"{checked.path}:5: tsnsrv check refuses the example:")
    assert '"name" in /dev/stdin: "Books" is not a machine name' in problem


# --- Nix ---------------------------------------------------------------------------------

def nix_block_problems(tmp_path: Path, nix: str) -> list[str]:
    checked = page(tmp_path, f"```nix\n{nix}```\n")
    [block] = code_blocks(checked, "nix")
    return nix_problems(checked, block)


def test_a_nix_example_that_does_not_parse_is_reported(tmp_path: Path) -> None:
    [problem] = nix_block_problems(tmp_path, 'services.tsnsrv.enable = true;\n')
    assert problem.startswith(f"{tmp_path / 'page.md'}:1: does not parse:")


def test_a_flake_only_parses_and_anything_else_unchecked_is_reported(tmp_path: Path) -> None:
    assert nix_block_problems(tmp_path, '{\n  inputs.x.url = "github:o/x";\n  outputs = { x, ... }: { };\n}\n') == []
    assert nix_block_problems(tmp_path, '{ networking.hostName = "nas"; }\n') == [
        f"{tmp_path / 'page.md'}:1: neither configures tsnsrv nor is a flake; teach tests/docs how to check it"]


@needs_lib
def test_a_nix_example_that_does_not_evaluate_is_reported(tmp_path: Path) -> None:
    [problem] = nix_block_problems(tmp_path, '{ services.tsnsrv.services.books.toURLL = "http://127.0.0.1:8083"; }\n')
    assert problem.startswith(f"{tmp_path / 'page.md'}:1: does not evaluate:") and "toURLL" in problem


@needs_lib
def test_a_failed_assertion_of_the_module_is_reported(tmp_path: Path) -> None:
    problems = nix_block_problems(tmp_path, '{ services.tsnsrv.services.books = { toURL = "http://127.0.0.1:8083";\n'
                                            '  loginServerUrl = "http://127.0.0.1:8080"; }; }\n')
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'page.md'}:1: failed assertion:")
    assert "loginServerUrl" in problems[0]


@needs_lib
def test_sidecars_and_defaults_alone_are_rendered_and_checked(tmp_path: Path) -> None:
    sidecar = ('{ virtualisation.oci-containers.containers.app.image = "app";\n'
               '  virtualisation.oci-sidecars.tsnsrv = { enable = true; authKeyPath = "/run/key";\n'
               '    containers.app-tailnet = { forContainer = "app"; service.toURL = "http://127.0.0.1:1"; }; }; }\n')
    assert nix_block_problems(tmp_path, sidecar) == []
    assert nix_block_problems(tmp_path, sidecar.replace('"http://127.0.0.1:1"', '"ftp://nas"')) != []
    # Defaults alone: a service is added, so that they are rendered and checked.
    assert nix_block_problems(tmp_path, '{ services.tsnsrv.defaults.funnel = true; }\n') == []
    [problem] = nix_block_problems(tmp_path, '{ services.tsnsrv.defaults = { funnel = true; listenPort = 8080; }; }\n')
    assert "docs-example" in problem and "Funnel only accepts ports 443, 8443, 10000, not 8080" in problem
