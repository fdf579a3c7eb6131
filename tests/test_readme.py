"""The README's Python examples run as written."""

from __future__ import annotations

from doc_examples import ROOT, python_blocks, run_here


def test_readme_python_examples_run() -> None:
    blocks = python_blocks(ROOT / "README.md")
    assert blocks, "README.md should show a runnable example"
    for i, code in enumerate(blocks):
        run_here(code, f"README.md, python block {i}")
