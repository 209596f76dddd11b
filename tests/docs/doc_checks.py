"""The checks of what the docs promise. Each takes pages (markdown_pages.Page) and returns
its problems, one line each, naming the page and line, so that a test shows them all and
test_checkers.py can feed each a page with one mistake.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from harness.nixtools import REPO, TRIMMED_TAILSCALE, TSNSRV, evaluate_module, nix_string, run_nix
from markdown_pages import CodeBlock, Page, code_blocks
from tsnsrv import cli

# The pages the docs tier checks: the front door, the manual, and the benchmarks' README.
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
README_LIMIT = 12 * 1024

SHELL_LANGUAGES = ("sh", "bash", "shell", "console", "text")
# Tokens that end a command: what follows belongs to another one.
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "2>&1", "(", ")"}


def shown(path: Path) -> str:
    """A path as the problems name it: relative to the repository when it is in it."""
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def where(page: Page, line: int) -> str:
    return f"{shown(page.path)}:{line}"


# --- links -----------------------------------------------------------------------------

def _is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) is not None


def link_problems(page: Page) -> list[str]:
    """Relative links that lead nowhere, and `#anchors` that name no heading of their page
    (GitHub's anchors; on other files than Markdown, anchors are not checked)."""
    problems = []
    for link in page.links:
        if _is_external(link.target):
            continue
        path_part, _, anchor = link.target.partition("#")
        target = (page.path.parent / path_part).resolve() if path_part else page.path
        if not target.exists():
            problems.append(f"{where(page, link.line)}: {link.target}: {path_part} does not exist")
            continue
        if anchor and target.suffix == ".md" and anchor not in Page.read(target).anchors:
            problems.append(f"{where(page, link.line)}: {link.target}: no heading of "
                            f"{target.name} has the anchor #{anchor}")
    return problems


def linked_pages(page: Page) -> set[Path]:
    """The Markdown files a page links to."""
    targets = set()
    for link in page.links:
        path_part = link.target.partition("#")[0]
        if path_part.endswith(".md") and not _is_external(link.target):
            targets.add((page.path.parent / path_part).resolve())
    return targets


def unreachable(start: Path, pages: Iterable[Path]) -> list[Path]:
    """The pages that no chain of links from `start` reaches."""
    reached, queue = {start.resolve()}, [start.resolve()]
    while queue:
        for target in linked_pages(Page.read(queue.pop())) - reached:
            if target.exists():
                reached.add(target)
                queue.append(target)
    return [page for page in pages if page.resolve() not in reached]


# --- tsnsrv command lines ----------------------------------------------------------------

def parsers() -> dict[str, argparse.ArgumentParser]:
    """The argument parser of each subcommand; "" is running a service."""
    return {"": cli.build_parser(), cli.CHECK: cli.build_parser(),
            **{name: importlib.import_module(module).build_parser() for name, module in cli.SUBCOMMANDS.items()}}


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    # argparse keeps its options in `_actions`; it has no public accessor.
    return {flag for action in parser._actions for flag in action.option_strings}


def command_lines(page: Page) -> list[tuple[int, str]]:
    """Each `tsnsrv` command of the page's shell examples (a `$ ` prompt dropped, `\\`
    continuations joined), and of its inline code that starts with `tsnsrv `."""
    commands = []
    for block in code_blocks(page, *SHELL_LANGUAGES):
        lines = block.text.split("\n")
        index = 0
        while index < len(lines):
            number, line = block.line + 1 + index, lines[index].strip()
            while line.endswith("\\") and index + 1 < len(lines):
                index += 1
                line = line[:-1] + " " + lines[index].strip()
            index += 1
            line = line.removeprefix("$ ")
            if line.split(" ", 1)[0] == "tsnsrv":
                commands.append((number, line))
    commands += [(code.line, code.text) for code in page.inline_code if code.text.startswith("tsnsrv ")]
    return commands


def words(command: str) -> list[str]:
    """A command line's words, up to its end (a comment or a shell operator)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out = []
    for word in lexer:
        if word in SHELL_OPERATORS:
            break
        out.append(word)
    return out


def unknown_flags(page: Page) -> list[str]:
    """Flags that the command a `tsnsrv` example runs does not have."""
    known = {name: flags_of(parser) for name, parser in parsers().items()}
    problems = []
    for line, command in command_lines(page):
        arguments = words(command)[1:]
        subcommand = arguments[0] if arguments and arguments[0] in known else ""
        for word in arguments:
            flag = word.split("=", 1)[0]
            if flag.startswith("-") and flag != "-" and flag not in known[subcommand]:
                what = f"tsnsrv {subcommand}" if subcommand else "tsnsrv"
                problems.append(f"{where(page, line)}: `{command}`: {what} has no flag {flag}")
    return problems


# --- JSON configurations ------------------------------------------------------------------

def check_config(text: str) -> subprocess.CompletedProcess[str]:
    """`tsnsrv check --config /dev/stdin` on a configuration."""
    return subprocess.run([*TSNSRV, "check", "--config", "/dev/stdin"], input=text, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "python")), timeout=60)


def json_problems(page: Page, block: CodeBlock) -> list[str]:
    """What `tsnsrv check` says of a ```json example (```jsonc blocks are tailnet policies,
    not tsnsrv configurations, and are left out by their language)."""
    result = check_config(block.text)
    if result.returncode == 0:
        return []
    return [f"{where(page, block.line)}: tsnsrv check refuses the example: {result.stderr.strip()}"]


# --- Nix examples -------------------------------------------------------------------------

def configures_tsnsrv(block: CodeBlock) -> bool:
    return "services.tsnsrv" in block.text or "virtualisation.oci-sidecars" in block.text


def is_flake(block: CodeBlock) -> bool:
    return re.search(r"^\s*inputs\b", block.text, flags=re.M) is not None and "outputs" in block.text


def nix_configuration(example: Path) -> str:
    """A NixOS module of what an example says about tsnsrv, for tests/nix/eval-module.nix.

    Only `services.tsnsrv` and `virtualisation.oci-{containers,sidecars}` are taken: the
    other NixOS modules an example sets up (calibre-web, home-assistant...) are not part of
    nixpkgs' lib. The module is enabled (an example may show only its own lines), and an
    example that defines no service or sidecar gets one, so that its defaults are rendered
    and checked too. Its `tsnsrv` argument (the flake, as a module argument) is a stand-in
    whose tailscaleTrimmed is nixos/tailscale-trimmed.nix on the stub tailscale."""
    return f"""{{ lib, pkgs, ... }}@args:
      let
        example = import {nix_string(example)};
        standInFlake.packages.${{pkgs.stdenv.hostPlatform.system}}.tailscaleTrimmed = {TRIMMED_TAILSCALE};
        defined = if builtins.isFunction example then example (args // {{ tsnsrv = standInFlake; }}) else example;
        tsnsrv = defined.services.tsnsrv or {{ }};
        virtualisation = builtins.intersectAttrs {{ oci-containers = null; oci-sidecars = null; }}
          (defined.virtualisation or {{ }});
        definesNothing = (tsnsrv.services or {{ }}) == {{ }}
          && (virtualisation.oci-sidecars.tsnsrv.containers or {{ }}) == {{ }};
      in {{
        services.tsnsrv = lib.mkMerge [
          tsnsrv
          {{ enable = lib.mkDefault true; }}
          (lib.mkIf definesNothing {{ services.docs-example.toURL = "http://127.0.0.1:8080"; }})
        ];
        inherit virtualisation;
      }}"""


def nix_problems(page: Page, block: CodeBlock) -> list[str]:
    """A Nix example parses; one that configures tsnsrv also evaluates with the module and
    the vendored nixpkgs lib, without failed assertions, and `tsnsrv check` accepts every
    service and sidecar it renders. A flake only has to parse: its inputs come from GitHub,
    which an offline evaluation cannot fetch."""
    at = where(page, block.line)
    with tempfile.TemporaryDirectory(prefix="tsnsrv-docs-") as directory:
        example = Path(directory) / "example.nix"
        example.write_text(block.text)
        parsed = run_nix(["--parse", str(example)])
        if parsed.returncode != 0:
            return [f"{at}: does not parse: {parsed.stderr.strip()}"]
        if not configures_tsnsrv(block):
            return [] if is_flake(block) else [
                f"{at}: neither configures tsnsrv nor is a flake; teach tests/docs how to check it"]
        try:
            result = evaluate_module(nix_configuration(example))
        except AssertionError as error:  # nix_eval's report of a failed evaluation
            return [f"{at}: does not evaluate: {error}"]
    problems = [f"{at}: failed assertion: {message}" for message in result["failedAssertions"]]
    rendered = {**result["expected"], **result["expectedSidecars"]}
    for name, expected in rendered.items():
        check = check_config(json.dumps(expected["settings"]))
        if check.returncode != 0:
            problems.append(f"{at}: tsnsrv check refuses the rendered {name}: {check.stderr.strip()}")
    return problems
