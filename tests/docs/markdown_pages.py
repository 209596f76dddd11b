"""Just enough of GitHub's Markdown to check the docs: headings and their anchors, links,
fenced code blocks and inline code.

Not a renderer: it knows ATX headings (`## Title`), inline links and images
(`[text](target)`), reference definitions (`[label]: target`) and fenced blocks (also
indented inside list items), which is all the docs use. Links inside code are not links.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import attrs

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
# A code span: a run of backticks, then anything up to the same run (CommonMark 6.1).
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\(\s*<?(?P<target>[^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(?P<target>\S+?)>?(?:\s|$)", re.M)


@attrs.frozen
class Link:
    target: str
    line: int


@attrs.frozen
class CodeBlock:
    language: str
    text: str
    line: int  # of the opening fence


@attrs.frozen
class InlineCode:
    text: str
    line: int


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger), before de-duplication: the
    rendered text, lowercased, without punctuation but `-` and `_`, spaces made `-`."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = INLINE_LINK.sub(lambda m: m.group("text"), text)
    text = text.replace("*", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(headings: list[str]) -> list[str]:
    """Each heading's anchor; a repeated one gets `-1`, `-2`... as on GitHub."""
    seen: dict[str, int] = {}
    out = []
    for heading in headings:
        base = candidate = slug(heading)
        while candidate in seen:
            seen[base] += 1
            candidate = f"{base}-{seen[base]}"
        seen[candidate] = 0
        out.append(candidate)
    return out


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


@attrs.define
class Page:
    path: Path
    text: str
    code_blocks: list[CodeBlock] = attrs.field(factory=list)
    # The text outside fenced blocks, with each block's lines left empty (line numbers hold).
    prose: str = ""

    @classmethod
    def read(cls, path: Path) -> Page:
        return cls.parse(path, path.read_text())

    @classmethod
    def parse(cls, path: Path, text: str) -> Page:
        page = cls(path, text)
        prose: list[str] = []
        opening: re.Match[str] | None = None
        body: list[str] = []
        for number, line in enumerate(text.split("\n"), start=1):
            if opening is None:
                match = FENCE.match(line)
                if match and not (match["fence"][0] == "`" and "`" in match["info"]):
                    opening, opened_at, body = match, number, []
                    prose.append("")
                else:
                    prose.append(line)
                continue
            prose.append("")
            closing = FENCE.match(line)
            if (closing and closing["fence"][0] == opening["fence"][0]
                    and len(closing["fence"]) >= len(opening["fence"]) and not closing["info"].strip()):
                language = opening["info"].strip().split(" ")[0]
                page.code_blocks.append(CodeBlock(language, "".join(f"{b}\n" for b in body), opened_at))
                opening = None
            else:
                indent = len(opening["indent"])
                body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
        page.prose = "\n".join(prose)
        return page

    @property
    def headings(self) -> list[str]:
        return [m.group(2) for line in self.prose.split("\n") if (m := HEADING.match(line))]

    @property
    def anchors(self) -> set[str]:
        return set(anchors(self.headings))

    @property
    def inline_code(self) -> list[InlineCode]:
        return [InlineCode(" ".join(m.group(2).split()), _line_of(self.prose, m.start()))
                for m in CODE_SPAN.finditer(self.prose)]

    @property
    def links(self) -> list[Link]:
        # Code spans blanked out (newlines kept), so that `[a](b)` in code is no link.
        text = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), self.prose)
        found = [Link(m["target"], _line_of(text, m.start())) for m in INLINE_LINK.finditer(text)]
        found += [Link(m["target"], _line_of(text, m.start())) for m in REFERENCE_DEFINITION.finditer(text)]
        return sorted(found, key=lambda link: link.line)


def code_blocks(page: Page, *languages: str) -> Iterator[CodeBlock]:
    return (block for block in page.code_blocks if block.language in languages)
