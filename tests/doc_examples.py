"""The ```python blocks of a Markdown file, and running a block or a tutorial as a user would.

A tutorial or a doc block on the in-process transport runs in the test's own interpreter
(:func:`run_here`): it is the same code as a user's script, and torch, tensordict and the
package are imported already, which saves each one an interpreter start (~3 s of CPU on a
2-core machine). What needs a process of its own -- the ``demo`` command's stderr, a script
on zmq or ray that spawns producers -- runs in a fresh interpreter (:func:`run_block`).
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_block(code: str, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter from the checkout's root."""
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def run_here(code: str, filename: str, argv: Sequence[str] = ()) -> str:
    """Run ``code`` as the ``__main__`` script ``filename`` (with ``argv``) in this
    interpreter and return what it printed. Warnings are errors, as with ``python -W
    error``. The script must leave no system running: one it left is closed, and the
    run fails."""
    import transferqueue as tq

    assert not _running(), "a system was running before the script started"
    out, saved_argv = io.StringIO(), sys.argv
    sys.argv = [filename, *argv]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("error")
            namespace = {"__name__": "__main__", "__file__": filename}
            exec(compile(code, filename, "exec"), namespace)
    finally:
        sys.argv = saved_argv
        left_running = _running()
        tq.close()
    assert not left_running, f"{filename} left its system running (no tq.close())"
    return out.getvalue()


def _running() -> bool:
    import transferqueue as tq

    try:
        tq.get_client()
    except tq.NotInitializedError:
        return False
    return True
