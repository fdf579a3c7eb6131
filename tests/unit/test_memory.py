"""Memory tuning of actor processes (checked in a child, so this process keeps its settings)."""

from __future__ import annotations

import subprocess
import sys

CODE = "from transferqueue.memory import tune_malloc_for_large_buffers as t; print(t())"


def test_malloc_tuning_applies_on_glibc(python_env) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=python_env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    expected = sys.platform.startswith("linux")
    assert out.stdout.strip() == str(expected)
