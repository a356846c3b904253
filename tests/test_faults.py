"""Faults and hostile input across the whole pipeline (issue 10): interruption, full disk, read-only outputs,
hostile archives/URLs/params, untrusted files, concurrent runs, and the bad-image corpus end to end.

One module-scoped `dvc repro` (the baseline) runs the whole pipeline, fine-tune included, on the bad-image corpus
of tests/test_prepare.py (21 valid tiny images, 6 bad files) with efficientnet_lite0. Each fault test copies that
repository, injects its fault (SIGKILL of the process group at a seeded random point, a full tmpfs, a read-only
bind mount, a tampered file, hostile params) and compares the outcome with the baseline. Single-stage faults
(hash mismatch, resume of one download, zip-slip in `check_archive`, ...) are covered by the stage test files.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.server
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import psutil
import pytest
import torch
import yaml

from stages import data as data_stage
from stages import extract as ex
from stages.engines import Candidate, choose
from stages.features_write import work_path_for
from stages import hardware
from stages import head as head_stage
from stages import predict as predict_stage
from stages import prepare as prepare_stage
from stages.backbones import get_backbone
from stages.images import read_manifest
from stages.params import load_params
from conftest import make_pipeline_copy, run, stages_run
from test_prepare import QUARANTINED, make_bad_corpus

pytestmark = pytest.mark.faults

LITE0 = "efficientnet_lite0"
SEED = 10
# Small and deterministic: float32 (no measured precision choice), no compile, 1 image per extract batch (21
# resumable records), a 2-epoch fine-tune on what the corpus gives.
PARAMS = {
    "backbones": [LITE0], "data.url": None, "prepare.num_workers": 0,
    "extract.precision": "float32", "extract.compile": "off", "extract.batch_size": 1, "extract.num_workers": 0,
    "head.C": [1.0],
    "finetune.backbones": [LITE0], "finetune.epochs": 2, "finetune.batch_size": 8,
    "finetune.precision": "float32", "finetune.num_workers": 0,
}
PREPARE_OUTPUTS = ("data/prepared/manifest.csv", "data/prepared/classes.json", "data/prepared/stats.json",
                   "reports/prepare/quarantine.json", "reports/prepare/summary.json")
FEATURES = f"features/{LITE0}.h5"
TEMP_PATTERNS = ("*.partial", "*.tmp", "*.work", ".*.work", ".*.tmp", ".*.download")  # files and folders


@dataclasses.dataclass
class Repo:
    root: Path
    env: dict[str, str]
    output: str = ""
    valid: dict[str, str] = dataclasses.field(default_factory=dict)

    def path(self, rel: str) -> Path:
        return self.root / rel


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """The whole pipeline (data .. report, fine-tune included) run once, uninterrupted, on the bad-image corpus."""
    base = tmp_path_factory.mktemp("faults")
    valid = make_bad_corpus(base / "corpus")
    root = base / "repo"
    root.mkdir()
    env = make_pipeline_copy(root, params_update={**PARAMS, "data.source": str(base / "corpus")})
    output = run(["dvc", "repro"], root, env)
    return Repo(root, env, output, valid)


def copy_repo(repo: Repo, dest: Path) -> Repo:
    shutil.copytree(repo.root, dest, symlinks=True)
    return Repo(dest, repo.env, valid=repo.valid)


def edit_params(repo: Repo, **updates) -> None:
    """Set params.yaml keys, nested with `__` (`head__C=[0.5]` sets head.C)."""
    params = yaml.safe_load(repo.path("params.yaml").read_text())
    for dotted, value in updates.items():
        node = params
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    repo.path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def leftovers(root: Path) -> list[str]:
    """Temporary files of the pipeline (atomic writes, downloads, extract work logs) anywhere in the repo."""
    found = {p for pattern in TEMP_PATTERNS for p in root.rglob(pattern)}
    return sorted(str(p.relative_to(root)) for p in found if not {".dvc", ".git"} & set(p.relative_to(root).parts))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ killing
def start(cmd: list[str], repo: Repo, log: Path, *, one_core: bool = False) -> subprocess.Popen:
    """Start `cmd` in its own process group (dvc, its shell and the stage's python all get the SIGKILL)."""
    preexec = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_core else None
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, cwd=repo.root, env=repo.env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=preexec)


def running_stage(proc: subprocess.Popen, module: str) -> bool:
    """True while `python -m stages.<module>` runs under `proc`."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if f"stages.{module}" in child.cmdline():
                return True
        except psutil.Error:
            continue
    return False


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240.0) -> bool:
    """Poll `condition` until it holds (True) or `proc` ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {condition}")


def kill_group(proc: subprocess.Popen, module: str) -> str:
    """SIGKILL the whole group (dvc, its shell, the stage); return what was hit. Returns once every member is gone."""
    if proc.poll() is not None:
        return f"finished before the kill (exit {proc.returncode})"
    hit = f"stages.{module} running" if running_stage(proc, module) else "dvc only (stage not running)"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_in_group(p, proc.pid) for p in psutil.process_iter()):
        time.sleep(0.02)
    return hit


def _in_group(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False


# ------------------------------------------------------------------------------------------ the corpus
@pytest.mark.slow  # the baseline fixture runs the whole pipeline once
def test_bad_image_corpus_through_the_whole_pipeline(baseline: Repo) -> None:
    """data -> prepare -> extract -> head (-> fine-tune -> report) on 21 valid and 6 bad files."""
    assert {"data", "prepare", f"weights@{LITE0}", f"extract@{LITE0}", f"head@{LITE0}", f"finetune@{LITE0}",
            "report"} <= stages_run(baseline.output)
    manifest = read_manifest(baseline.path("data/prepared/manifest.csv"))
    assert sorted(r.path for r in manifest) == sorted(baseline.valid)
    with h5py.File(baseline.path(FEATURES), "r") as h5:
        assert h5["features/pool"].shape == (len(baseline.valid), 1280)
        assert h5.attrs["n_images"] == len(baseline.valid) == 21
        assert [p.decode() for p in h5["path"][()]] == [r.path for r in manifest]
    quarantine = json.loads(baseline.path("reports/prepare/quarantine.json").read_text())
    assert quarantine["n_bad"] == 6 and {f["path"] for f in quarantine["files"]} == set(QUARANTINED)
    summary = json.loads(baseline.path("reports/prepare/summary.json").read_text())
    assert (summary["n_images"], summary["n_bad"]) == (21, 6)
    metrics = json.loads(baseline.path(f"reports/{LITE0}/metrics.json").read_text())
    assert metrics["n_selection"] + metrics["n_heldout"] == 21
    finetuned = json.loads(baseline.path(f"reports/finetune/{LITE0}/metrics.json").read_text())
    assert finetuned["n_train"] + finetuned["n_val"] == 21
    assert "- Quarantined images: 6 (see reports/prepare/quarantine.json)" in \
        baseline.path("summary/summary.md").read_text()
    assert leftovers(baseline.root) == []


# ------------------------------------------------------------------------------------------ interruption
@pytest.mark.slow
def test_prepare_killed_at_random_points_then_repro_restores_identical_outputs(baseline: Repo,
                                                                                tmp_path: Path) -> None:
    repo = copy_repo(baseline, tmp_path / "repo")
    rng = random.Random(SEED)
    hits = []
    for attempt in range(2):
        proc = start(["dvc", "repro", "-f", "-s", "prepare"], repo, tmp_path / "kill.log")
        if attempt == 0:  # anywhere, dvc's own start included
            time.sleep(rng.uniform(0.5, 4.0))
        else:  # inside the stage: decoding, splitting or writing
            assert wait_until(proc, lambda: running_stage(proc, "prepare"))
            time.sleep(rng.uniform(0.0, 1.5))
        hits.append(kill_group(proc, "prepare"))
    assert any(h.endswith("running") for h in hits), hits
    print("kills:", hits)
    output = run(["dvc", "repro"], repo.root, repo.env)
    assert stages_run(output) <= {"prepare"}, output  # identical outputs: nothing downstream re-runs
    for rel in PREPARE_OUTPUTS:
        assert repo.path(rel).read_bytes() == baseline.path(rel).read_bytes(), rel
    assert leftovers(repo.root) == []
    assert "up to date" in run(["dvc", "status"], repo.root, repo.env)


class ThrottledFiles(http.server.ThreadingHTTPServer):
    """Serves `files` slowly (64 KiB every 20 ms) with Range support; records each request's Range header."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _ThrottledHandler)
        self.files = files
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range, bytes sent)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ThrottledHandler(http.server.BaseHTTPRequestHandler):
    server: ThrottledFiles

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        start_at = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if start_at else 200)
        if start_at:
            self.send_header("Content-Range", f"bytes {start_at}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start_at))
        self.end_headers()
        sent = 0
        try:
            for offset in range(start_at, len(data), 64 << 10):
                chunk = data[offset: offset + (64 << 10)]
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.server.requests.append((self.path, rng, sent))


def timm_weights(arch: str) -> bytes:
    """A seeded random state dict of timm `arch` as torch.save bytes."""
    import timm

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(timm.create_model(arch, pretrained=False).state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture()
def weights_server():
    payload = timm_weights("mobilenetv3_small_050")  # 6.5 MB: the client appends 1 MiB reads
    server = ThrottledFiles({"/served_net.pth": payload})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, payload
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_weights_download_killed_mid_file_resumes_with_range(weights_server, tmp_path: Path) -> None:
    server, payload = weights_server
    custom = {"served_net": {"arch": "timm:mobilenetv3_small_050", "source": f"{server.url}/served_net.pth",
                             "sha256": hashlib.sha256(payload).hexdigest(), "input_size": 32}}
    root = tmp_path / "repo"
    root.mkdir()
    repo = Repo(root, make_pipeline_copy(root, params_update={
        **PARAMS, "backbones": [LITE0, "served_net"], "finetune.backbones": [], "weights.custom": custom}))
    dest, partial = repo.path("models/pretrained/served_net.pth"), repo.path("models/pretrained/served_net.pth.partial")
    run(["dvc", "repro", "params"], repo.root, repo.env)  # the params check every stage depends on
    rng = random.Random(SEED)
    sizes = []
    for _ in range(2):
        have = partial.stat().st_size if partial.exists() else 0
        proc = start(["dvc", "repro", "-s", "weights@served_net"], repo, tmp_path / "kill.log")
        assert wait_until(proc, lambda: partial.exists() and partial.stat().st_size > have)
        time.sleep(rng.uniform(0.0, 0.3))  # the client appends 1 MiB reads; the server sends 3.2 MB/s
        hit = kill_group(proc, "weights")
        assert hit.endswith("running"), (hit, (tmp_path / "kill.log").read_text()[-3000:])
        sizes.append(partial.stat().st_size)
        print(f"kill: {hit}, {sizes[-1]} of {len(payload)} bytes in {partial.name}")
        assert not dest.exists() and 0 < sizes[-1] < len(payload)
    output = run(["dvc", "repro", "weights@served_net"], repo.root, repo.env)
    assert stages_run(output) == {"weights@served_net"}
    assert dest.read_bytes() == payload
    report = json.loads(repo.path("reports/served_net/weights.json").read_text())
    assert (report["source"], report["sha256"]) == ("url", hashlib.sha256(payload).hexdigest())
    ranges = [r for _, r, _ in server.requests]
    assert ranges[0] is None and ranges[1] == f"bytes={sizes[0]}-" and ranges[-1] == f"bytes={sizes[-1]}-", ranges
    assert server.requests[-1][2] == len(payload) - sizes[-1]  # only the missing bytes were sent again
    assert leftovers(repo.root) == []


def pinned_reference(repo: Repo, path_name: str, threads: int, out: Path) -> Path:
    """Extract the repo's manifest in this process on one given compute path and thread count, uninterrupted."""
    engine, device, precision, layout = path_name.split("+")[:4]
    pinned = Candidate(engine, device, precision, layout, path_name.endswith("+compile"))
    params = load_params(repo.path("params.yaml"))
    threads_before = torch.get_num_threads()
    try:
        with mock.patch.object(ex, "candidate_list", lambda *a, **k: [pinned]), \
                mock.patch.object(hardware, "available_cores", lambda: threads), \
                mock.patch.object(choose, "choose_threads", lambda *a, **k: (threads, {str(threads): 1.0})):
            ex.extract(backbone=get_backbone(LITE0), weights=repo.path(f"models/pretrained/{LITE0}.pth"),
                       raw=repo.path("data/raw"), manifest=repo.path("data/prepared/manifest.csv"), out=out,
                       params=params.extract, normalization=params.prepare.normalization)
    finally:
        torch.set_num_threads(threads_before)
    return out


@pytest.mark.slow
def test_extract_killed_three_times_then_repro_is_byte_identical(baseline: Repo, tmp_path: Path) -> None:
    repo = copy_repo(baseline, tmp_path / "repo")
    features = repo.path(FEATURES)
    work = work_path_for(features)
    features.unlink()  # persist: true keeps the previous file, whose rows would all be reused: start from none
    rng = random.Random(SEED)
    hits = []
    for attempt in range(3):
        size = work.stat().st_size if work.exists() else 0
        proc = start(["dvc", "repro", "-s", f"extract@{LITE0}"], repo, tmp_path / "kill.log", one_core=True)
        if attempt == 0:  # anywhere in the stage: imports, path measurement or the first batches
            assert wait_until(proc, lambda: running_stage(proc, "extract"))
            time.sleep(rng.uniform(0.0, 3.0))
        else:  # after at least one more batch record, at a random point of the next ones
            assert wait_until(proc, lambda: work.exists() and work.stat().st_size > size + 1000), hits
            time.sleep(rng.uniform(0.0, 0.15))
        hits.append(f"{kill_group(proc, 'extract')}, work file {work.stat().st_size if work.exists() else 0} B")
        assert not features.exists(), hits
    assert sum("running" in h for h in hits) >= 2, hits
    output = run(["dvc", "repro", f"extract@{LITE0}"], repo.root, repo.env)  # the stage and its (clean) upstream
    assert stages_run(output) == {f"extract@{LITE0}"}, output
    report = json.loads(repo.path(f"reports/{LITE0}/extract.json").read_text())
    assert report["selection"]["reason"].startswith("resumed"), report["selection"]
    assert report["reused_from"]["work_file"] > 0 and report["computed"] < 21, report
    # Byte-identical to an uninterrupted run on the same compute path: the memory format and thread count the
    # first run measured change the last bits of float32 features, and a resumed run keeps that run's choice.
    base_report = json.loads(baseline.path(f"reports/{LITE0}/extract.json").read_text())
    same_path = (base_report["path"], base_report["torch_threads"]) == (report["path"], report["torch_threads"])
    reference = (baseline.path(FEATURES) if same_path else
                 pinned_reference(repo, report["path"], report["torch_threads"], tmp_path / "reference.h5"))
    assert features.read_bytes() == reference.read_bytes(), hits
    print("kills:", hits, "; reference:", "the baseline" if same_path else f"pinned to {report['path']}")
    head_status = run(["dvc", "status", f"head@{LITE0}"], repo.root, repo.env)
    assert ("up to date" in head_status) == same_path, head_status  # DVC agrees: same bytes, nothing to re-run
    assert leftovers(repo.root) == []


@pytest.mark.slow
def test_finetune_killed_after_an_epoch_then_repro_matches_the_uninterrupted_metrics(baseline: Repo,
                                                                                     tmp_path: Path) -> None:
    repo = copy_repo(baseline, tmp_path / "repo")
    shutil.rmtree(repo.path(f"models/finetune/{LITE0}"))  # its checkpoints persist: start afresh
    shutil.rmtree(repo.path(f"reports/finetune/{LITE0}"))
    last = repo.path(f"models/finetune/{LITE0}/checkpoints/last.pt")
    proc = start(["dvc", "repro", "-s", f"finetune@{LITE0}"], repo, tmp_path / "kill.log")
    assert wait_until(proc, last.exists)
    time.sleep(random.Random(SEED).uniform(0.0, 1.0))
    hit = kill_group(proc, "finetune")
    assert hit.endswith("running"), hit
    print("kill:", hit, "; checkpoints:", sorted(p.name for p in last.parent.iterdir()))
    output = run(["dvc", "repro"], repo.root, repo.env)
    assert f"finetune@{LITE0}" in stages_run(output)
    new = json.loads(repo.path(f"reports/finetune/{LITE0}/metrics.json").read_text())
    old = json.loads(baseline.path(f"reports/finetune/{LITE0}/metrics.json").read_text())
    assert new["resumed_from_epoch"] >= 1 and old["resumed_from_epoch"] == 0
    for key in ("heldout", "epochs_run", "best_epoch", "precision"):
        assert new[key] == old[key], key
    for tsv in ("selection/accuracy.tsv", "selection/loss.tsv", "train/loss.tsv"):
        curve = f"reports/finetune/{LITE0}/live/plots/metrics/{tsv}"
        assert repo.path(curve).read_text() == baseline.path(curve).read_text(), tsv
    assert leftovers(repo.root) == []


# ------------------------------------------------------------------------------------------ disk, permissions
def namespaces_work() -> bool:
    """True when `unshare -rm` can mount here (a private mount namespace; no privileges needed where allowed)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not namespaces_work(), reason="`unshare -rm` cannot mount here")


def stage_cmd(repo: Repo, name: str) -> str:
    """The stage's command as dvc.yaml runs it (its last line, after the name check)."""
    stages = yaml.safe_load(repo.path("dvc.yaml").read_text())["stages"]
    cmd = stages[name.split("@")[0]]["cmd"]
    return (cmd[-1] if isinstance(cmd, list) else cmd).replace("${item.backbone}", name.split("@")[-1])


@pytest.mark.slow
@needs_mounts
def test_full_disk_during_the_features_write_keeps_the_previous_file(baseline: Repo, tmp_path: Path) -> None:
    """A real full file system: features/ is a tmpfs holding the previous file with room for less than a copy."""
    repo = copy_repo(baseline, tmp_path / "repo")
    previous = tmp_path / "previous.h5"
    shutil.copy2(repo.path(FEATURES), previous)
    size_k = previous.stat().st_size // 1024 + 40  # the previous file fits, a second copy does not
    script = (f"mount -t tmpfs -o size={size_k}k tmpfs features && cp {previous} {FEATURES} && "
              f"{stage_cmd(repo, f'extract@{LITE0}')}; rc=$?; "
              f"sha256sum {FEATURES}; ls -A features; exit $rc")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=repo.root, env=repo.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert f"extract: error: [Errno 28] cannot write {FEATURES}: No space left on device; any previous " \
           f"{LITE0}.h5 is unchanged" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"{sha(previous)}  {FEATURES}" in result.stdout  # inside the namespace: byte-identical
    assert result.stdout.split()[-1] == f"{LITE0}.h5"  # `ls -A`: no temporary file left on the full disk


@pytest.mark.slow  # the baseline fixture runs the whole pipeline once
def test_enospc_while_writing_features_fails_clearly_and_keeps_the_previous_file(
        baseline: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The same fault injected in-process: the write of the HDF5 bytes raises ENOSPC half way."""
    repo = copy_repo(baseline, tmp_path / "repo")
    features = repo.path(FEATURES)
    before = features.read_bytes()
    real_write = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if self.parent == features.parent:
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    monkeypatch.setattr(hardware, "available_cores", lambda: 1)
    monkeypatch.chdir(repo.root)
    threads = torch.get_num_threads()
    try:
        code = ex.main(stage_cmd(repo, f"extract@{LITE0}").split()[3:])
    finally:
        torch.set_num_threads(threads)
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot write {FEATURES}: No space left on device; any previous {LITE0}.h5 is unchanged" in err
    assert features.read_bytes() == before
    assert leftovers(repo.root) == []


@pytest.mark.slow
@needs_mounts
def test_read_only_output_folder_is_a_clear_error_naming_the_path(baseline: Repo, tmp_path: Path) -> None:
    """A real read-only bind mount of data/prepared (root is not stopped by chmod, but is by a read-only mount)."""
    repo = copy_repo(baseline, tmp_path / "repo")
    before = {rel: repo.path(rel).read_bytes() for rel in PREPARE_OUTPUTS}
    script = ("mount --bind data/prepared data/prepared && mount -o remount,bind,ro data/prepared && "
              + stage_cmd(repo, "prepare"))
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=repo.root, env=repo.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert ("cannot write data/prepared/manifest.csv: Read-only file system; any previous manifest.csv is "
            "unchanged") in result.stderr and "data/prepared is on a read-only file system" in result.stderr
    assert "Traceback" not in result.stderr
    assert {rel: repo.path(rel).read_bytes() for rel in PREPARE_OUTPUTS} == before
    assert leftovers(repo.root) == []


@pytest.mark.slow  # the baseline fixture runs the whole pipeline once
def test_unwritable_output_folder_in_process(baseline: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The same fault in-process, where mounts are not allowed: PermissionError when the temporary file is created in
    reports/prepare (tests run as root, whom chmod does not stop)."""
    repo = copy_repo(baseline, tmp_path / "repo")
    reports = repo.path("reports/prepare")
    before = {rel: repo.path(rel).read_bytes() for rel in PREPARE_OUTPUTS}
    real_mkstemp = tempfile.mkstemp

    def denied(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's keyword
        if dir is not None and Path(dir).resolve() == reports.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr("stages.io.tempfile.mkstemp", denied)
    monkeypatch.chdir(repo.root)
    with caplog.at_level(logging.ERROR):
        assert prepare_stage.main(stage_cmd(repo, "prepare").split()[3:]) == 1
    assert ("cannot write reports/prepare/quarantine.json: Permission denied; any previous quarantine.json is "
            "unchanged") in caplog.text and "make reports/prepare writable" in caplog.text
    # data/prepared was rewritten before the failure with the same bytes; reports/prepare is untouched
    assert {rel: repo.path(rel).read_bytes() for rel in PREPARE_OUTPUTS} == before
    assert leftovers(repo.root) == []


# ------------------------------------------------------------------------------------------ hostile archives, URLs
class Redirects(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, targets: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _RedirectHandler)
        self.targets = targets


class _RedirectHandler(http.server.BaseHTTPRequestHandler):
    server: Redirects

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.server.targets[self.path])
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture()
def redirects():
    server = Redirects({"/to_file.zip": "file:///etc/passwd", "/to_ftp.zip": "ftp://127.0.0.1/data.zip"})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def hostile_zip(path: Path, member: str, *, mode: int | None = None, data: bytes = b"x") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ants/ok.jpg", b"fine")
        zf.writestr("bees/ok.jpg", b"fine")
        info = zipfile.ZipInfo(member)
        if mode is not None:
            info.create_system, info.external_attr = 3, mode << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, data)
    return path


def hostile_tar(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("ants/ok.jpg"), io.BytesIO(b""))
        link = tarfile.TarInfo("bees/passwd.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return path


HOSTILE_SOURCES = {
    "zip-slip": (lambda d, url: hostile_zip(d / "slip.zip", "../../escaped.jpg"), "zip-slip"),
    "absolute member": (lambda d, url: hostile_zip(d / "abs.zip", "/tmp/escaped.jpg"), "has an absolute path"),
    "zip symlink": (lambda d, url: hostile_zip(d / "link.zip", "bees/passwd.jpg", mode=stat.S_IFLNK | 0o777,
                                               data=b"/etc/passwd"), "is a symlink"),
    "tar symlink": (lambda d, url: hostile_tar(d / "link.tar.gz"), "is a symlink"),
    "zip bomb": (lambda d, url: hostile_zip(d / "bomb.zip", "bees/zeros.jpg", data=bytes(3 << 20)),
                 r"members expand to more than 1 MiB \(data.max_archive_mb\)"),
    "ftp source": (lambda d, url: "ftp://127.0.0.1/hymenoptera_data.zip",
                   "data.source must be a local path, an http:// or https:// URL"),
    "file source": (lambda d, url: "file:///etc/passwd.zip", "data.source must be a local path"),
    "redirect to file://": (lambda d, url: f"{url}/to_file.zip", "refused redirect .* to file:///etc/passwd"),
    "redirect to ftp://": (lambda d, url: f"{url}/to_ftp.zip", "refused redirect .* to ftp://"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SOURCES))
def test_hostile_sources_are_refused_by_the_data_stage_and_nothing_is_written(
        case: str, redirects: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    make, message = HOSTILE_SOURCES[case]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = make(inbox, redirects)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "backbones": [LITE0], "data": {"source": str(source), "url": None, "max_archive_mb": 1}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_MIRROR", raising=False)
    with caplog.at_level(logging.ERROR):
        assert data_stage.main(["--out", "data/raw"]) == 1
    assert re.search(message, caplog.text), caplog.text
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []  # no raw/, no temp
    assert not list(tmp_path.rglob("escaped.jpg")) and not Path("/tmp/escaped.jpg").exists()


# ------------------------------------------------------------------------------------------ hostile params
HOSTILE_NAMES = ["resnet50;touch PWNED;echo", "x$(touch PWNED)", "y`touch PWNED`", "z && touch PWNED",
                 "../../PWNED", "w\ntouch PWNED"]


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, ".", "..", "-rf", "resnet50\n", "Resnet50", ""])
def test_the_name_check_every_command_runs_first_refuses_unsafe_names(name: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """`python -m stages.params` (the first line of the weights/extract/head/finetune commands) is cheap (no torch)
    and exits 1 with the ParamError for a name that is not [a-z0-9][a-z0-9_.-]*, in every place dvc.yaml uses one."""
    from stages import params as params_module

    for raw in ({"backbones": [LITE0, name]}, {"backbones": [LITE0], "finetune": {"backbones": [name]}},
                {"backbones": [LITE0], "weights": {"custom": {name: {"arch": "timm:x", "source": "/x", "sha256": "0" * 64}}}}):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        assert params_module.main([str(path)]) == 1, raw
        err = capsys.readouterr().err
        assert re.search(r"^params: error: .* must be (a name of lowercase letters|a string|a list of \(a string\))",
                         err, re.S), err
    path.write_text(yaml.safe_dump({"backbones": [LITE0], "finetune": {"backbones": [LITE0]}}))
    assert params_module.main([str(path)]) == 0


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of the repository but .git/ and .dvc/."""
    return {str(p.relative_to(root)): sha(p) for p in root.rglob("*")
            if p.is_file() and not {".git", ".dvc"} & set(p.relative_to(root).parts)}


@pytest.mark.slow
def test_hostile_names_are_rejected_before_any_command_runs(baseline: Repo, tmp_path: Path) -> None:
    """Names dvc.yaml interpolates into commands, edited into the params of a finished pipeline. DVC substitutes
    them and runs the commands through a shell before any stage code runs, so each such command starts with
    `python -m stages.params`, which refuses them; without it `touch PWNED` ran (`dvc repro -k`, or `-s`)."""
    custom = {"q;touch PWNED;echo": {"arch": "timm:test_efficientnet", "source": "/nowhere.pth", "sha256": "0" * 64}}
    finetune_name = "v;touch PWNED;echo"
    attempts = [  # (params, dummy dependency files so that DVC reaches the command, command)
        ({"backbones": [LITE0, *HOSTILE_NAMES, "q;touch PWNED;echo"], "weights__custom": custom,
          "finetune__backbones": [finetune_name]}, [], ["dvc", "repro", "--keep-going"]),  # every stage is tried
        ({"backbones": [LITE0, HOSTILE_NAMES[0]]}, [], ["dvc", "repro", "-s", f"weights@{HOSTILE_NAMES[0]}"]),
        ({"backbones": [LITE0, finetune_name], "finetune__backbones": [finetune_name]},
         [f"models/pretrained/{finetune_name}.pth", f"models/{finetune_name}/probe_pool.pt"],
         ["dvc", "repro", "-s", f"finetune@{finetune_name}"]),
    ]
    for i, (updates, dummies, cmd) in enumerate(attempts):
        repo = copy_repo(baseline, tmp_path / f"repo{i}")
        edit_params(repo, **updates)
        for rel in dummies:
            repo.path(rel).parent.mkdir(parents=True, exist_ok=True)
            repo.path(rel).write_bytes(b"dummy")
        before = snapshot(repo.root)
        result = subprocess.run(cmd, cwd=repo.root, env=repo.env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "must be a name of lowercase letters, digits, '_', '.' or '-', starting with a letter or digit" \
            in output, output[-3000:]
        assert not list(tmp_path.rglob("PWNED*")), (cmd, output)
        after = snapshot(repo.root)
        assert set(after) <= set(before), set(after) - set(before)  # nothing created
        assert {k: v for k, v in before.items() if k in after} == after  # nothing rewritten
        # DVC deletes the non-persistent outputs of a stage it is about to run (prepare, or weights@ when
        # weights.custom changed; their commands then refuse the params): cached ones come back with
        # `dvc checkout`, the uncached reports with the next good run. The data, the verified weights, the features
        # and the fine-tune checkpoints (persist: true or upstream of every name) are never touched.
        removed = set(before) - set(after)
        kept = ("data/raw/", "models/pretrained/", "features/", f"models/finetune/{LITE0}/checkpoints/")
        assert not [r for r in removed if r.startswith(kept)], removed
        print(f"{cmd}: removed by DVC before the refused command: {sorted(removed)}")


# ------------------------------------------------------------------------------------------ untrusted files
class _RunsCode:
    """Unpickling this calls open(marker, "w"): what a malicious classifier.pt could do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.slow  # the baseline fixture runs the whole pipeline once
def test_malicious_classifier_pickle_is_refused_without_running_code(baseline: Repo, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "code-ran"
    model = tmp_path / "models" / LITE0 / "classifier.pt"
    model.parent.mkdir(parents=True)
    genuine = torch.load(baseline.path(f"models/{LITE0}/classifier.pt"), map_location="cpu", weights_only=True)
    torch.save({**genuine, "provenance": _RunsCode(marker)}, model)
    torch.load(model, map_location="cpu", weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    image = baseline.path("data/raw") / read_manifest(baseline.path("data/prepared/manifest.csv"))[0].path
    with caplog.at_level(logging.ERROR):
        assert predict_stage.main([str(image), "--model", str(model)]) == 1
    assert f"refused to load {model}: not a plain tensor export (loaded with weights_only=True)" in caplog.text
    assert "Unsupported global: GLOBAL io.open" in caplog.text
    from stages.finetune import FinetuneError, read_probe  # fine-tune reads the same file as its probe
    with pytest.raises(FinetuneError, match=f"refused to load {model}: not a plain tensor export"):
        read_probe(model, backbone=LITE0, classes=["ants", "bees"], preprocess=get_backbone(LITE0).preprocess)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(model, map_location="cpu", weights_only=True)


def _tamper(h5: h5py.File, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    values = fn(h5[name][()])
    del h5[name]
    h5.create_dataset(name, data=values)


TAMPERED = {
    "edited attribute weights_sha256": (lambda h5: h5.attrs.__setitem__("weights_sha256", "0" * 64),
                                        "attribute weights_sha256 is '0000"),
    "edited attribute manifest_sha256": (lambda h5: h5.attrs.__setitem__("manifest_sha256", "f" * 64),
                                         "attribute manifest_sha256 is 'ffff"),
    "edited attribute backbone": (lambda h5: h5.attrs.__setitem__("backbone", "resnet50"),
                                  "attribute backbone is 'resnet50' but expected 'efficientnet_lite0'"),
    "edited attribute storage_dtype": (lambda h5: h5.attrs.__setitem__("storage_dtype", "float16"),
                                       r"dtype of features/pool is float32 but expected float16"),
    "one row missing": (lambda h5: _tamper(h5, "features/pool", lambda x: x[:-1]),
                        r"shape of features/pool is \(20, 1280\) but expected \(21, D\)"),
    "3-D features": (lambda h5: _tamper(h5, "features/pool", lambda x: x[:, None]),
                     r"shape of features/pool is \(21, 1, 1280\)"),
    "columns cut": (lambda h5: _tamper(h5, "features/pool", lambda x: x[:, :100]),
                    r"features/(pool|pool\+blocks\.5) have (100|292) columns but layer\(s\) (pool|pool\+blocks\.5) of "
                    r"efficientnet_lite0 gives (1280|1472)"),
    "int8 features": (lambda h5: _tamper(h5, "features/pool", lambda x: (x * 10).astype(np.int8)),
                      "dtype of features/pool is int8 but expected float32"),
    "float64 features": (lambda h5: _tamper(h5, "features/pool", lambda x: x.astype(np.float64)),
                         "dtype of features/pool is float64 but expected float32"),
    "NaN in features": (lambda h5: _tamper(h5, "features/pool", lambda x: np.where(np.eye(*x.shape) > 0, np.nan, x)),
                        "number of NaN or infinite values in features/pool is 21"),
    "float labels": (lambda h5: _tamper(h5, "labels", lambda x: x.astype(np.float32)),
                     "dtype of dataset labels is float32 but expected an integer dtype"),
    "swapped rows": (lambda h5: _tamper(h5, "path", lambda x: x[::-1]), r"row 0 \(path, sha256, label, split\)"),
}


@pytest.mark.slow  # the baseline fixture runs the whole pipeline once
@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_features_are_rejected_by_head(case: str, baseline: Repo, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    tamper, message = TAMPERED[case]
    features = tmp_path / FEATURES
    features.parent.mkdir(parents=True)
    shutil.copy2(baseline.path(FEATURES), features)
    with h5py.File(features, "r+") as h5:
        tamper(h5)
    monkeypatch.chdir(baseline.root)  # reads the baseline's manifest, weights and params; writes under tmp_path
    argv = stage_cmd(baseline, f"head@{LITE0}").split()[3:]
    argv[argv.index("--features") + 1] = str(features)
    argv[argv.index("--model") + 1] = str(tmp_path / "classifier.pt")
    argv[argv.index("--reports") + 1] = str(tmp_path / "reports")
    with caplog.at_level(logging.ERROR):
        assert head_stage.main(argv) == 1
    assert re.search(message, caplog.text), caplog.text
    assert not (tmp_path / "classifier.pt").exists() and not (tmp_path / "reports").exists()


# ------------------------------------------------------------------------------------------ concurrency
@pytest.mark.slow
def test_two_dvc_repro_at_once_one_fails_cleanly_and_outputs_equal_a_single_run(baseline: Repo,
                                                                                 tmp_path: Path) -> None:
    """Two `dvc repro -f -s head@...` in one repository: DVC's lock lets one run; its outputs equal the baseline's
    (the same stage, params and inputs, run once)."""
    repo = copy_repo(baseline, tmp_path / "repo")
    cmd = ["dvc", "repro", "--force", "--single-item", f"head@{LITE0}"]
    first = start(cmd, repo, tmp_path / "first.log")
    wait_until(first, lambda: running_stage(first, "head") or running_stage(first, "params"))
    second = start(cmd, repo, tmp_path / "second.log")
    codes = (first.wait(timeout=600), second.wait(timeout=600))
    logs = ((tmp_path / "first.log").read_text(), (tmp_path / "second.log").read_text())
    assert sorted(codes) == [0, 255], logs
    loser = logs[codes.index(255)]
    assert re.search(r"'.*' is busy, it is being blocked by:\n  \(PID \d+\): .*dvc repro", loser), loser
    assert "Running stage" not in loser and "Traceback" not in loser
    assert "up to date" in run(["dvc", "status", f"head@{LITE0}"], repo.root, repo.env)
    for rel in (f"reports/{LITE0}/errors.csv", f"reports/{LITE0}/plots/confusion.json",
                f"reports/{LITE0}/plots/calibration.json", f"models/{LITE0}/classifier.pt"):
        assert repo.path(rel).read_bytes() == baseline.path(rel).read_bytes(), rel
    metrics = [json.loads(r.path(f"reports/{LITE0}/metrics.json").read_text()) for r in (repo, baseline)]
    assert metrics[0]["heldout"] == metrics[1]["heldout"] and metrics[0]["features"] == metrics[1]["features"]
    exports = [torch.load(r.path(f"models/{LITE0}/classifier.pt"), weights_only=True) for r in (repo, baseline)]
    assert all(torch.equal(exports[0]["head"][k], v) for k, v in exports[1]["head"].items()
               if isinstance(v, torch.Tensor))
    assert leftovers(repo.root) == []
