"""Shared plumbing: atomic writes, hashing, downloads with resume, JSON/CSV, progress bars, logging."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import io
import json
import logging
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


class DownloadError(RuntimeError):
    """A download failed, was refused, or did not match its expected sha256."""


class HashMismatch(DownloadError):
    """A file's sha256 differs from the expected one."""


def remove_stale_temporaries(dest: str | Path) -> list[Path]:
    """Remove the temporary files a killed `atomic_path` write of `dest` left beside it (`.<name>.*.tmp`); a
    kill -9 runs no cleanup, and in a persistent folder (fine-tune checkpoints) they would stay. Returns them."""
    dest = Path(dest)
    stale = sorted(dest.parent.glob(f".{dest.name}.*.tmp")) if dest.parent.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it replaces `dest`, on error it is removed.

    An interrupted run never leaves a half-written file under the final name.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    except OSError as exc:
        raise _cannot_write(dest, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        # A failed write of the temporary file (disk full, read-only, no permission) names `dest`; errors
        # about other files (an input read inside the block) and our own exceptions pass through unchanged.
        if (isinstance(exc, OSError) and not isinstance(exc, OutputError)
                and (exc.filename is None or str(exc.filename) in (tmp, str(dest)))):
            raise _cannot_write(dest, exc) from exc
        raise


class OutputError(OSError):
    """An output could not be written (disk full, read-only or not permitted); the previous file is unchanged."""


def _cannot_write(dest: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (quota exceeded)",
            errno.EROFS: f"{dest.parent} is on a read-only file system",
            errno.EACCES: f"make {dest.parent} writable", errno.EPERM: f"make {dest.parent} writable"}.get(
        exc.errno, "check the disk and the folder's permissions")
    message = (f"cannot write {dest}: {reason}; any previous {dest.name} is unchanged "
               f"(the new content went to a temporary file, now removed). Fix: {hint}, then re-run.")
    return OutputError(exc.errno, message) if exc.errno is not None else OutputError(message)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write `text` (UTF-8) to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON with a trailing newline."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def sha256_file(path: str | Path) -> str:
    """Full sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar, disabled when stderr is not a terminal or when `CI` is set."""
    disable = bool(os.environ.get("CI")) or not sys.stderr.isatty()
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)


def setup_logging() -> None:
    level = os.environ.get("PIPELINE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http:// or https:// URLs."""

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: D102 (urllib API)
        # urllib itself rejects file:// targets with an HTTPError (which would be retried as if the
        # server failed); check first so that every refused scheme gets the same clear DownloadError.
        location = headers.get("location") or headers.get("uri")
        if location:
            newurl = urllib.parse.urljoin(req.full_url, location)
            if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
                fp.close()
                raise DownloadError(f"refused redirect from {req.full_url} to {newurl}: "
                                    f"only http:// and https:// are allowed")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib API)
        scheme = urllib.parse.urlsplit(newurl).scheme
        if scheme not in ("http", "https"):
            raise DownloadError(f"refused redirect from {req.full_url} to {newurl}: "
                                f"only http:// and https:// are allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_SameSchemeRedirects)


def check_url(url: str) -> None:
    """Raise DownloadError unless `url` is http:// or https://."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise DownloadError(f"refused URL {url!r}: only http:// and https:// sources are allowed")


def download_file(url: str, dest: str | Path, *, sha256: str | None = None,
                  sha256_prefix: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                  backoff_s: float = 1.0, max_bytes: int | None = None) -> str:
    """Stream `url` to `dest` via `<dest>.partial`, resuming with HTTP Range after a dropped connection.

    The sha256 is computed while streaming (and over any bytes already in the `.partial` file). When
    `sha256` (full) or `sha256_prefix` is given and differs, the partial file is deleted and
    HashMismatch names both hashes and the URL. Only then is the file renamed to `dest`.
    Returns the full sha256 of the file.
    """
    check_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff_s * 2 ** (attempt - 1)
            logger.warning("retrying %s in %.1fs (attempt %d/%d): %s", url, delay, attempt + 1,
                           retries + 1, last_error)
            time.sleep(delay)
        try:
            _fetch_into(url, partial, timeout_s=timeout_s, max_bytes=max_bytes)
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # Range beyond the end: the partial file is complete or stale
                last_error = exc
                partial.unlink(missing_ok=True)
                continue
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                partial.unlink(missing_ok=True)
                raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
            last_error = exc
        except DownloadError:
            partial.unlink(missing_ok=True)
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as exc:
            last_error = exc  # connection refused/reset/cut short (IncompleteRead): retry, resuming
    else:
        reason = getattr(last_error, "reason", last_error)
        raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {reason}. "
                            f"If this machine is offline, put the file in a mirror directory "
                            f"(PIPELINE_MIRROR) instead.")
    actual = sha256_file(partial)
    expected = sha256 or sha256_prefix
    if expected and not actual.startswith(expected.lower()):
        partial.unlink(missing_ok=True)
        raise HashMismatch(f"sha256 mismatch for {url}: expected {expected}, got {actual}; "
                           f"the downloaded file was deleted")
    os.replace(partial, dest)
    return actual


def _fetch_into(url: str, partial: Path, *, timeout_s: float, max_bytes: int | None) -> None:
    """Append the rest of `url` to `partial`, using a Range request when bytes are already there."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "transfer-pipeline/0.1"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with _opener.open(request, timeout=timeout_s) as response:
        status = getattr(response, "status", 200)
        if have and status != 206:  # server ignored Range: start over
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        if max_bytes is not None and total is not None and total > max_bytes:
            raise DownloadError(f"refused {url}: {total} bytes is over the limit of {max_bytes}")
        mode = "ab" if have else "wb"
        with open(partial, mode) as fh, progress(total=total, initial=have, unit="B",
                                                  unit_scale=True, desc=Path(partial).name) as bar:
            written = have
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
                if max_bytes is not None and written > max_bytes:
                    raise DownloadError(f"refused {url}: more than {max_bytes} bytes")
        if total is not None and written < total:
            raise urllib.error.URLError(f"connection closed after {written} of {total} bytes")


def mirror_dirs(params_mirror: str | None) -> list[Path]:
    """Mirror directories to search: params key first, then $PIPELINE_MIRROR (os.pathsep-separated)."""
    dirs = [params_mirror] if params_mirror else []
    dirs += [d for d in os.environ.get("PIPELINE_MIRROR", "").split(os.pathsep) if d]
    return [Path(d).expanduser() for d in dirs]


@contextlib.contextmanager
def quiet_onnx_export() -> Iterator[None]:
    """torch.onnx.export's per-pass notes (INFO logs of onnx_ir/onnxscript, progress lines on stdout, warnings)
    silenced for the block; the log levels are restored after it."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [each.level for each in loggers]
    try:
        for each in loggers:
            each.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)
