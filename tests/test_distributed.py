"""Fine-tuning under `torchrun --nproc_per_node 2` (DDP, gloo on CPU) on the tiny timm CNN of test_finetune: it
converges like the single-process run with the same effective batch, only rank 0 writes, and the launch rule
(per-process batch = finetune.batch_size / N) is enforced."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.finetune import SINGLE, FinetuneError, init_distributed, per_rank_batch_size
from test_finetune import _one_thread, project, run_main, write_params  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]

# Runs stages.finetune.main under torchrun and records, through a Python audit hook, every file this rank opens for
# writing, creates, renames or removes: {"rank": r, "writes": [paths]} in $WRITES_LOG.rank<r>.json.
LAUNCHER = '''
import json, os, sys
rank, writes, recording = os.environ["RANK"], [], [True]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def audit(event, args):
    if not recording[0]:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] or 0
        if (isinstance(mode, str) and set(mode) & set("wax+")) or flags & WRITE_FLAGS:
            writes.append(os.fsdecode(args[0]))
    elif event in ("os.rename", "os.remove", "os.mkdir", "tempfile.mkstemp", "os.rmdir", "shutil.rmtree"):
        writes.append(os.fsdecode(args[1] if event == "os.rename" else args[0]))

sys.addaudithook(audit)
from stages.finetune import main
code = main(sys.argv[1:])
recording[0] = False
with open(f"{os.environ['WRITES_LOG']}.rank{rank}.json", "w") as fh:
    json.dump({"rank": int(rank), "writes": writes}, fh)
sys.exit(code)
'''
SETTINGS = {"init_head": "random", "epochs": 3, "batch_size": 8, "seed": 0}


def torchrun(project: Path, out: Path, params: Path, nproc: int, launcher: Path) -> subprocess.CompletedProcess:
    argv = ["--backbone", "tiny", "--raw", str(project / "data/raw"),
            "--manifest", str(project / "data/prepared/manifest.csv"),
            "--weights", str(project / "models/pretrained/tiny.pth"), "--out", str(out / "models"),
            "--reports", str(out / "reports"), "--params", str(params)]
    env = {**os.environ, "CI": "1", "WRITES_LOG": str(out / "writes"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(launcher), *argv], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_ddp_converges_like_one_process_and_only_rank_0_writes(project: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    monkeypatch.setenv("CI", "1")
    params = write_params(project, **SETTINGS)
    assert run_main(project, tmp_path / "single", params) == 0
    single = json.loads((tmp_path / "single/reports/metrics.json").read_text())

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    (tmp_path / "ddp").mkdir()
    result = torchrun(project, tmp_path / "ddp", params, 2, launcher)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    ddp = json.loads((tmp_path / "ddp/reports/metrics.json").read_text())

    # the same effective batch: 8 images per step = 2 processes x 4, the same steps per epoch and schedule
    assert (ddp["world_size"], ddp["per_process_batch_size"], single["world_size"]) == (2, 4, 1)
    assert ddp["epochs_run"] == single["epochs_run"] == 3
    print(f"val accuracy / loss: 1 process {single['val']['accuracy']:.3f} / {single['val']['log_loss']:.4f}; "
          f"2 processes {ddp['val']['accuracy']:.3f} / {ddp['val']['log_loss']:.4f}")
    # converges like one process: both separate the val split, losses within 0.1 nats of each other (not equal:
    # per-process BatchNorm statistics and augmentation streams differ)
    assert single["val"]["accuracy"] >= 0.875 and ddp["val"]["accuracy"] >= 0.875
    assert abs(ddp["val"]["log_loss"] - single["val"]["log_loss"]) < 0.1
    train_curve = (tmp_path / "ddp/reports/live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    assert len(train_curve) == 3

    # only rank 0 writes: rank 1 opened nothing for writing, renamed or removed nothing in the outputs
    logs = {r: json.loads((tmp_path / f"ddp/writes.rank{r}.json").read_text())["writes"] for r in (0, 1)}
    outputs = str(tmp_path / "ddp")
    written = {r: {Path(p).relative_to(outputs).as_posix() for p in paths if p.startswith(outputs)}
               for r, paths in logs.items()}
    assert written[1] == set(), written[1]
    assert {"models/checkpoints/last.pt", "models/checkpoints/best.pt", "models/classifier.pt",
            "reports/metrics.json", "reports/live/plots/metrics/selection/accuracy.tsv"} <= written[0]
    assert re.search(r"DDP rank 0 of 2 \(gloo\): 4 images per step of the effective batch 8; writes the", output)
    assert re.search(r"DDP rank 1 of 2 \(gloo\): 4 images per step of the effective batch 8; writes nothing",
                     output)

    # resume: the finished run's last.pt (with both ranks' RNG states) is taken up, nothing left to train
    result = torchrun(project, tmp_path / "ddp", params, 2, launcher)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    again = json.loads((tmp_path / "ddp/reports/metrics.json").read_text())
    assert again["resumed_from_epoch"] == 3 and again["val"] == ddp["val"]


def test_effective_batch_must_split_evenly_across_processes() -> None:
    assert per_rank_batch_size(32, 1) == 32 and per_rank_batch_size(32, 4) == 8
    with pytest.raises(FinetuneError, match=re.escape(
            "finetune.batch_size must be divisible by the number of processes (3): it is the effective batch, "
            "split evenly across them; got 32. Edit params.yaml (e.g. `batch_size: 30`)")):
        per_rank_batch_size(32, 3)


def test_without_torchrun_a_single_process(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == SINGLE and SINGLE.is_main and SINGLE.world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "1")  # `torchrun --nproc_per_node 1`
    assert init_distributed() == SINGLE


def test_make_finetune_ddp_runs_the_dvc_stage_command_under_torchrun() -> None:
    """The Makefile target launches exactly what dvc.yaml's finetune@ stage runs, under torchrun."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]["do"]["cmd"]
    command = (stage[-1] if isinstance(stage, list) else stage).split()
    assert command[:3] == ["python", "-m", "stages.finetune"]
    make = subprocess.run(["make", "-n", "--no-print-directory", "finetune-ddp", "NPROC=4", "BACKBONE=resnet50"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = make.stdout.replace("\\\n", " ").splitlines()  # join the recipe's continued lines
    launch = next(line for line in lines if line.startswith("torchrun")).split()
    assert launch[:4] == ["torchrun", "--standalone", "--nproc_per_node", "4"], launch
    assert launch[4:] == ["-m", "stages.finetune"] + [arg.replace("${item}", "resnet50") for arg in command[3:]]
