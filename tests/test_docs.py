"""The documentation runs as written.

Every ```python block in README.md and docs/*.md is executed: each file's blocks in order, in one
namespace (a later block may use names an earlier one defined), so an example that drifts from
the code fails here. Tracebacks point at the Markdown file and its line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The ```python blocks of ``path``, each with the line number of its first code line."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_docs_exist() -> None:
    assert (ROOT / "README.md").is_file()
    assert len(DOC_FILES) > 1, "docs/*.md is missing"
    assert python_blocks(ROOT / "README.md"), "README.md has no python example"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__main__"}
    for line, code in python_blocks(path):
        # Pad with blank lines so that tracebacks report the line in the Markdown file.
        compiled = compile("\n" * (line - 1) + code, str(path), "exec")
        try:
            exec(compiled, namespace)
        except Exception as exc:
            exc.add_note(f"in the ```python block of {path.relative_to(ROOT)} starting at line {line}")
            raise
