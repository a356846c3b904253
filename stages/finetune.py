"""Fine-tune stage (optional, `finetune@<bb>`): train a backbone + linear classifier end to end.

Off by default: dvc.yaml makes one `finetune@<bb>` stage per name in params.yaml `finetune.backbones` (empty by
default, so none). Turn it on with `dvc exp run -S 'finetune.backbones=[efficientnet_lite0]'` or by editing
params.yaml; each name must also be in `backbones` (the stage needs its verified weights and its linear probe).

Regimes (`finetune.regime`):
- `head`: only the new classifier trains; the whole backbone is frozen and in eval mode.
- `partial`: the module named by `finetune.unfreeze_from` (e.g. `blocks.5` for efficientnet_lite*, `layer4` for
  resnets) and every module after it train; "after" is `named_modules()` order (registration order, which is the
  forward order of every registered backbone). Earlier modules are frozen AND kept in eval mode, so their
  BatchNorm running statistics never change.
- `full`: everything trains.

`finetune.init_head: probe` starts the classifier from the linear probe the head stage exported
(models/<backbone>/classifier.pt, scaler folded into weight/bias): LP-FT. `random` starts from a seeded init.
Before any update the net computes exactly the probe (tests/test_finetune.py checks it in eval and in train mode);
its held-out predictions are the `probe` row of predictions.json.

Why fine-tuning used to lose the probe it started from (measured on pbc_blood_cells, efficientnet_lite0, partial
from blocks.5, 64 train images through the probe-initialised net before any step: loss / accuracy):
  eval mode, centre crop (= the probe)         0.02 / 1.00
  BatchNorm in train mode, centre crop       147    / 0.14   <- the cause
  eval mode, RandomResizedCrop(0.08-1)+flip    6.4  / 0.72   <- the second cause
  both (the old recipe)                      153    / 0.17   (epoch 1 train loss 22.5 on pbc, 10.4 on hymenoptera)
The folded probe has huge weights where a feature barely varies (|W| mean 0.7, max 666; feature std median 0.1):
exact on the features it was fit on, but BatchNorm re-estimating statistics on each batch of 32 shifts every
feature, and those weights turn the shift into logits tens of nats off; the first updates then destroy the probe.
Refactoring the fold into an explicit standardize + linear layer computes the same function (same sensitivity), so
the fix is elsewhere: `finetune.batchnorm: frozen` (default) keeps every BatchNorm layer on its pretrained running
statistics (affine weights still train), and `finetune.crop_scale` (default [0.35, 1]) keeps crops close to the
centre-crop view the probe was fit on (0.35-1: loss 0.30 / 0.89; 0.6-1: 0.13 / 1.00).

Default recipe (params.yaml), chosen on both development datasets with efficientnet_lite0 on CPU: partial from
blocks.5, AdamW at 1e-4 for backbone and head alike (the probe is already trained), 5 epochs, frozen BatchNorm,
crops of 35-100% of the area. pbc_blood_cells (test, 240 images): 0.958 [0.925, 0.977] from the probe's 0.888
[0.841, 0.922], above its interval; hymenoptera (val, 153 images): 0.941 [0.892, 0.969] from 0.948 [0.900, 0.973],
not better (ImageNet-like images, the probe is near its ceiling). Unfreezing from blocks.4 at 2e-4 for 4 epochs
gave 0.963 on pbc but 0.908 on hymenoptera. metrics.json `gain_over_start` says whether a run beat its start.

Protocol (stages/evaluation.py): the held-out split is `test` when the manifest has test rows, else `val`; it is
scored at step 0 (the probe) and once for the chosen epoch, and never chooses anything. The epoch (best.pt) and
early stopping are decided on the selection rows: `val` when test is held out (val is then not reported), else a
seeded stratified slice of train (`finetune.selection_fraction`, at least one image per class) that then does not
train. metrics.json records which (`selection`).

Training: AdamW or SGD with momentum over four parameter groups (backbone/head x decay/no decay; biases and
norm weights get no weight decay), per-step linear warmup then cosine decay, label smoothing, gradient clipping,
RandomResizedCrop (`crop_scale`) + flip, mixed precision chosen from capability alone, never a timing (CUDA: bf16
or fp16 autocast; CPU: bf16 where the CPU has it natively, else fp32). Each epoch logs train and selection loss and
accuracy with dvclive, keeps the best checkpoint (selection accuracy, ties broken by lower selection loss) and the
last one (model, optimizer, scheduler, grad scaler, every RNG state, history); `finetune.resume: true` continues
from the last checkpoint with the same result as an uninterrupted run. Early stopping after `finetune.patience`
epochs without improvement.

Several GPUs or processes: the same command under `torchrun --nproc_per_node N` (`make finetune-ddp NPROC=N`) trains
with DistributedDataParallel: NCCL on GPUs (one process per GPU), gloo on CPU. `finetune.batch_size` stays the
effective batch: each process takes `batch_size / N` images per step (batch_size must be divisible by N), the
train split is sharded by a DistributedSampler (reshuffled each epoch from `finetune.seed`), gradients are averaged
across processes, so the steps per epoch, the LR schedule and the effective batch do not change with N. Each process
augments with its own seed (`seed + rank`); BatchNorm statistics are per process (no SyncBatchNorm) and synced from
rank 0 at each forward (with `batchnorm: frozen` nothing is re-estimated). Every process scores the whole selection
split (the models are identical, so all take the same best-epoch and early-stopping decisions); only rank 0 scores
the held-out split and writes: checkpoints, curves, metrics, predictions and the export.
Resume works as without DDP (each rank's RNG states are in last.pt); N is part of the checkpoint's fingerprint.

Outputs (`--out models/finetune/<bb>`, `--reports reports/finetune/<bb>`): <out>/classifier.pt and
<out>/classifier.onnx (stages/export.py, as the head stage writes them, so `stages.predict` works with either),
<out>/checkpoints/{last,best}.pt, <reports>/metrics.json
(`heldout`: classification_metrics with the 95% interval, `heldout_split`, `selection`, `probe_heldout`,
`gain_over_start`, cost), <reports>/predictions.json (held-out rows `finetune` and `probe`, stages/evaluation.py),
<reports>/live/ (dvclive.Live: the per-epoch curves in plots/metrics/ and its summary metrics.json).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.v2 as T
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from stages.backbones import (Backbone, Preprocess, WeightsError, build_model, classifier_path, get_backbone,
                              input_size_for, load_weights, module_version, replace_module, with_input_size)
from stages.evaluation import Predictions, ProtocolError, heldout_split, predictions_from_proba, write_predictions
from stages.hardware import DTYPES, available_cores, read_cpu_capability
from stages.images import (ImageDataset, ImageDecodeError, ManifestRow, StatsError, dataset_preprocess, eval_dataset,
                           read_manifest)
from stages.io import (atomic_path, progress, read_json, remove_stale_temporaries, setup_logging, sha256_file,
                       write_json)
from stages.metrics import classification_metrics
from stages.params import FinetuneParams, ParamError, load_params
from stages.export import (PREPROCESS_KEYS, ExportError, build_export, load_export, onnx_path_for, read_sample_images,
                           save_export, save_onnx)

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2


class FinetuneError(RuntimeError):
    """Inputs or settings do not allow fine-tuning; the message says which file or parameter and why."""


# ------------------------------------------------------------------------------------------------ model
class FinetuneNet(nn.Module):
    """`body` maps images [B, 3, H, W] to pooled embeddings [B, D]; `head` (nn.Linear) maps them to logits [B, K].

    `frozen` lists body modules that stay in eval mode whenever the net is put in train mode (their
    BatchNorm statistics and dropout behave as at inference). `freeze_norm_stats`: every BatchNorm layer of the
    body also stays in eval mode (normalizes with its running statistics, which never change; its affine weight
    and bias still train where the regime trains them). `l2_normalize`: embeddings are scaled to L2 norm sqrt(D)
    before the head (a probe fit with head.normalization l2 or l2+standardize).
    """

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.frozen: tuple[str, ...] = ()
        self.freeze_norm_stats = False
        self.l2_normalize = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = self.body(images).flatten(1)
        if self.l2_normalize:
            norm = embeddings.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
            embeddings = embeddings * (embeddings.shape[1] ** 0.5 / norm).to(embeddings.dtype)
        return self.head(embeddings)

    def train(self, mode: bool = True) -> FinetuneNet:
        super().train(mode)
        if mode:
            for name in self.frozen:
                (self.body.get_submodule(name) if name else self.body).train(False)
            if self.freeze_norm_stats:
                for module in self.body.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.train(False)
        return self


def build_finetune_net(backbone: Backbone, weights_path: str | Path, num_classes: int) -> FinetuneNet:
    """The backbone with verified weights and its ImageNet classifier replaced by a new nn.Linear(D, num_classes).

    The new head is initialised from the global torch RNG (seed first).
    """
    model = build_model(backbone)
    load_weights(model, backbone, weights_path)
    path = classifier_path(backbone, model)
    old = model.get_submodule(path)
    if not isinstance(old, nn.Linear):
        raise FinetuneError(f"{backbone.name}: the classifier {path!r} is a {type(old).__name__}, not nn.Linear; "
                            f"cannot read the embedding size")
    replace_module(model, path, nn.Identity())
    return FinetuneNet(model, nn.Linear(old.in_features, num_classes))


def init_head_from_probe(net: FinetuneNet, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a linear probe's weight [K, D] and bias [K] into the head (a binary probe's [1, D] is made [2, D])."""
    weight, bias = weight.float(), bias.float().reshape(-1)
    if weight.shape[0] == 1 and net.head.out_features == 2:  # sigmoid(z) == softmax([-z/2, z/2])[1]
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    if tuple(weight.shape) != tuple(net.head.weight.shape) or bias.shape != net.head.bias.shape:
        raise FinetuneError(f"the probe's linear layer is {tuple(weight.shape)} but the fine-tune head needs "
                            f"{tuple(net.head.weight.shape)} (classes x embedding size)")
    with torch.no_grad():
        net.head.weight.copy_(weight)
        net.head.bias.copy_(bias)


def apply_regime(net: FinetuneNet, regime: str, unfreeze_from: str, *, batchnorm: str = "frozen",
                 suggestions: Sequence[str] = ()) -> dict[str, int]:
    """Set `requires_grad`, the eval-mode list `net.frozen` and `net.freeze_norm_stats` (`batchnorm` "frozen")
    for `regime`; return parameter counts.

    partial: parameters owned by `unfreeze_from` and every module after it in `named_modules()` order train;
    parameters owned by earlier modules (including the containers above `unfreeze_from`) are frozen, and every
    earlier module that is not such a container stays in eval mode.
    """
    body_modules = list(net.body.named_modules())
    if regime == "full":
        first = 0
    elif regime == "head":
        first = len(body_modules)
    else:
        names = [name for name, _ in body_modules]
        if unfreeze_from not in names:
            hint = ", ".join(suggestions) or ", ".join(n for n, _ in net.body.named_children())
            raise FinetuneError(f"finetune.unfreeze_from must name a module of the backbone, e.g. {hint}; "
                                f"got {unfreeze_from!r}. Edit params.yaml.")
        first = names.index(unfreeze_from)
    target = body_modules[first][0] if first < len(body_modules) else None
    frozen = []
    for index, (name, module) in enumerate(body_modules):
        trainable = index >= first
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(trainable)
        is_ancestor = target is not None and (name == "" or target.startswith(name + "."))
        if not trainable and not is_ancestor and not any(name.startswith(f + ".") or f == "" for f in frozen):
            frozen.append(name)
    for parameter in net.head.parameters():
        parameter.requires_grad_(True)
    net.frozen = tuple(frozen)
    net.freeze_norm_stats = batchnorm == "frozen"
    count = {True: 0, False: 0}
    for parameter in net.parameters():
        count[parameter.requires_grad] += parameter.numel()
    return {"trainable_parameters": count[True], "frozen_parameters": count[False]}


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


# -------------------------------------------------------------------------------------------- precision
def resolve_precision(requested: str, device: torch.device) -> tuple[str, dict[str, Any]]:
    """Pick the training dtype name from what the hardware can do natively (never from a timing, so the numbers a
    run gives do not depend on how busy the machine was); return it and the facts behind the choice.

    auto: CUDA -> bf16 where supported, else fp16 (with a GradScaler); CPU -> bf16 where the CPU has native bf16
    (stages.hardware), else fp32.
    """
    info: dict[str, Any] = {"requested": requested, "rule": "capability"}
    if device.type == "cuda":
        info["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
        if requested == "auto":
            requested = "bfloat16" if info["cuda_bf16"] else "float16"
        return requested, info
    if requested == "float16":
        raise FinetuneError("finetune.precision float16 needs a CUDA device; on CPU use auto, float32 or "
                            "bfloat16. Edit params.yaml.")
    info["cpu_native_bf16"] = bool(read_cpu_capability()["native_bfloat16"])
    if requested == "bfloat16" and not info["cpu_native_bf16"]:
        logger.warning("finetune.precision bfloat16 on a CPU without native bf16: expect it to be slow")
    if requested != "auto":
        return requested, info
    return ("bfloat16" if info["cpu_native_bf16"] else "float32"), info


# ------------------------------------------------------------------------------------------------- data
def resolve_workers(num_workers: int | str, world_size: int = 1) -> int:
    """`auto`: one decoding worker per core beyond the one that trains (at most 4; 0 on a single core); under DDP
    per process, from its share of the cores."""
    if num_workers != "auto":
        return int(num_workers)
    return max(0, min(4, available_cores() // world_size - 1))


def train_augmentation(preprocess: Preprocess, crop_scale: Sequence[float]) -> T.Compose:
    """PIL RGB -> float32 [3, S, S]: RandomResizedCrop keeping `crop_scale` (min, max) of the image area, then a
    horizontal flip, then the eval scaling and normalization. [1, 1] keeps the whole image (resized to S x S)."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(preprocess.input_size, scale=(float(crop_scale[0]), float(crop_scale[1])),
                            interpolation=T.InterpolationMode(preprocess.interpolation), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(preprocess.mean), list(preprocess.std)),
    ])


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy and random follow the per-worker torch seed the loader derived."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: torch.utils.data.Dataset, *, batch_size: int, shuffle: bool, num_workers: int,
                generator: torch.Generator, sampler: DistributedSampler | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader whose order and worker seeds come only from `generator` (its state is checkpointed), or under
    DDP whose order comes from `sampler` (this rank's shard, reshuffled per epoch by `set_epoch`)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, generator=generator, worker_init_fn=_seed_worker,
        pin_memory=torch.cuda.is_available(), persistent_workers=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    """Every RNG state as tensors and plain values (loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
            "loader": loader_generator.get_state()}


def restore_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    loader_generator.set_state(state["loader"])


# ------------------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; world_size 1 is a plain single process."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes (checkpoints, curves, metrics, the export)."""
        return self.rank == 0


SINGLE = Distributed()


def init_distributed() -> Distributed:
    """Join the torchrun job described by $WORLD_SIZE, $RANK and $LOCAL_RANK (NCCL with CUDA, one GPU per process;
    gloo on CPU); without torchrun (or with one process) a plain single process, SINGLE."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size)


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    """`finetune.batch_size` is the effective batch of one optimizer step: each of `world_size` processes takes
    batch_size / world_size images (gradients are averaged over processes)."""
    if batch_size % world_size:
        below = batch_size - batch_size % world_size
        raise FinetuneError(
            f"finetune.batch_size must be divisible by the number of processes ({world_size}): it is the effective "
            f"batch, split evenly across them; got {batch_size}. Edit params.yaml (e.g. `batch_size: "
            f"{below or world_size}`) or launch a number of processes that divides {batch_size}.")
    return batch_size // world_size


def _sum_over_ranks(values: Sequence[float], ddp: Distributed, device: torch.device) -> list[float]:
    """Element-wise sums over all processes (the values themselves without DDP)."""
    if ddp.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _rank_states(state: dict[str, Any], ddp: Distributed) -> list[dict[str, Any]]:
    """Every rank's `state` (a collective: all ranks call it), in rank order."""
    if ddp.world_size == 1:
        return [state]
    states: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(states, state)
    return states


def _barrier(ddp: Distributed) -> None:
    if ddp.world_size > 1:
        dist.barrier()


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
    history: list[EpochRecord]
    best_epoch: int
    stopped_early: bool
    resumed_from: int  # epochs already done when this run started (0: fresh)
    precision: str
    precision_choice: dict[str, Any]  # why `precision` was chosen (capabilities), from the first session


def autocast(device: torch.device, precision: str) -> torch.autocast:
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
    total_loss, correct, seen = _sum_over_ranks([total_loss, correct, seen], ddp, device)
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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically (a crash never leaves a half checkpoint)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: zip records named archive/..., not
        torch.save(state, fh)  # after the random temporary file, so the same state gives the same bytes


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


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
    when starting fresh (resolve_precision).
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
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(param_groups(net, lr_backbone=params.lr_backbone, lr_head=params.lr_head,
                                             weight_decay=params.weight_decay), params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        warmup_steps=round(params.warmup_epochs * steps_per_epoch), total_steps=params.epochs * steps_per_epoch))
    criterion = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)

    checkpoint = None
    if ddp.is_main:
        for stale in [*remove_stale_temporaries(last_path), *remove_stale_temporaries(best_path)]:
            logger.warning("removed %s, left by an interrupted checkpoint write", stale)
    if last_path.exists():
        checkpoint = load_checkpoint(last_path)
        if not params.resume:
            logger.info("finetune.resume is false: starting afresh over %s", last_path)
            checkpoint = None
        elif checkpoint.get("fingerprint") != fingerprint:
            logger.warning("%s was written with other data, weights, settings or code; starting afresh", last_path)
            checkpoint = None
    _barrier(ddp)  # every rank has read last.pt before rank 0 may remove it
    if checkpoint is None:
        if ddp.is_main:
            best_path.unlink(missing_ok=True)
            last_path.unlink(missing_ok=True)
        precision, choice = precision() if callable(precision) else (precision, {"requested": precision})
        if ddp.world_size > 1:  # rank 0's choice, so that every rank trains alike
            chosen = [precision, choice]
            dist.broadcast_object_list(chosen, src=0)
            precision, choice = chosen
        done, history, best, bad_epochs, stopped = 0, [], None, 0, False
    else:
        precision, choice = checkpoint["precision"], checkpoint["precision_choice"]
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        done, bad_epochs, stopped = checkpoint["epoch"], checkpoint["bad_epochs"], checkpoint["stopped"]
        best = checkpoint["best"]
        history = [EpochRecord(**record) for record in checkpoint["history"]]
        logger.info("resuming from %s after epoch %d of %d (best epoch %s)", last_path, done, params.epochs,
                    best and best["epoch"])
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "float16")
    if checkpoint is not None:
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng_by_rank"][ddp.rank] if ddp.world_size > 1 else checkpoint["rng"],
                          loader_generator)
    if not ddp.is_main:
        log_epoch = lambda record: None  # noqa: E731 - rank 0 alone writes the curves
    for record in history:
        log_epoch(record)

    epochs = progress(range(done, params.epochs), desc="epochs", unit="epoch", initial=done, total=params.epochs)
    for epoch in epochs:
        if stopped:
            break
        start = time.perf_counter()
        lrs = {part: current_lr(optimizer, part) for part in ("backbone", "head")}
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train_loss, train_accuracy = train_one_epoch(
            net, train_loader, optimizer=optimizer, scheduler=scheduler, criterion=criterion, scaler=scaler,
            device=device, precision=precision, grad_clip=params.grad_clip, desc=f"epoch {epoch + 1}",
            model=model, ddp=ddp)
        sel_loss, sel_accuracy = _loss_accuracy(*predict_proba(net, selection_loader, device=device))
        record = EpochRecord(
            epoch=epoch + 1, train_loss=train_loss, train_accuracy=train_accuracy, selection_loss=sel_loss,
            selection_accuracy=sel_accuracy,
            lr_backbone=lrs["backbone"], lr_head=lrs["head"], seconds=time.perf_counter() - start)
        history.append(record)
        if best is None or (sel_accuracy, -sel_loss) > (best["accuracy"], -best["loss"]):
            best, bad_epochs = {"epoch": epoch + 1, "accuracy": sel_accuracy, "loss": sel_loss}, 0
            if ddp.is_main:
                save_checkpoint(best_path, {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
                                            "epoch": epoch + 1, "selection": best, "model": net.state_dict()})
        else:
            bad_epochs += 1
        stopped = bad_epochs >= params.patience and epoch + 1 < params.epochs
        rngs = _rank_states(rng_state(loader_generator), ddp)
        if ddp.is_main:
            save_checkpoint(last_path, {
                "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "epoch": epoch + 1,
                "precision": precision, "precision_choice": choice, "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": rngs[0], **({"rng_by_rank": rngs} if ddp.world_size > 1 else {}),
                "best": best, "bad_epochs": bad_epochs, "stopped": stopped,
                "history": [asdict(r) for r in history]})
        _barrier(ddp)  # the checkpoints are complete before any rank may read them
        logger.info("epoch %d/%d: train loss %.4f acc %.4f | selection loss %.4f acc %.4f | %.1fs%s", epoch + 1,
                    params.epochs, train_loss, train_accuracy, sel_loss, sel_accuracy, record.seconds,
                    " | best" if best["epoch"] == epoch + 1 else "")
        log_epoch(record)
        if stopped:
            logger.info("early stopping: no selection improvement for %d epochs (best epoch %d)", bad_epochs,
                        best["epoch"])
    net.load_state_dict(load_checkpoint(best_path)["model"])
    return FinetuneResult(history=history, best_epoch=best["epoch"], stopped_early=stopped,
                          resumed_from=0 if checkpoint is None else checkpoint["epoch"], precision=precision,
                          precision_choice=choice)


# ------------------------------------------------------------------------------------- probe and export
@dataclass(frozen=True)
class Probe:
    """The head stage's linear probe as logits = g(features) @ weight.T + bias, where g scales each embedding to L2
    norm sqrt(D) when `l2_normalize`, else is the identity (feature standardization folded into weight/bias)."""
    weight: torch.Tensor  # [K, D] (or [1, D]: the logit of class 1 of a binary probe)
    bias: torch.Tensor  # [K] (or [1])
    kind: str
    sha256: str
    l2_normalize: bool = False


def probe_logits(head: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of logits from an exported linear head (stages/export.py format).

    softmax output: the scores are the logits. platt output (linear_svm): p_k = sigmoid(-(a_k s_k + b_k)), so
    the logit is -(a_k s_k + b_k) -- exact for two classes, the usual approximation for one-vs-rest.
    """
    weight, bias = head["weight"].double(), head["bias"].double().reshape(-1)
    if head.get("output", "softmax") == "platt":
        a, b = head["platt_a"].double().reshape(-1), head["platt_b"].double().reshape(-1)
        weight, bias = -a[:, None] * weight, -(a * bias + b)
    return weight, bias


def read_probe(path: Path, *, backbone: str, classes: Sequence[str], preprocess: Preprocess) -> Probe:
    """The head stage's export at `path`, checked to fit this fine-tune: same backbone, classes and
    preprocessing, the pooled layer alone, a linear head."""
    if not path.is_file():
        raise FinetuneError(f"{path} not found: finetune.init_head probe starts from the head stage's linear probe; "
                            f"run `dvc repro head@{backbone}` first or set `init_head: random` in params.yaml")
    try:
        export = load_export(path)  # weights_only=True: a pickled object is refused
    except ExportError as exc:
        raise FinetuneError(str(exc)) from None
    head, info = export.get("head") or {}, export.get("backbone") or {}
    layers = list(export.get("layers") or [export.get("layer")])  # format 2: "layers"; format 1: one "layer"
    found = {"backbone": info.get("name"), "classes": list(export.get("classes") or []), "layers": layers}
    expected = {"backbone": backbone, "classes": list(classes), "layers": ["pool"]}
    for key in expected:
        if found[key] != expected[key]:
            raise FinetuneError(f"{path}: {key} is {found[key]!r} but the fine-tune needs {expected[key]!r}; "
                                f"pass --probe models/{backbone}/classifier.pt, probe the pooled layer alone and "
                                f"re-run `dvc repro head@{backbone}`, or set `finetune.init_head: random`")
    recorded = info.get("preprocess")
    if recorded and {k: recorded.get(k) for k in PREPROCESS_KEYS} != preprocess.as_dict():
        raise FinetuneError(f"{path}: the probe was fit on features preprocessed as {recorded} but the fine-tune "
                            f"uses {preprocess.as_dict()}; re-run `dvc repro head@{backbone}`")
    if head.get("type", "linear") != "linear" or not isinstance(head.get("weight"), torch.Tensor):
        raise FinetuneError(f"{path}: a {head.get('kind')!r} head has no linear weight/bias to start from; use "
                            f"head.kind logreg, linear_svm or softmax, or set `finetune.init_head: random`")
    weight, bias = probe_logits(head)
    blocks = [int(d) for d in head.get("l2_blocks") or []]
    if blocks and blocks != [weight.shape[1]]:
        raise FinetuneError(f"{path}: l2_blocks {blocks} do not match the probe's {weight.shape[1]} features")
    return Probe(weight=weight, bias=bias, kind=str(head.get("kind")), sha256=sha256_file(path),
                 l2_normalize=bool(blocks))


def export_classifier(net: FinetuneNet, backbone: Backbone, *, preprocess: Preprocess, classes: Sequence[str],
                      provenance: dict[str, Any]) -> dict[str, Any]:
    """The classifier.pt dict (stages/export.py): the fine-tuned backbone's state (classifier removed) + a
    float64 linear softmax head; run in float32 without TTA, as the final evaluation ran."""
    head_spec: dict[str, Any] = {"kind": "finetune", "type": "linear", "output": "softmax",
                                 "weight": net.head.weight.detach().cpu().double(),
                                 "bias": net.head.bias.detach().cpu().double()}
    if net.l2_normalize:
        head_spec["l2_blocks"] = [net.head.in_features]
    return build_export(
        backbone_name=backbone.name,
        backbone_spec={"arch": backbone.arch, "classifier": classifier_path(backbone, build_model(backbone)),
                       "build_kwargs": dict(backbone.build_kwargs), "preprocess": preprocess.as_dict(),
                       "tta": ["none"], "precision": "float32"},
        backbone_state={k: v.detach().cpu().clone() for k, v in net.body.state_dict().items()},
        layers=["pool"], classes=classes, head_spec=head_spec,
        provenance={**provenance, "versions": {"torch": str(torch.__version__), "timm": module_version("timm")}})


# ------------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Rows:
    paths: list[str]
    labels: list[int]


@dataclass(frozen=True)
class SplitPlan:
    """Which manifest rows train, which choose the epoch, which are held out (stages/evaluation.py's protocol).

    heldout_split: "test" when the manifest has test rows, else "val"; its rows are only ever reported.
    selection_method: "val" (held-out split is test and val has rows) or "train_slice" (a seeded, stratified
    slice of train that then does not train)."""
    heldout_split: str
    selection_method: str
    train: Rows  # the rows that train (train less the slice when selection_method is train_slice)
    selection: Rows
    heldout: Rows
    split_counts: dict[str, int]  # {"n_train", "n_val", "n_test"}: the manifest's images per split


def train_slice(labels: Sequence[int], *, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices [M] of a stratified slice of `labels`: from each class round(fraction * n_class) rows, at
    least 1 and at most n_class - 1, drawn with numpy's default_rng(seed) (deterministic)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        picked.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def plan_splits(rows: Sequence[ManifestRow], classes: Sequence[str], *, selection_fraction: float,
                seed: int) -> SplitPlan:
    """Split the manifest's rows by the protocol; labels are checked to index `classes`."""
    by_split: dict[str, Rows] = {name: Rows([], []) for name in ("train", "val", "test")}
    for row in rows:
        if not 0 <= row.label < len(classes) or classes[row.label] != row.cls:
            raise FinetuneError(f"the manifest's {row.path} has label {row.label} ({row.cls!r}) that does not match "
                                f"classes.json {list(classes)}; re-run `dvc repro prepare`")
        by_split[row.split].paths.append(row.path)
        by_split[row.split].labels.append(row.label)
    try:
        heldout = heldout_split(np.array([row.split for row in rows]))
    except ProtocolError as exc:
        raise FinetuneError(str(exc)) from None
    train = by_split["train"]
    split_counts = {f"n_{name}": len(part.paths) for name, part in by_split.items()}
    if not train.paths:
        raise FinetuneError("the manifest has no train images; fine-tuning needs them. Re-run `dvc repro prepare`.")
    counts = np.bincount(train.labels, minlength=len(classes))
    if heldout == "test" and by_split["val"].paths:
        return SplitPlan(heldout, "val", train, by_split["val"], by_split["test"], split_counts)
    if counts.min() < 2:
        raise FinetuneError(f"fine-tuning chooses its epoch on a slice of train here (no val rows outside the held-out "
                            f"split), so every class needs at least 2 train images; {classes[int(counts.argmin())]!r} "
                            f"has {int(counts.min())}. Add images or give the dataset a val split.")
    picked = set(train_slice(train.labels, fraction=selection_fraction, seed=seed).tolist())
    keep = [i for i in range(len(train.paths)) if i not in picked]
    chosen = sorted(picked)
    return SplitPlan(heldout, "train_slice",
                     Rows([train.paths[i] for i in keep], [train.labels[i] for i in keep]),
                     Rows([train.paths[i] for i in chosen], [train.labels[i] for i in chosen]),
                     by_split[heldout], split_counts)


# ------------------------------------------------------------------------------------------------- main
def fingerprint_of(**facts: Any) -> str:
    """sha256 of everything that determines the training trajectory (a checkpoint resumes only on a match)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", required=True,
                        help="the backbone to fine-tune (one of params.yaml `finetune.backbones`)")
    parser.add_argument("--raw", type=Path, required=True, help="the dataset tree (data/raw)")
    parser.add_argument("--manifest", type=Path, required=True, help="data/prepared/manifest.csv")
    parser.add_argument("--weights", type=Path, required=True, help="models/pretrained/<backbone>.pth")
    parser.add_argument("--probe", type=Path, help="models/<backbone>/classifier.pt (for init_head: probe)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for classifier.pt and checkpoints/ (models/finetune/<backbone>)")
    parser.add_argument("--reports", type=Path, required=True,
                        help="folder for metrics.json, predictions.json and the dvclive curves in live/ "
                             "(reports/finetune/<backbone>)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def with_interval(metrics: dict[str, Any]) -> dict[str, Any]:
    """{"accuracy", "accuracy_ci_low", "accuracy_ci_high", "correct", "n"} of classification_metrics' output."""
    return {k: metrics[k] for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "correct", "n")}


def finetune_stage(args: argparse.Namespace) -> dict[str, Any] | None:
    """Everything main does, without the exception handling: returns the metrics written (None on the ranks
    other than 0 under torchrun: they train, rank 0 evaluates and writes)."""
    params = load_params(args.params)
    p = params.finetune
    ddp = init_distributed()
    batch_size = per_rank_batch_size(p.batch_size, ddp.world_size)
    if ddp.world_size > 1:
        logger.info("DDP rank %d of %d (%s): %d images per step of the effective batch %d; %s", ddp.rank,
                    ddp.world_size, dist.get_backend(), batch_size, p.batch_size,
                    "writes the checkpoints, curves, metrics and export" if ddp.is_main else "writes nothing")
    backbone = get_backbone(args.backbone, params.weights.custom)
    classes = list(read_json(args.manifest.parent / "classes.json"))
    plan = plan_splits(read_manifest(args.manifest), classes, selection_fraction=p.selection_fraction, seed=p.seed)
    preprocess = with_input_size(  # what extract used, so the probe's features are the body's at step 0
        dataset_preprocess(backbone.preprocess, params.prepare.normalization, args.manifest.parent / "stats.json"),
        input_size_for(backbone.name, params.extract.input_size))
    weights_sha256 = sha256_file(args.weights)
    if backbone.weights.sha256 and weights_sha256 != backbone.weights.sha256:
        raise FinetuneError(f"{args.weights}: sha256 {weights_sha256} differs from the registry's "
                            f"{backbone.weights.sha256} for {backbone.name}; "
                            f"re-run `dvc repro weights@{backbone.name}`")
    probe = None
    if p.init_head == "probe":
        if args.probe is None:
            raise FinetuneError("finetune.init_head is probe but no --probe file was given")
        probe = read_probe(args.probe, backbone=backbone.name, classes=classes, preprocess=preprocess)

    seed_everything(p.seed)
    net = build_finetune_net(backbone, args.weights, len(classes))
    if probe is not None:
        init_head_from_probe(net, probe.weight, probe.bias)
        net.l2_normalize = probe.l2_normalize
    counts = apply_regime(net, p.regime, p.unfreeze_from, batchnorm=p.batchnorm, suggestions=backbone.layers)
    device = torch.device(f"cuda:{ddp.local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    workers = resolve_workers(p.num_workers, ddp.world_size)
    if ddp.world_size > 1:  # the same initial model everywhere (seeded above), then each rank its own augmentations
        seed_everything(p.seed + ddp.rank)
    generator = torch.Generator().manual_seed(p.seed + ddp.rank)
    train_set = ImageDataset(args.raw, plan.train.paths, plan.train.labels,
                             train_augmentation(preprocess, p.crop_scale))
    sampler = (DistributedSampler(train_set, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True,
                                  seed=p.seed) if ddp.world_size > 1 else None)
    train_loader = make_loader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                               generator=generator, sampler=sampler)
    eval_loaders = {name: make_loader(eval_dataset(args.raw, rows.paths, rows.labels, preprocess),
                                      batch_size=p.batch_size, shuffle=False, num_workers=workers,
                                      generator=torch.Generator().manual_seed(p.seed))
                    for name, rows in (("selection", plan.selection), ("heldout", plan.heldout))}
    manifest_sha256 = sha256_file(args.manifest)
    provenance = {"manifest_sha256": manifest_sha256, "weights_sha256": weights_sha256,
                  "probe_sha256": probe.sha256 if probe else None, "probe_kind": probe.kind if probe else None}
    fingerprint = fingerprint_of(
        params={k: v for k, v in asdict(p).items() if k not in ("backbones", "resume", "num_workers")},
        backbone=backbone.name, workers=workers, world_size=ddp.world_size,
        provenance=provenance, preprocess=preprocess.as_dict(), classes=classes, device=device.type,
        code=sha256_file(Path(__file__)))

    # Step 0: the net before any update. With init_head probe it computes the probe's predictions (the test suite
    # checks this), so these are the probe's held-out predictions for the paired comparison.
    start_proba = None
    if ddp.is_main:
        start_proba, heldout_labels = predict_proba(net.to(device), eval_loaders["heldout"], device=device)
    curves = CurveLogger(args.reports / "live") if ddp.is_main else contextlib.nullcontext(lambda record: None)
    with curves as log_epoch:  # rank 0 alone writes the curves
        result = run_finetune(net, train_loader, eval_loaders["selection"], params=p,
                              checkpoint_dir=args.out / "checkpoints", fingerprint=fingerprint,
                              loader_generator=generator, device=device,
                              precision=lambda: resolve_precision(p.precision, device), ddp=ddp, log_epoch=log_epoch)
    if not ddp.is_main:
        return None

    chosen = next(r for r in result.history if r.epoch == result.best_epoch)
    proba, _ = predict_proba(net.to(device), eval_loaders["heldout"], device=device)  # the chosen epoch's net
    heldout = classification_metrics(proba, heldout_labels, classes, ece_bins=params.head.ece_bins)
    start = classification_metrics(start_proba, heldout_labels, classes, ece_bins=params.head.ece_bins)
    metrics: dict[str, Any] = {
        "backbone": backbone.name, "head": "linear", "layer": "pool", "C": None,
        "regime": p.regime, "unfreeze_from": p.unfreeze_from if p.regime == "partial" else None,
        "init_head": p.init_head, "batchnorm": p.batchnorm, "crop_scale": list(p.crop_scale),
        "heldout_split": plan.heldout_split,
        "heldout": heldout,
        plan.heldout_split: heldout,  # the same numbers under the split's name (`val.accuracy` / `test.accuracy`)
        "selection": {"method": plan.selection_method, "n": len(plan.selection.paths), "epoch": chosen.epoch,
                      "accuracy": chosen.selection_accuracy, "loss": chosen.selection_loss},
        "probe_heldout" if probe is not None else "start_heldout": with_interval(start),
        # beyond_interval: the fine-tune's held-out accuracy is above the start's 95% interval (its upper end)
        "gain_over_start": {"accuracy": heldout["accuracy"] - start["accuracy"],
                            "beyond_interval": bool(heldout["accuracy"] > start["accuracy_ci_high"])},
        "train_seconds": round(sum(r.seconds for r in result.history), 3),
        "seconds_per_epoch": round(float(np.mean([r.seconds for r in result.history])), 3),
        "feature_dim": net.head.in_features, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from,
        "device": device.type, "precision": result.precision, "precision_choice": result.precision_choice,
        "num_workers": workers, "world_size": ddp.world_size, "per_process_batch_size": batch_size,
        **counts, **plan.split_counts, "n_fit": len(plan.train.paths), "n_selection": len(plan.selection.paths),
        "n_heldout": len(plan.heldout.paths),
        "features": {"backbone": backbone.name, "weights_sha256": weights_sha256, "manifest_sha256": manifest_sha256,
                     "preprocess": preprocess.as_dict(), "probe_sha256": provenance["probe_sha256"]},
    }
    net.cpu()
    export = export_classifier(net, backbone, preprocess=preprocess, classes=classes,
                               provenance={**provenance, "regime": p.regime, "best_epoch": result.best_epoch,
                                           "selection": metrics["selection"]})
    save_export(args.out / "classifier.pt", export)
    save_onnx(onnx_path_for(args.out / "classifier.pt"), export,  # checked on held-out images, as the head's
              images=read_sample_images(args.raw, plan.heldout.paths, preprocess))
    rows = {"finetune": predictions_from_proba(proba),
            "probe" if probe is not None else "start": predictions_from_proba(start_proba)}
    write_predictions(args.reports / "predictions.json", Predictions(
        split=plan.heldout_split, classes=classes, paths=list(plan.heldout.paths), labels=heldout_labels, rows=rows))
    write_json(args.reports / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        metrics = finetune_stage(args)
    except (ParamError, FinetuneError, StatsError, WeightsError, ImageDecodeError, KeyError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if metrics is None:  # a rank other than 0 under torchrun
        return 0
    start = metrics.get("probe_heldout") or metrics["start_heldout"]
    heldout = metrics["heldout"]
    logger.info("%s %s fine-tune: %d epochs (chosen %d on %s), %.1fs per epoch; %s accuracy %.4f [%.4f, %.4f] "
                "from %.4f [%.4f, %.4f] at the start%s", metrics["backbone"], metrics["regime"], metrics["epochs_run"],
                metrics["best_epoch"], metrics["selection"]["method"], metrics["seconds_per_epoch"],
                metrics["heldout_split"], heldout["accuracy"], heldout["accuracy_ci_low"], heldout["accuracy_ci_high"],
                start["accuracy"], start["accuracy_ci_low"], start["accuracy_ci_high"],
                "" if metrics["gain_over_start"]["beyond_interval"] else
                ": NOT better than the start by more than the interval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
