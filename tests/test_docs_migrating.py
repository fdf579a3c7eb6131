"""docs/migrating.md's Python examples (upstream calls on our client) run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "migrating.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_shows_runnable_examples() -> None:
    assert BLOCKS, "docs/migrating.md should show runnable examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_migrating_python_block_runs(index: int, python_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", BLOCKS[index]],
        capture_output=True,
        text=True,
        env=python_env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
