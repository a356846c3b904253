"""stages.data: mirror lookup, local folders and archives, URL download, archive safety, smoke subsets."""
from __future__ import annotations

import functools
import http.server
import io
import logging
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages import data
from stages.data import DataSourceError, UnsafeArchiveError, check_archive, locate_source, materialise
from stages.params import DataParams

# The toy dataset: <split>/<class>/<file> plus junk that must not reach data/raw.
TREE = {
    "train/ants/a1.jpg": b"ant one",
    "train/ants/a2.jpg": b"ant two",
    "train/ants/a3 space é.jpg": b"ant three",
    "train/bees/b1.jpg": b"bee one",
    "val/ants/v1.jpg": b"val ant",
    "val/bees/v2.jpg": b"val bee",
    "train/ants/.DS_Store": b"finder junk",
    ".hidden/x.jpg": b"hidden folder",
}
VISIBLE = {k: v for k, v in TREE.items() if not any(p.startswith(".") for p in k.split("/"))}


def params(source: str, **kwargs) -> DataParams:
    return DataParams(**{"source": source, "url": None, "mirror": None, "max_per_class": None,
                         "max_archive_mb": 100, **kwargs})


def write_tree(root: Path, tree: dict[str, bytes]) -> Path:
    for rel, content in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_zip(path: Path, tree: dict[str, bytes], *, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        if prefix:
            zf.writestr(prefix, b"")  # a folder entry, as zip tools write them
        for rel, content in tree.items():
            zf.writestr(prefix + rel, content)
    return path


def make_tar(path: Path, tree: dict[str, bytes], *, prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for rel, content in tree.items():
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return path


@pytest.mark.parametrize("form", ["folder", "zip", "tar.gz", "tgz", "tar"])
def test_name_is_found_in_the_mirror_as_folder_or_archive(tmp_path: Path, form: str) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    if form == "folder":
        write_tree(mirror / "toy", TREE)
    elif form == "zip":
        make_zip(mirror / "toy.zip", TREE, prefix="toy/")  # a single top folder, like hymenoptera_data.zip
    else:
        with tarfile.open(mirror / f"toy.{form}", "w:gz" if "gz" in form else "w") as tf:
            for rel, content in TREE.items():
                info = tarfile.TarInfo("toy/" + rel)
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    out = tmp_path / "data" / "raw"
    done = materialise(params("toy"), out, mirrors=[tmp_path / "empty", mirror])
    assert read_tree(out) == VISIBLE
    assert done["files"] == len(VISIBLE) and done["kind"] == ("folder" if form == "folder" else "archive")
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]  # no temporary folders left


def test_first_mirror_wins_and_local_paths_work(tmp_path: Path) -> None:
    first, second = tmp_path / "m1", tmp_path / "m2"
    write_tree(first / "toy", {"a/x.jpg": b"first", "b/y.jpg": b"1"})
    write_tree(second / "toy", {"a/x.jpg": b"second", "b/y.jpg": b"2"})
    assert locate_source(params("toy"), [first, second]).path == first / "toy"
    assert locate_source(params(str(second / "toy")), []).kind == "folder"
    make_zip(tmp_path / "local.zip", {"a/x.jpg": b"z", "b/y.jpg": b"z"})
    out = tmp_path / "raw"
    materialise(params(str(tmp_path / "local.zip")), out, mirrors=[])
    assert read_tree(out) == {"a/x.jpg": b"z", "b/y.jpg": b"z"}


def test_rerun_replaces_the_output_and_max_per_class_keeps_first_sorted(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {f"{c}/{i:02d}.jpg": c.encode() for c in ("a", "b") for i in (3, 1, 2)})
    out = write_tree(tmp_path / "raw", {"stale/old.jpg": b"old"})
    materialise(params(str(src), max_per_class=2), out, mirrors=[])
    assert sorted(read_tree(out)) == ["a/01.jpg", "a/02.jpg", "b/01.jpg", "b/02.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "src"]


def test_single_split_folder_is_not_unwrapped(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"train/a/x.jpg": b"1", "train/b/y.jpg": b"2"})
    out = tmp_path / "raw"
    materialise(params(str(src)), out, mirrors=[])
    assert sorted(read_tree(out)) == ["train/a/x.jpg", "train/b/y.jpg"]


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A one-folder HTTP server on 127.0.0.1; yields (served folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_is_used_when_the_name_is_in_no_mirror(tmp_path: Path, http_root) -> None:
    served, base = http_root
    make_zip(served / "toy.zip", TREE, prefix="toy/")
    out = tmp_path / "data" / "raw"
    done = materialise(params("toy", url=f"{base}/toy.zip"), out, mirrors=[tmp_path / "nothing"])
    assert done["kind"] == "url" and read_tree(out) == VISIBLE
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]  # download folder cleaned up


def test_offline_error_names_mirrors_name_url_and_the_fix(tmp_path: Path, http_root) -> None:
    _, base = http_root
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with pytest.raises(DataSourceError, match="HTTP 404") as err:
        materialise(params("toy", url=f"{base}/toy.zip"), tmp_path / "raw", mirrors=[mirror])
    message = str(err.value)
    assert str(mirror) in message and "'toy'" in message and f"{base}/toy.zip" in message
    assert "PIPELINE_MIRROR=" in message
    assert not (tmp_path / "raw").exists()
    with pytest.raises(DataSourceError, match="PIPELINE_MIRROR is unset"):
        locate_source(params("toy"), [])


def test_url_of_another_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="archive of another dataset \\('hymenoptera_data'\\)"):
        locate_source(params("flowers", url="https://example.org/x/hymenoptera_data.zip"), [tmp_path])


def test_main_reports_a_missing_source_and_returns_1(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.delenv("PIPELINE_MIRROR", raising=False)
    (tmp_path / "params.yaml").write_text("backbones: [efficientnet_lite0]\ndata:\n  source: nowhere\n"
                                          "  url: null\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert data.main(["--out", "data/raw"]) == 1
    assert "dataset 'nowhere' not found" in caplog.text


# ------------------------------------------------------------------------------------ archive safety
def zip_with(path: Path, name: str, *, mode: int | None = None, content: bytes = b"x") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok/a.jpg", b"fine")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system = 3
            info.external_attr = mode << 16
        zf.writestr(info, content)
    return path


@pytest.mark.parametrize("name, mode, match", [
    ("../evil.jpg", None, r"member '\.\./evil\.jpg' climbs out of the folder with '\.\.' \(zip-slip\)"),
    ("ok/../../evil.jpg", None, "zip-slip"),
    ("/abs/evil.jpg", None, "member '/abs/evil.jpg' has an absolute path"),
    ("C:/evil.jpg", None, "absolute path"),
    ("ok/link.jpg", stat.S_IFLNK | 0o777, "member 'ok/link.jpg' is a symlink"),
    ("ok/fifo", stat.S_IFIFO | 0o644, "is a device or special file"),
])
def test_unsafe_zip_members_are_refused(tmp_path: Path, name: str, mode, match: str) -> None:
    archive = zip_with(tmp_path / "bad.zip", name, mode=mode)
    out = tmp_path / "raw"
    with pytest.raises(UnsafeArchiveError, match=match) as err:
        materialise(params(str(archive)), out, mirrors=[])
    assert str(archive) in str(err.value)
    assert not out.exists() and not (tmp_path / "evil.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


@pytest.mark.parametrize("kind, match", [
    (tarfile.SYMTYPE, "member 'ok/link.jpg' is a symlink"),
    (tarfile.LNKTYPE, "member 'ok/link.jpg' is a hardlink"),
    (tarfile.CHRTYPE, "is a device or special file"),
])
def test_unsafe_tar_members_are_refused(tmp_path: Path, kind: bytes, match: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("ok/a.jpg"), io.BytesIO(b""))
        info = tarfile.TarInfo("ok/link.jpg")
        info.type = kind
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(UnsafeArchiveError, match=match):
        check_archive(archive, max_bytes=1 << 20)


def test_tar_absolute_and_dotdot_members_are_refused(tmp_path: Path) -> None:
    for name, match in (("/etc/evil.jpg", "absolute path"), ("a/../../evil.jpg", "zip-slip")):
        archive = make_tar(tmp_path / "bad.tgz", {name: b"x"})
        with pytest.raises(UnsafeArchiveError, match=match):
            check_archive(archive, max_bytes=1 << 20)


def test_archive_bomb_limit(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/small.jpg", b"x" * 1000)
        zf.writestr("a/zeros.jpg", bytes(3 << 20))  # 3 MiB of zeros, a few KiB compressed
    assert archive.stat().st_size < 50_000
    with pytest.raises(UnsafeArchiveError, match=r"bomb\.zip: members expand to more than 1 MiB "
                                                 r"\(data\.max_archive_mb\) by member 'a/zeros\.jpg'"):
        materialise(params(str(archive), max_archive_mb=1), tmp_path / "raw", mirrors=[])
    assert not (tmp_path / "raw").exists()
    assert check_archive(archive, max_bytes=4 << 20) == 1000 + (3 << 20)


def test_corrupt_archive_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    with pytest.raises(DataSourceError, match="junk.zip: not a valid zip archive"):
        materialise(params(str(tmp_path / "junk.zip")), tmp_path / "raw", mirrors=[])
