"""Fine-tune checkpoints (stages/finetune.py): models/finetune/<bb>/checkpoints/{last,best}.pt and every RNG state a
resumed run needs to continue exactly where an uninterrupted one would be.

A checkpoint is a plain dict of tensors and values, written atomically and read with torch.load(weights_only=True).
last.pt carries a `fingerprint` of everything that decides the training trajectory; a run takes it up only when
`finetune.resume` is on and the fingerprint matches, otherwise it starts afresh and removes both files.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.distributed import Distributed, barrier
from stages.io import atomic_path, remove_stale_temporaries

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically (a crash never leaves a half checkpoint)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: zip records named archive/..., not
        torch.save(state, fh)  # after the random temporary file, so the same state gives the same bytes


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's dict on the CPU (weights_only=True: a pickled object is refused)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def take_up_checkpoint(last_path: Path, best_path: Path, *, fingerprint: str, resume: bool,
                       ddp: Distributed) -> dict[str, Any] | None:
    """last.pt's state when training continues from it (`resume` on and the same `fingerprint`), else None, and then
    rank 0 removes best.pt and last.pt so that a fresh run starts clean. A collective under DDP: every rank calls it,
    and every rank has read last.pt before rank 0 may remove it. Rank 0 also removes the temporaries an interrupted
    checkpoint write left."""
    checkpoint = None
    if ddp.is_main:
        for stale in [*remove_stale_temporaries(last_path), *remove_stale_temporaries(best_path)]:
            logger.warning("removed %s, left by an interrupted checkpoint write", stale)
    if last_path.exists():
        checkpoint = load_checkpoint(last_path)
        if not resume:
            logger.info("finetune.resume is false: starting afresh over %s", last_path)
            checkpoint = None
        elif checkpoint.get("fingerprint") != fingerprint:
            logger.warning("%s was written with other data, weights, settings or code; starting afresh", last_path)
            checkpoint = None
    barrier(ddp)  # every rank has read last.pt before rank 0 may remove it
    if checkpoint is None and ddp.is_main:
        best_path.unlink(missing_ok=True)
        last_path.unlink(missing_ok=True)
    return checkpoint


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
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
    """Put back every RNG state `rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    loader_generator.set_state(state["loader"])
