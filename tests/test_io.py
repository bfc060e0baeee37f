"""Atomic writers (bundle/io.py): the final name holds either the old file or the whole new one, never a part."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from bundle.io import append_jsonl, atomic_path, atomic_torch_save, atomic_write, atomic_write_json


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_write_that_fails_half_way_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def dies(tmp):
        Path(tmp).write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, dies)
    assert target.read_text() == "old" and _names(tmp_path) == ["results.json"]


def test_the_new_file_appears_whole_in_a_new_folder_with_ordinary_permissions(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    with atomic_path(target) as tmp:
        assert Path(tmp).parent == target.parent and Path(tmp).name.startswith(".out.bin.")
        assert not target.exists()  # nothing under the final name before the block ends
        Path(tmp).write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and _names(target.parent) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_json_and_torch_writers_round_trip(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"psnr": 30.1, "names": ["a"]})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"psnr": 30.1, "names": ["a"]} and text.startswith('{\n  "psnr"')  # indent 2
    atomic_write_json(tmp_path / "c.json", [1, 2], indent=None)
    assert (tmp_path / "c.json").read_text() == "[1, 2]"
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    atomic_torch_save(state, tmp_path / "w.pt")
    assert torch.equal(torch.load(tmp_path / "w.pt")["w"], state["w"])
    with pytest.raises(TypeError):  # not JSON: refused before anything is written
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert _names(tmp_path) == ["c.json", "m.json", "w.pt"]


def test_append_jsonl_adds_whole_lines_and_mends_a_missing_newline(tmp_path):
    log = tmp_path / "results.jsonl"
    append_jsonl(log, {"a": 1})
    append_jsonl(log, {"b": 2})
    assert log.read_text() == '{"a": 1}\n{"b": 2}\n'
    log.write_text('{"a": 1}')  # a file written by another tool without the last newline
    append_jsonl(log, {"b": 2})
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"a": 1}, {"b": 2}]


def test_append_jsonl_killed_mid_write_keeps_every_earlier_line(tmp_path, monkeypatch):
    log = tmp_path / "results.jsonl"
    append_jsonl(log, {"a": 1})
    real = Path.write_text

    def dies(self, text, *args, **kwargs):
        real(self, text[:5], *args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Path, "write_text", dies)
    with pytest.raises(KeyboardInterrupt):
        append_jsonl(log, {"b": 2})
    monkeypatch.undo()
    assert log.read_text() == '{"a": 1}\n' and _names(tmp_path) == ["results.jsonl"]
