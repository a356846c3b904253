"""The fine-tune's training loop (stages/finetune.py): optimizer and schedule, one epoch of updates, scoring, the
dvclive curves, and `run_finetune`, which trains for up to `finetune.epochs` epochs keeping best.pt and last.pt
(stages/checkpoints.py) and resumes from last.pt exactly where an uninterrupted run would be.

The best epoch (highest selection accuracy, ties: lower selection loss) and early stopping are decided on the
selection rows alone, never on the held-out split. Under DDP (stages/distributed.py) every rank runs the loop, the
forward pass goes through a DistributedDataParallel wrapper, and rank 0 alone writes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from stages.checkpoints import (CHECKPOINT_VERSION, load_checkpoint, restore_rng_state, rng_state, save_checkpoint,
                                take_up_checkpoint)
from stages.distributed import SINGLE, Distributed, barrier, rank_states, sum_over_ranks
from stages.finetune_net import FinetuneNet
from stages.hardware import DTYPES
from stages.io import progress
from stages.params import FinetuneParams

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- optimization
def param_groups(net: FinetuneNet, *, lr_backbone: float, lr_head: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in up to four named groups: backbone/head x decay/no decay.

    1-D parameters (biases, norm weights and scales) get no weight decay; empty groups are left out.
    """
    groups = []
    for part, module, lr in (("backbone", net.body, lr_backbone), ("head", net.head, lr_head)):
        trainable = [p for p in module.parameters() if p.requires_grad]
        for suffix, members, decay in (("", [p for p in trainable if p.ndim > 1], weight_decay),
                                       ("_no_decay", [p for p in trainable if p.ndim <= 1], 0.0)):
            if members:
                groups.append({"params": members, "lr": lr, "weight_decay": decay, "name": part + suffix})
    return groups


def current_lr(optimizer: torch.optim.Optimizer, part: str) -> float:
    """The learning rate now used for `part` ("backbone" or "head"); 0.0 when it has no trainable parameters."""
    return next((g["lr"] for g in optimizer.param_groups if g["name"].startswith(part)), 0.0)


def build_optimizer(groups: list[dict[str, Any]], params: FinetuneParams) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum or AdamW over `groups`, as `finetune.optimizer` says."""
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr_head, momentum=params.momentum, nesterov=params.momentum > 0)
    return torch.optim.AdamW(groups, lr=params.lr_head)


def warmup_cosine(*, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor for optimizer step `s` (0-based): linear warmup to 1 over `warmup_steps`, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))
    return factor


# ------------------------------------------------------------------------------------------------- loop
@dataclass(frozen=True)
class EpochRecord:
    """One epoch (1-based): train loss (the label-smoothed objective) and accuracy on the augmented images, in
    train mode; selection loss (plain cross-entropy, nats) and accuracy on the selection rows (never the held-out
    split), float32 in eval mode; the learning rates of the epoch's first step; wall seconds of training +
    selection scoring."""
    epoch: int
    train_loss: float
    train_accuracy: float
    selection_loss: float
    selection_accuracy: float
    lr_backbone: float
    lr_head: float
    seconds: float


@dataclass(frozen=True)
class FinetuneResult:
    """What run_finetune did: every epoch's record, the chosen one, and how the run went."""
    history: list[EpochRecord]
    best_epoch: int
    stopped_early: bool
    resumed_from: int  # epochs already done when this run started (0: fresh)
    precision: str
    precision_choice: dict[str, Any]  # why `precision` was chosen (capabilities), from the first session


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision at `precision` (a stages.hardware.DTYPES name); off for float32."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train_one_epoch(net: FinetuneNet, loader: torch.utils.data.DataLoader, *, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, criterion: nn.Module,
                    scaler: torch.amp.GradScaler, device: torch.device, precision: str,
                    grad_clip: float | None, desc: str = "train", model: nn.Module | None = None,
                    ddp: Distributed = SINGLE) -> tuple[float, float]:
    """One pass over `loader` with one optimizer and scheduler step per batch; returns (mean loss, accuracy), over
    all processes under DDP. `model`: what runs the forward pass (the DistributedDataParallel wrapper of `net`)."""
    forward = model if model is not None else net
    forward.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels, _ in progress(loader, desc=desc, unit="batch", leave=False):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = forward(images)
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(trainable, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    total_loss, correct, seen = sum_over_ranks([total_loss, correct, seen], ddp, device)
    return total_loss / seen, correct / seen


@torch.inference_mode()
def predict_proba(net: FinetuneNet, loader: torch.utils.data.DataLoader, *,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [N, K] (float64, float32 forward in eval mode) and labels [N] in loader order."""
    net.eval()
    probs, labels = [], []
    for images, batch_labels, _ in progress(loader, desc="eval", unit="batch", leave=False):
        logits = net(images.to(device, non_blocking=True)).float()
        probs.append(torch.softmax(logits.double(), 1).cpu().numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(probs), np.concatenate(labels).astype(np.int64)


def _loss_accuracy(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy of probabilities [N, K] against labels [N]."""
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1.0)
    return float(-np.log(picked).mean()), float((probs.argmax(1) == labels).mean())


class CurveLogger:
    """Per-epoch curves for DVC plots, written by `dvclive.Live` into `<dir>`:
    `plots/metrics/{train,selection}/{loss,accuracy}.tsv` and `plots/metrics/lr/{backbone,head}.tsv`, columns `step`
    (= epoch, 1-based) and the value, one row per epoch; and Live's summary `metrics.json` (the last logged epoch's
    values and its step: not a stage metric, the chosen epoch's are in the stage's own metrics.json). Both are
    declared outputs in dvc.yaml. The held-out split has no curve: it is scored once, for the chosen epoch.

    Live starts afresh (resume=False: it removes the curves and summary of an earlier run) and a resumed fine-tune
    replays the checkpoint's history before its new epochs, so the rows are exactly the checkpoint's epochs, with
    no duplicate, whatever an interrupted run left behind (`dvc repro` deletes the curves before the stage runs;
    they are not `persist`). No dvc.yaml, report, params file or experiment of its own (save_dvc_exp=False: the
    pipeline's `dvc exp run` is the experiment). A context manager: leaving it calls Live.end(). Rank 0 only.

    In a Git repository without commits (`git init; dvc init; dvc repro`) Live fails while reading the Git HEAD,
    even with save_dvc_exp=False (dvclive 3.49, treeverse/dvclive#522); there is no experiment to join then, so
    Live is created from a folder outside any repository and writes the same files.
    """

    def __init__(self, directory: Path) -> None:
        from dvclive import Live
        from scmrepo.exceptions import SCMError

        options: dict[str, Any] = {"resume": False, "report": None, "save_dvc_exp": False, "dvcyaml": None}
        try:
            self._live = Live(dir=str(directory), **options)
        except SCMError as error:
            logger.info("dvclive cannot use this Git repository (%s); logging the curves without it", error)
            directory = directory.absolute()
            with tempfile.TemporaryDirectory() as outside, contextlib.chdir(outside):
                self._live = Live(dir=str(directory), **options)

    def __call__(self, record: EpochRecord) -> None:
        values = {"train/loss": record.train_loss, "train/accuracy": record.train_accuracy,
                  "selection/loss": record.selection_loss, "selection/accuracy": record.selection_accuracy,
                  "lr/backbone": record.lr_backbone, "lr/head": record.lr_head}
        self._live.step = record.epoch
        for name, value in values.items():
            self._live.log_metric(name, value)
        self._live.next_step()

    def __enter__(self) -> CurveLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._live.end()


@dataclass
class TrainState:
    """Where a run stands after `done` epochs; what last.pt records, and what a resumed run starts from."""
    precision: str
    precision_choice: dict[str, Any]
    done: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"epoch", "accuracy", "loss"} of the best epoch so far (selection rows)
    bad_epochs: int = 0  # epochs since the best one
    stopped: bool = False


@dataclass(frozen=True)
class Trainer:
    """What every epoch of one run trains with; `model` runs the forward pass (DistributedDataParallel under DDP)."""
    net: FinetuneNet
    model: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    params: FinetuneParams
    device: torch.device
    ddp: Distributed
    last_path: Path
    best_path: Path
    fingerprint: str
    loader_generator: torch.Generator


def build_schedule(net: FinetuneNet, params: FinetuneParams, *, steps_per_epoch: int,
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over `net`'s trainable parameter groups and its per-step warmup + cosine schedule."""
    optimizer = build_optimizer(param_groups(net, lr_backbone=params.lr_backbone, lr_head=params.lr_head,
                                             weight_decay=params.weight_decay), params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        warmup_steps=round(params.warmup_epochs * steps_per_epoch), total_steps=params.epochs * steps_per_epoch))
    return optimizer, scheduler


def start_state(checkpoint: dict[str, Any] | None, precision: str | Callable[[], tuple[str, dict[str, Any]]], *,
                net: FinetuneNet, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, ddp: Distributed, source: Path,
                epochs: int) -> TrainState:
    """A fresh state (`precision` called when it is a callable; under DDP rank 0's choice for every rank), or the
    checkpoint's, with the model, optimizer and scheduler restored from it."""
    if checkpoint is None:
        precision, choice = precision() if callable(precision) else (precision, {"requested": precision})
        if ddp.world_size > 1:  # rank 0's choice, so that every rank trains alike
            chosen = [precision, choice]
            dist.broadcast_object_list(chosen, src=0)
            precision, choice = chosen
        return TrainState(precision, choice)
    net.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    state = TrainState(checkpoint["precision"], checkpoint["precision_choice"], done=checkpoint["epoch"],
                       history=[EpochRecord(**record) for record in checkpoint["history"]], best=checkpoint["best"],
                       bad_epochs=checkpoint["bad_epochs"], stopped=checkpoint["stopped"])
    logger.info("resuming from %s after epoch %d of %d (best epoch %s)", source, state.done, epochs,
                state.best and state.best["epoch"])
    return state


def run_epoch(trainer: Trainer, epoch: int, precision: str, train_loader: torch.utils.data.DataLoader,
              selection_loader: torch.utils.data.DataLoader) -> EpochRecord:
    """Train epoch `epoch` (0-based) and score the selection rows; the record of epoch `epoch + 1`."""
    start = time.perf_counter()
    lrs = {part: current_lr(trainer.optimizer, part) for part in ("backbone", "head")}
    if isinstance(train_loader.sampler, DistributedSampler):
        train_loader.sampler.set_epoch(epoch)
    train_loss, train_accuracy = train_one_epoch(
        trainer.net, train_loader, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
        criterion=trainer.criterion, scaler=trainer.scaler, device=trainer.device, precision=precision,
        grad_clip=trainer.params.grad_clip, desc=f"epoch {epoch + 1}", model=trainer.model, ddp=trainer.ddp)
    sel_loss, sel_accuracy = _loss_accuracy(*predict_proba(trainer.net, selection_loader, device=trainer.device))
    return EpochRecord(
        epoch=epoch + 1, train_loss=train_loss, train_accuracy=train_accuracy, selection_loss=sel_loss,
        selection_accuracy=sel_accuracy,
        lr_backbone=lrs["backbone"], lr_head=lrs["head"], seconds=time.perf_counter() - start)


def keep_epoch(trainer: Trainer, state: TrainState, record: EpochRecord) -> None:
    """Add `record` to `state`: best epoch, early-stopping counters; rank 0 saves best.pt (when it is the best so
    far) and last.pt. A collective under DDP (every rank's RNG states go into last.pt)."""
    net, ddp, epoch = trainer.net, trainer.ddp, record.epoch
    state.history.append(record)
    if state.best is None or (record.selection_accuracy, -record.selection_loss) > \
            (state.best["accuracy"], -state.best["loss"]):
        state.best = {"epoch": epoch, "accuracy": record.selection_accuracy, "loss": record.selection_loss}
        state.bad_epochs = 0
        if ddp.is_main:
            save_checkpoint(trainer.best_path, {"version": CHECKPOINT_VERSION, "fingerprint": trainer.fingerprint,
                                                "epoch": epoch, "selection": state.best, "model": net.state_dict()})
    else:
        state.bad_epochs += 1
    state.stopped = state.bad_epochs >= trainer.params.patience and epoch < trainer.params.epochs
    state.done = epoch
    rngs = rank_states(rng_state(trainer.loader_generator), ddp)
    if ddp.is_main:
        save_checkpoint(trainer.last_path, {
            "version": CHECKPOINT_VERSION, "fingerprint": trainer.fingerprint, "epoch": epoch,
            "precision": state.precision, "precision_choice": state.precision_choice, "model": net.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "rng": rngs[0], **({"rng_by_rank": rngs} if ddp.world_size > 1 else {}),
            "best": state.best, "bad_epochs": state.bad_epochs, "stopped": state.stopped,
            "history": [asdict(r) for r in state.history]})
    barrier(ddp)  # the checkpoints are complete before any rank may read them


def train_epochs(trainer: Trainer, state: TrainState, train_loader: torch.utils.data.DataLoader,
                 selection_loader: torch.utils.data.DataLoader, log_epoch: Callable[[EpochRecord], None]) -> None:
    """The epochs from `state.done` to `finetune.epochs`, or until early stopping."""
    params = trainer.params
    epochs = progress(range(state.done, params.epochs), desc="epochs", unit="epoch", initial=state.done,
                      total=params.epochs)
    for epoch in epochs:
        if state.stopped:
            break
        record = run_epoch(trainer, epoch, state.precision, train_loader, selection_loader)
        keep_epoch(trainer, state, record)
        logger.info("epoch %d/%d: train loss %.4f acc %.4f | selection loss %.4f acc %.4f | %.1fs%s", epoch + 1,
                    params.epochs, record.train_loss, record.train_accuracy, record.selection_loss,
                    record.selection_accuracy, record.seconds, " | best" if state.best["epoch"] == epoch + 1 else "")
        log_epoch(record)
        if state.stopped:
            logger.info("early stopping: no selection improvement for %d epochs (best epoch %d)", state.bad_epochs,
                        state.best["epoch"])


def run_finetune(net: FinetuneNet, train_loader: torch.utils.data.DataLoader,
                 selection_loader: torch.utils.data.DataLoader, *, params: FinetuneParams, checkpoint_dir: Path,
                 fingerprint: str, loader_generator: torch.Generator, device: torch.device,
                 precision: str | Callable[[], tuple[str, dict[str, Any]]],
                 log_epoch: Callable[[EpochRecord], None] = lambda record: None,
                 ddp: Distributed = SINGLE) -> FinetuneResult:
    """Train `net` (regime already applied) for up to `params.epochs` epochs; keep best.pt and last.pt.

    The best epoch (highest selection accuracy, ties: lower selection loss) and early stopping are decided on
    `selection_loader` alone: the selection rows, never the held-out split.

    With `params.resume` and a last.pt of the same `fingerprint`, every state (model, optimizer, scheduler,
    grad scaler, RNGs, early-stopping counters, history, precision) is restored and training continues, so the
    result equals an uninterrupted run. `precision` may be a callable returning (precision, why), called only
    when starting fresh (the stage's resolve_precision).
    `log_epoch` gets each epoch's record (first the ones replayed from the checkpoint), after last.pt is saved.
    Under DDP (`ddp`, from init_distributed) every rank calls this: the forward runs through a
    DistributedDataParallel wrapper, rank 0 alone writes and logs, and last.pt holds every rank's RNG states.
    On return `net` holds the best epoch's weights.
    """
    net.to(device)
    model = None
    if ddp.world_size > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    optimizer, scheduler = build_schedule(net, params, steps_per_epoch=len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    checkpoint = take_up_checkpoint(last_path, best_path, fingerprint=fingerprint, resume=params.resume, ddp=ddp)
    state = start_state(checkpoint, precision, net=net, optimizer=optimizer, scheduler=scheduler, ddp=ddp,
                        source=last_path, epochs=params.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=state.precision == "float16")
    if checkpoint is not None:
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng_by_rank"][ddp.rank] if ddp.world_size > 1 else checkpoint["rng"],
                          loader_generator)
    if not ddp.is_main:
        log_epoch = lambda record: None  # noqa: E731 - rank 0 alone writes the curves
    for record in state.history:
        log_epoch(record)
    trainer = Trainer(net, model, optimizer, scheduler, criterion, scaler, params, device, ddp, last_path, best_path,
                      fingerprint, loader_generator)
    train_epochs(trainer, state, train_loader, selection_loader, log_epoch)
    net.load_state_dict(load_checkpoint(best_path)["model"])
    return FinetuneResult(history=state.history, best_epoch=state.best["epoch"], stopped_early=state.stopped,
                          resumed_from=0 if checkpoint is None else checkpoint["epoch"], precision=state.precision,
                          precision_choice=state.precision_choice)
