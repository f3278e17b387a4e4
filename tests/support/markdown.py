"""Reading the user documentation (README.md and docs/*.md) as data: its tables, fenced blocks and curl lines."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def documentation_files() -> list[Path]:
    """README.md and every page of docs/."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class Table:
    """A markdown table: its file, the line of its header, its column names and its rows (cells stripped)."""

    file: Path
    line: int
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]

    @property
    def where(self) -> str:
        return f"{relative(self.file)}:{self.line}"


def _cells(line: str) -> tuple[str, ...]:
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


def tables(path: Path) -> list[Table]:
    found: list[Table] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines) - 1:
        if lines[index].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[index + 1].strip()):
            header, rows, start = _cells(lines[index]), [], index + 1
            index += 2
            while index < len(lines) and lines[index].startswith("|"):
                rows.append(_cells(lines[index]))
                index += 1
            found.append(Table(path, start, header, rows))
        else:
            index += 1
    return found


def table(path: Path, *header: str) -> Table:
    """The one table of ``path`` whose columns are ``header``."""
    matching = [found for found in tables(path) if found.header == header]
    assert len(matching) == 1, f"{relative(path)}: expected one table with columns {header}, found {len(matching)}"
    return matching[0]


@dataclass(frozen=True)
class Block:
    file: Path
    line: int
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{relative(self.file)}:{self.line}"


def blocks(path: Path, language: str) -> list[Block]:
    """The fenced blocks of ``language``, indented ones (inside a list item) included, dedented."""
    text = path.read_text(encoding="utf-8")
    pattern = rf"^([ \t]*)```{re.escape(language)}\n(.*?)^\1```"
    return [Block(path, text[:match.start()].count("\n") + 1, language, textwrap.dedent(match.group(2)))
            for match in re.finditer(pattern, text, flags=re.MULTILINE | re.DOTALL)]


@dataclass(frozen=True)
class CurlLine:
    """One shell command starting with ``curl`` (continuation lines joined), and the status its comment promises
    (``# → 202``)."""

    block: Block
    command: str
    expected_status: int | None


def curl_lines(path: Path) -> Iterator[CurlLine]:
    for block in blocks(path, "sh"):
        joined = re.sub(r"\s*\\\n\s*", " ", block.text)
        for line in joined.splitlines():
            if not line.startswith("curl "):
                continue
            command, _, comment = line.partition("    # ")
            status = re.match(r"→ (\d{3})", comment.strip())
            yield CurlLine(block, command.strip(), int(status.group(1)) if status else None)


def unquote(cell: str) -> str:
    """A table cell without the backticks around it."""
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)
