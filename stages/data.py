"""Data stage: materialise `data.source` into data/raw (a `<split>/<class>/<image>` or `<class>/<image>` tree).

The source is looked up in this order:
1. a dataset name in the mirror directories (`data.mirror`, then `$PIPELINE_MIRROR`): a folder
   `<name>/` or an archive `<name>.zip`, `.tar`, `.tar.gz`, `.tgz` (or `<name>` itself when it names an archive);
2. a local folder or archive;
3. an http(s) URL: `data.source` itself, or `data.url` when the name was found nowhere else.

Archives are checked before anything is extracted: members with absolute paths or `..`, links, devices and
archives that expand past `data.max_archive_mb` are refused. When the tree has a single top folder holding
the dataset (hymenoptera_data.zip -> hymenoptera_data/train/...), that folder becomes the root. Hidden
files (.DS_Store) and macOS `__MACOSX` folders are skipped; `data.max_per_class` keeps the first N files of
each folder in sorted order (smoke runs). The tree is built in a temporary folder beside the output and
renamed into place, so data/raw is whole or absent.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.parse
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stages.io import DownloadError, download_file, mirror_dirs, progress, setup_logging
from stages.params import DataParams, ParamError, load_params

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar")
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})
SKIPPED_DIRS = frozenset({"__MACOSX"})
MIB = 1 << 20


class DataSourceError(RuntimeError):
    """The dataset source could not be found, downloaded or unpacked."""


class UnsafeArchiveError(DataSourceError):
    """An archive member would escape the output folder, is a link or device, or the archive is too large."""


@dataclass(frozen=True)
class Source:
    """A located dataset: a local `path` that is a folder or an archive (`kind` 'folder' | 'archive' | 'url')."""
    kind: str
    location: str  # what the user would recognise: the mirror path, the local path or the URL
    path: Path | None = None  # None for a URL that still has to be downloaded


def archive_suffix(name: str) -> str | None:
    """The archive suffix of a file name ('.zip', '.tar', '.tar.gz', '.tgz'), or None."""
    lower = name.lower()
    return next((suffix for suffix in ARCHIVE_SUFFIXES if lower.endswith(suffix)), None)


def locate_source(params: DataParams, mirrors: list[Path]) -> Source:
    """Find `params.source` in the mirrors, on disk or as a URL; raise DataSourceError saying what was searched."""
    source = params.source
    if "://" in source:
        return Source("url", source)
    name = source.rstrip("/")
    if "/" not in name and os.sep not in name:  # a bare name: mirrors first
        for mirror in mirrors:
            for candidate in [mirror / name] + [mirror / f"{name}{s}" for s in ARCHIVE_SUFFIXES]:
                if candidate.is_dir():
                    return Source("folder", str(candidate), candidate)
                if candidate.is_file() and archive_suffix(candidate.name):
                    return Source("archive", str(candidate), candidate)
    local = Path(source).expanduser()
    if local.is_dir():
        return Source("folder", str(local), local)
    if local.is_file():
        if not archive_suffix(local.name):
            raise DataSourceError(f"data.source {source!r} is a file but not an archive; expected a folder "
                                  f"or a {', '.join(ARCHIVE_SUFFIXES)} file")
        return Source("archive", str(local), local)
    if params.url:
        _check_url_matches_name(params.url, name)
        return Source("url", params.url)
    raise DataSourceError(_not_found_message(source, mirrors, url=None))


def _check_url_matches_name(url: str, name: str) -> None:
    """Refuse `data.url` when it plainly names another dataset's archive (a source edited, the URL not)."""
    filename = PurePosixPath(urllib.parse.urlsplit(url).path).name
    suffix = archive_suffix(filename)
    stem = filename[: -len(suffix)] if suffix else None
    wanted = name[: -len(archive_suffix(name))] if archive_suffix(name) else name
    if stem is not None and stem != wanted:
        raise DataSourceError(
            f"data.source {name!r} was not found locally, and data.url {url!r} is the archive of another "
            f"dataset ({stem!r}). Set data.url to the URL of {name!r} (or null), or put {name}/ or "
            f"{name}.zip in a mirror directory (PIPELINE_MIRROR).")


def _not_found_message(source: str, mirrors: list[Path], *, url: str | None, reason: str = "") -> str:
    searched = ", ".join(str(m) for m in mirrors) if mirrors else "none (data.mirror is null and PIPELINE_MIRROR is unset)"
    tried = (f" Download of {url} failed: {reason.split(' If this machine is offline')[0].rstrip('.')}."
             if url else " data.url is null, so nothing was downloaded.")
    return (f"dataset {source!r} not found. Mirror directories searched: {searched}; looked for a folder "
            f"{source}/ or an archive {source}.zip/.tar/.tar.gz/.tgz, then a local path {source!r}.{tried} "
            f"To run offline, put the dataset folder or archive in a directory and set "
            f"PIPELINE_MIRROR=/that/directory (or data.mirror in params.yaml).")


def check_archive(archive: Path, *, max_bytes: int) -> int:
    """Validate every member of a zip or tar `archive` before extraction; return the total uncompressed bytes.

    Raises UnsafeArchiveError naming the archive and the member for an absolute path or `..`, a symlink,
    hardlink, device or fifo, and when the members add up to more than `max_bytes`.
    """
    total = 0
    for member, size, kind in _members(archive):
        parts = member.replace("\\", "/").split("/")
        if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":"):
            raise UnsafeArchiveError(f"{archive}: member {member!r} has an absolute path; refusing to extract")
        if ".." in parts:
            raise UnsafeArchiveError(f"{archive}: member {member!r} climbs out of the folder with '..' "
                                     f"(zip-slip); refusing to extract")
        if kind not in ("file", "dir"):
            raise UnsafeArchiveError(f"{archive}: member {member!r} is a {kind}; only regular files and "
                                     f"folders are extracted")
        total += size
        if total > max_bytes:
            raise UnsafeArchiveError(
                f"{archive}: members expand to more than {max_bytes / MIB:,.0f} MiB (data.max_archive_mb) by "
                f"member {member!r}; refusing to extract. Raise data.max_archive_mb if the archive is trusted.")
    return total


def _members(archive: Path) -> Iterator[tuple[str, int, str]]:
    """(name, uncompressed size, kind) of each member; kind is file, dir, symlink, hardlink or device."""
    if archive_suffix(archive.name) == ".zip":
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    mode = info.external_attr >> 16
                    if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                        kind = "symlink" if stat.S_ISLNK(mode) else "device or special file"
                    else:
                        kind = "dir" if info.is_dir() else "file"
                    yield info.filename, info.file_size, kind
        except zipfile.BadZipFile as exc:
            raise DataSourceError(f"{archive}: not a valid zip archive ({exc})") from None
        return
    try:
        with tarfile.open(archive, "r:*") as tf:
            for info in tf:
                kind = ("file" if info.isfile() else "dir" if info.isdir() else "symlink" if info.issym()
                        else "hardlink" if info.islnk() else "device or special file")
                yield info.name, info.size if info.isfile() else 0, kind
    except tarfile.TarError as exc:
        raise DataSourceError(f"{archive}: not a valid tar archive ({exc})") from None


def extract_archive(archive: Path, dest: Path, *, max_bytes: int) -> None:
    """Check `archive` (see check_archive) and extract its files and folders into `dest`."""
    check_archive(archive, max_bytes=max_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive_suffix(archive.name) == ".zip":
            with zipfile.ZipFile(archive) as zf:  # writes at most each member's declared size
                zf.extractall(dest)
        else:
            with tarfile.open(archive, "r:*") as tf:  # filter="data": a second guard (Python >= 3.11.4)
                tf.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DataSourceError(f"{archive}: extraction failed: {exc}") from None


def is_hidden(relative: PurePosixPath) -> bool:
    """True for hidden files and folders (.DS_Store, ._resource forks) and macOS __MACOSX folders."""
    return any(part.startswith(".") or part in SKIPPED_DIRS for part in relative.parts)


def dataset_root(tree: Path) -> Path:
    """Descend through single top folders that hold the dataset (hymenoptera_data/ -> its train/, val/)."""
    root = tree
    while True:
        visible = [p for p in root.iterdir() if not is_hidden(PurePosixPath(p.name))]
        if len(visible) != 1 or not visible[0].is_dir() or visible[0].name.lower() in SPLIT_NAMES:
            return root
        inner = visible[0]
        if not any(p.is_dir() and not is_hidden(PurePosixPath(p.name)) for p in inner.iterdir()):
            return root  # a single folder of images is a (one-class) dataset, not a wrapper
        root = inner


def select_files(root: Path, *, max_per_class: int | None) -> list[PurePosixPath]:
    """Relative paths of the visible files under `root`, sorted; at most `max_per_class` per folder."""
    files = sorted(PurePosixPath(p.relative_to(root).as_posix()) for p in root.rglob("*")
                   if p.is_file() and not p.is_symlink())
    files = [f for f in files if not is_hidden(f)]
    if max_per_class is None:
        return files
    kept: dict[PurePosixPath, int] = defaultdict(int)
    selected = []
    for f in files:
        if kept[f.parent] < max_per_class:
            kept[f.parent] += 1
            selected.append(f)
    return selected


def materialise(params: DataParams, out: Path, *, mirrors: list[Path]) -> dict[str, object]:
    """Build the dataset tree of `params.source` at `out` (replacing it); return what was done.

    I/O: reads the source, may download `data.url`, writes `out` via a temporary sibling folder.
    """
    source = locate_source(params, mirrors)
    max_bytes = params.max_archive_mb * MIB
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tree = build / "tree"
        if source.kind == "url":
            archive = _download(source.location, params, out, build, mirrors, max_bytes=max_bytes)
            extract_archive(archive, build / "unpacked", max_bytes=max_bytes)
            root, move = dataset_root(build / "unpacked"), True
        elif source.kind == "archive":
            assert source.path is not None
            extract_archive(source.path, build / "unpacked", max_bytes=max_bytes)
            root, move = dataset_root(build / "unpacked"), True
        else:
            assert source.path is not None
            root, move = dataset_root(source.path), False
        files = select_files(root, max_per_class=params.max_per_class)
        if not files:
            raise DataSourceError(f"{source.location}: no files found (hidden files are skipped)")
        n_bytes = 0
        for rel in progress(files, desc="copy" if not move else "move", unit="file"):
            target = tree / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if move:  # our own extraction: renaming within the same folder costs nothing
                os.replace(root / rel, target)
            else:  # plain copies: DVC caches data/raw, and hardlinks into a mirror could be edited through it
                shutil.copyfile(root / rel, target)
            n_bytes += target.stat().st_size
        _replace_dir(tree, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return {"source": source.location, "kind": source.kind, "root": str(root), "files": len(files),
            "bytes": n_bytes}


def _download(url: str, params: DataParams, out: Path, build: Path, mirrors: list[Path], *,
              max_bytes: int) -> Path:
    """Download `url` beside `out` (a dropped download resumes on the next run) and move it into `build`."""
    filename = PurePosixPath(urllib.parse.urlsplit(url).path).name or "dataset"
    if not archive_suffix(filename):
        raise DataSourceError(f"{url}: the URL must name a {', '.join(ARCHIVE_SUFFIXES)} archive "
                              f"(its file name decides how it is unpacked); got {filename!r}")
    folder = out.parent / f".{out.name}.download"
    dest = folder / filename
    try:
        download_file(url, dest, max_bytes=max_bytes)
    except DownloadError as exc:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty: a partial download stays for the next run to resume
        raise DataSourceError(_not_found_message(params.source, mirrors, url=url, reason=str(exc))) from None
    final = build / filename
    os.replace(dest, final)  # out of the resume folder: a finished download is not kept twice
    shutil.rmtree(folder, ignore_errors=True)
    return final


def _replace_dir(new: Path, dest: Path) -> None:
    """Put folder `new` at `dest`: rename the old one aside, rename the new one in, delete the old one."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", suffix=".tmp", dir=dest.parent))
        os.replace(dest, old / "previous")
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the dataset folder to write (data/raw)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    try:
        params = load_params(args.params).data
        done = materialise(params, args.out, mirrors=mirror_dirs(params.mirror))
    except (ParamError, DataSourceError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    logger.info("%s: %d files (%.1f MiB) from %s %s in %.1fs", args.out, done["files"],
                done["bytes"] / MIB, done["kind"], done["source"], time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
