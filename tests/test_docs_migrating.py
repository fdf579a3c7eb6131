"""docs/migrating.md's Python examples (upstream calls on our client) run as written."""

from __future__ import annotations

import pytest
from doc_examples import ROOT, python_blocks, run_here

BLOCKS = python_blocks(ROOT / "docs" / "migrating.md")


def test_the_doc_shows_runnable_examples() -> None:
    assert BLOCKS, "docs/migrating.md should show runnable examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_migrating_python_block_runs(index: int) -> None:
    run_here(BLOCKS[index], f"docs/migrating.md, python block {index}")
