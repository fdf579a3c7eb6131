"""The README's Python examples run as written."""

from __future__ import annotations

from doc_examples import ROOT, python_blocks, run_block


def test_readme_python_examples_run(python_env) -> None:
    blocks = python_blocks(ROOT / "README.md")
    assert blocks, "README.md should show a runnable example"
    for code in blocks:
        proc = run_block(code, python_env)
        assert proc.returncode == 0, proc.stderr
