"""stages.io: atomic writes and the clean-up of what a killed atomic write leaves."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.io import atomic_path, remove_stale_temporaries


def test_atomic_path_replaces_on_success_and_leaves_nothing_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "last.pt"
    with atomic_path(dest) as tmp:
        assert tmp.name.startswith(".last.pt.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"one")
    assert dest.read_bytes() == b"one"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"two")
            raise RuntimeError("boom")
    assert dest.read_bytes() == b"one" and sorted(p.name for p in dest.parent.iterdir()) == ["last.pt"]


def test_stale_temporaries_of_a_killed_write_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """kill -9 during atomic_path runs no cleanup: the next run removes `.<name>.*.tmp` of that output only."""
    dest = tmp_path / "last.pt"
    dest.write_bytes(b"kept")
    stale = [tmp_path / ".last.pt.ab12cd.tmp", tmp_path / ".last.pt.zz99.tmp"]
    others = [tmp_path / ".best.pt.ab12cd.tmp", tmp_path / "last.pt.tmp", tmp_path / ".last.pt.partial"]
    for path in stale + others:
        path.write_bytes(b"x")
    assert remove_stale_temporaries(dest) == sorted(stale)
    assert dest.read_bytes() == b"kept" and all(p.exists() for p in others) and not any(p.exists() for p in stale)
    assert remove_stale_temporaries(tmp_path / "missing" / "last.pt") == []
