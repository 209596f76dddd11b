"""The option table of docs/options.md is generated from the config model and must stay in
sync; the verification examples of docs/identity-assertions.md are the test verifiers' code.

If this fails after adding or changing an option, regenerate the table:
    python -m tsnsrv.docs --write docs/options.md
"""

from __future__ import annotations

from pathlib import Path

import re

import attrs
import pytest

from tsnsrv import config, docs

REPO = Path(__file__).resolve().parents[2]
OPTIONS_PAGE = REPO / "docs" / "options.md"
ASSERTIONS_PAGE = REPO / "docs" / "identity-assertions.md"
VERIFIERS = REPO / "tests" / "harness" / "assertion_verifiers"


def page_table(text: str) -> str:
    start = text.index(docs.BEGIN) + len(docs.BEGIN)
    return text[start:text.index(docs.END)].strip("\n")


def test_the_option_table_matches_the_config_model():
    text = OPTIONS_PAGE.read_text()
    assert text.count(docs.BEGIN) == 1 and text.count(docs.END) == 1
    assert page_table(text) == docs.table(), \
        "docs/options.md is stale: run `python -m tsnsrv.docs --write docs/options.md`"
    assert docs.splice(text) == text


def test_table_has_one_row_per_option_in_model_order():
    rows = docs.table().splitlines()[2:]
    assert len(rows) == len(config.FIELDS)
    for row, key in zip(rows, config.FIELDS):
        assert f"| `{key}` |" in row


@pytest.mark.parametrize(("key", "flag_cell", "default_cell"), [
    ("name", "`--name`", "required"),
    ("toURL", "`URL`", "required"),
    ("listenPort", "`--listen-port PORT`", "none"),
    ("plaintext", "`--plaintext / --no-plaintext`", "`false`"),
    ("stripPrefix", "`--strip-prefix / --no-strip-prefix`", "`true`"),
    ("readHeaderTimeout", "`--read-header-timeout DURATION`", "`30`"),
    ("frontAddress", "`--front-address ADDR`", "`127.0.0.2`"),
    ("identityHeaders", "`--identity-header SCHEMA`", "`['tsnsrv']`"),
    ("tags", "`--tag TAG`", "none"),
])
def test_rows_show_flag_and_default(key, flag_cell, default_cell):
    row = next(r for r in docs.table().splitlines() if f"| `{key}` |" in r)
    cells = [cell.strip() for cell in row.strip("|").split(" | ")]
    assert cells[0] == flag_cell and cells[2] == default_cell


def test_pipes_in_help_are_escaped_for_markdown():
    row = next(r for r in docs.table().splitlines() if "| `accessRules` |" in r)
    assert "allow\\|deny" in row
    assert row.count(" | ") == 3  # four cells, whatever the help text holds


def test_a_new_option_makes_the_page_stale(monkeypatch):
    @attrs.define
    class Extra:
        brand_new_option: int = config.option(7, metavar="N", help="Something nobody documented yet.")

    field = attrs.fields(Extra).brand_new_option
    monkeypatch.setattr(docs, "FIELDS", {**config.FIELDS, config.json_key(field): field})
    text = OPTIONS_PAGE.read_text()
    assert page_table(text) != docs.table()
    assert "| `--brand-new-option N` | `brandNewOption` | `7` | Something nobody documented yet. |" in docs.table()
    assert docs.splice(text) != text


def test_write_replaces_only_the_table(tmp_path):
    target = tmp_path / "options.md"
    target.write_text(f"# Title\n\n{docs.BEGIN}\nold table\n{docs.END}\n\nafter\n")
    assert docs.main(["--write", str(target)]) == 0
    assert target.read_text() == f"# Title\n\n{docs.BEGIN}\n{docs.table()}\n{docs.END}\n\nafter\n"


def test_main_prints_the_table(capsys):
    assert docs.main([]) == 0
    assert capsys.readouterr().out == docs.table() + "\n"


@pytest.mark.parametrize(("language", "source", "comment"), [
    ("python", "verifier.py", "#"), ("js", "verifier.js", "//"), ("go", "verifier.go", "//")])
def test_the_verification_examples_are_the_code_the_end_to_end_verifiers_run(language, source, comment):
    code = (VERIFIERS / source).read_text()
    marked = re.search(f"^{comment} docs:begin\n(.*?)\n*^{comment} docs:end$", code, re.S | re.M)
    assert marked, f"{source} has no {comment} docs:begin / docs:end region"
    examples = re.findall(f"^```{language}\n(.*?)^```$", ASSERTIONS_PAGE.read_text(), re.S | re.M)
    assert examples == [marked.group(1) + "\n"], \
        f"the {language} example of {ASSERTIONS_PAGE.name} differs from {source}'s docs region; copy it over"
