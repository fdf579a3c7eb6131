"""docs/async-rl.md's Python examples (the verl- / AReaL-style loop) run as written."""

from __future__ import annotations

import pytest
from doc_examples import ROOT, python_blocks, run_here

BLOCKS = python_blocks(ROOT / "docs" / "async-rl.md")


def test_the_doc_shows_a_runnable_loop() -> None:
    assert BLOCKS, "docs/async-rl.md should show a runnable example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_async_rl_python_block_runs(index: int) -> None:
    run_here(BLOCKS[index], f"docs/async-rl.md, python block {index}")
