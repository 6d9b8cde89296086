"""Every ```python block of README.md (and ARCHITECTURE.md when there is one) runs as written.

Each block runs in a fresh namespace, compiled under the document's name with the block's own line numbers, so a
failure names the file and the line. Blocks are written to run on the CPU test machine (small tensors, GPU lines
behind `if torch.cuda.is_available():`); a block that cannot is marked in the document itself with a line
`# docs-test: skip (reason)` — explicit and meant to stay rare.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [p for p in (ROOT / "README.md", ROOT / "ARCHITECTURE.md") if p.exists()]
SKIP = re.compile(r"^\s*#\s*docs-test:\s*skip\b(.*)$", re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line of the first code line, code)`` for every ```python fence of a Markdown file."""
    blocks, lines, start, code = [], path.read_text(encoding="utf-8").splitlines(), None, []
    for i, line in enumerate(lines, 1):
        fence = line.strip()
        if start is None and re.fullmatch(r"```\s*python\s*", fence):
            start, code = i + 1, []
        elif start is not None and fence == "```":
            blocks.append((start, "\n".join(code) + "\n"))
            start = None
        elif start is not None:
            code.append(line)
    assert start is None, f"{path.name}: the ```python block opened at line {start - 1} is never closed"
    return blocks


CASES = [(doc, line, code) for doc in DOCS for line, code in python_blocks(doc)]


def test_readme_has_python_blocks():
    assert any(doc.name == "README.md" for doc, _, _ in CASES)


def test_block_parser_names_lines(tmp_path):
    md = tmp_path / "X.md"
    md.write_text("text\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n")
    assert python_blocks(md) == [(3, "x = 1\n"), (10, "y = 2\nz = 3\n")]


@pytest.mark.parametrize("doc, line, code", CASES, ids=[f"{d.name}:{n}" for d, n, _ in CASES])
def test_python_block_runs(doc, line, code):
    skip = SKIP.search(code)
    if skip:
        pytest.skip(f"{doc.name}:{line}: marked docs-test: skip{skip.group(1)}")
    source = "\n" * (line - 1) + code  # tracebacks then show the document's own line numbers
    try:
        exec(compile(source, str(doc), "exec"), {"__name__": f"docs_{doc.stem}_{line}"})
    except Exception:
        pytest.fail(f"the ```python block at {doc.name}:{line} failed:\n{traceback.format_exc()}", pytrace=False)
