"""kdscope.files: atomic writes leave the old file or the new one, never a torn or temporary one."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdscope.files import atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  # the write itself fails midway
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["index.json"]
