"""The README's Python examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_examples_run(python_env) -> None:
    blocks = python_blocks(ROOT / "README.md")
    assert blocks, "README.md should show a runnable example"
    for code in blocks:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=python_env,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
