"""Which code produced an output: the git commit of the working copy and the installed libraries' versions.

Floor 1 (plumbing): the report's provenance section shows them.
"""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "scipy", "h5py", "pillow", "matplotlib",
             "dvc", "dvclive")


def git_commit(cwd: Path) -> str:
    """"<sha> (+ uncommitted changes)" of the repository holding `cwd`, or why there is none."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "not a git repository, or no commit yet"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"git not available ({exc})"
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
