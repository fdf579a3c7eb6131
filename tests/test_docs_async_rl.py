"""docs/async-rl.md's Python examples (the verl- / AReaL-style loop) run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "async-rl.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_shows_a_runnable_loop() -> None:
    assert BLOCKS, "docs/async-rl.md should show a runnable example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_async_rl_python_block_runs(index: int, python_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", BLOCKS[index]],
        capture_output=True,
        text=True,
        env=python_env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
