"""What a fine-tune trains on (stages/finetune.py): which manifest rows train, which choose the epoch and which are
held out (stages/evaluation.py's protocol), and the loaders that feed them.

Loaders draw their order and worker seeds from one torch.Generator whose state is checkpointed
(stages/checkpoints.py), or under DDP from a DistributedSampler; `finetune.batch_size` is the effective batch,
split evenly across processes.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch.utils.data.distributed import DistributedSampler

from stages.backbones import Preprocess
from stages.evaluation import ProtocolError, heldout_split
from stages.finetune_net import FinetuneError
from stages.hardware import available_cores
from stages.images import ManifestRow


# ---------------------------------------------------------------------------------------------- loaders
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
