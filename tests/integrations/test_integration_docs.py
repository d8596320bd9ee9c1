"""The ```python blocks of the integration pages run, in order, as one script per page.

Each page runs in a fresh namespace, in a temporary working directory (the TRL page writes its
``output_dir`` there). A page whose snippets stop running, or that loses its snippets, fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensordict import _utils_options

DOCS = Path(__file__).resolve().parents[2] / "docs" / "integrations"
PAGES = ["torchrl.md", "trl.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", PAGES)
def test_page_snippets_run(name, tmp_path, monkeypatch):
    page = DOCS / name
    blocks = python_blocks(page)
    assert len(blocks) >= 2, f"{page} should carry runnable ```python snippets"
    monkeypatch.chdir(tmp_path)
    # the torchrl page sets tensordict's list-to-stack mode globally (a module global and an
    # environment variable), as torchrl's LLM examples do: restore both afterwards
    monkeypatch.setattr(_utils_options, "_LIST_TO_STACK", _utils_options._LIST_TO_STACK)
    monkeypatch.setenv("LIST_TO_STACK", os.environ.get("LIST_TO_STACK", "None"))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)


def test_integrations_package_imports_no_trainer():
    """``import gspo_components.integrations`` must work without torchrl or TRL installed."""
    code = (
        "import sys, gspo_components.integrations\n"
        "loaded = [m for m in ('torchrl', 'trl', 'verl') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
