"""The checkpoint on disk: frame files, the manifest check, the atomic swap (no system)."""

from __future__ import annotations

import json

import pytest
import torch

from transferqueue.errors import CheckpointError
from transferqueue.ops.checkpoint_format import (
    Layout,
    check_manifest,
    manifest_of,
    read_frames,
    write_frames,
    write_manifest,
)


def test_frames_round_trip_every_column_kind(tmp_path) -> None:
    value = {
        "rows": torch.arange(3),
        "dense": torch.randn(3, 5),
        "jagged": torch.nested.nested_tensor_from_jagged(
            torch.arange(6), torch.tensor([0, 1, 3, 6])
        ),
        "odd": [torch.ones(2, 2), torch.ones(3)],
        "text": ["a", "é", None],
        "empty": torch.zeros(0, 4),
    }
    size = write_frames(tmp_path / "f.tqc", value)
    assert size == (tmp_path / "f.tqc").stat().st_size
    got = read_frames(tmp_path / "f.tqc", size)
    assert torch.equal(got["dense"], value["dense"]) and got["dense"].data_ptr() % 64 == 0
    assert [t.tolist() for t in got["jagged"].unbind()] == [[0], [1, 2], [3, 4, 5]]
    assert [t.shape for t in got["odd"]] == [(2, 2), (3,)]
    assert got["text"] == ["a", "é", None] and got["empty"].shape == (0, 4)


def test_bad_frame_files_raise_checkpoint_errors(tmp_path) -> None:
    path = tmp_path / "f.tqc"
    size = write_frames(path, {"x": torch.ones(100)})
    with pytest.raises(CheckpointError, match="manifest says"):
        read_frames(path, size + 1)
    path.write_bytes(path.read_bytes()[: size - 64])
    with pytest.raises(CheckpointError, match="truncated"):
        read_frames(path)
    path.write_bytes(b"x" * size)
    with pytest.raises(CheckpointError, match="not a transferqueue frame file"):
        read_frames(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_frames(tmp_path / "missing.tqc")


def test_manifest_checks(tmp_path) -> None:
    manifest = manifest_of({"step": 1}, [], {"state.tqc": 10}, {}, 0.0)
    write_manifest(tmp_path, manifest)
    assert check_manifest(tmp_path)["metadata"] == {"step": 1}
    for broken, message in (
        ({**manifest, "version": 2}, "version 2"),
        ({**manifest, "format": "other"}, "not a transferqueue"),
        ({**manifest, "files": {}}, "no file list"),
        ({**manifest, "files": {"state.tqc": 1, "../x": 1}}, "file '../x'"),
        ({**manifest, "chunks": [{"file": "data/9.tqc"}]}, "names no file"),
    ):
        (tmp_path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=message):
            check_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt"):
        check_manifest(tmp_path)


def test_the_pointer_names_the_live_snapshot_and_leftovers_go(tmp_path) -> None:
    layout = Layout(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        layout.current()
    with layout.locked():
        tmp, final = layout.new_snapshot()
        with pytest.raises(CheckpointError, match="in progress"), Layout(layout.path).locked():
            pass
        layout.seal(tmp)
        layout.rename(tmp, final)
        layout.point_to(final)
    assert layout.current() == final
    with layout.locked():
        tmp2, final2 = layout.new_snapshot()  # a save that crashed before its rename
    assert final2.name > final.name and layout.current() == final
    with layout.locked():
        tmp3, final3 = layout.new_snapshot()
        assert not tmp2.exists()  # removed by the next save
        layout.rename(tmp3, final3)  # crashed after the rename: CURRENT still says final
        assert layout.current() == final
        layout.point_to(final3)
    assert layout.current() == final3 and not final.exists()
    write_manifest(final3, manifest_of(None, [], {"state.tqc": 1}, {}, 0.0))
    assert Layout(final3).current() == final3  # a snapshot directory itself loads too
    (layout.path / "CURRENT").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a snapshot"):
        layout.current()
