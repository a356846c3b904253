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

Code: this module reads the inputs, runs the steps in order and writes the outputs; the pieces sit one floor down,
used by no other stage: stages/finetune_net.py (the net, the regime, the probe it starts from, the export),
stages/finetune_data.py (splits and loaders), stages/training.py (the loop), stages/checkpoints.py (last.pt, best.pt,
RNG states) and stages/distributed.py (torchrun).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from stages import checkpoints, distributed, finetune_data, finetune_net, training
from stages.backbones import Backbone, Preprocess, WeightsError, get_backbone, input_size_for, with_input_size
from stages.checkpoints import seed_everything
from stages.distributed import Distributed, init_distributed
from stages.evaluation import Predictions, predictions_from_proba, write_predictions
from stages.export import save_export
from stages.export_onnx import onnx_path_for, read_sample_images, save_onnx
from stages.finetune_data import (SplitPlan, make_loader, per_rank_batch_size, plan_splits, resolve_workers,
                                  train_augmentation)
from stages.finetune_net import (FinetuneError, FinetuneNet, Probe, apply_regime, build_finetune_net,
                                 export_classifier, init_head_from_probe, read_probe)
from stages.hardware import read_cpu_capability
from stages.images import ImageDataset, ImageDecodeError, StatsError, dataset_preprocess, eval_dataset, read_manifest
from stages.io import read_json, setup_logging, sha256_file, write_json
from stages.metrics import classification_metrics
from stages.params import FinetuneParams, Params, ParamError, load_params
from stages.training import CurveLogger, FinetuneResult, predict_proba, run_finetune

# Also importable from here, as before the fine-tune's pieces moved one floor down (tests and notebooks use them).
from stages.checkpoints import load_checkpoint  # noqa: F401
from stages.distributed import SINGLE  # noqa: F401
from stages.training import EpochRecord, build_optimizer, param_groups, warmup_cosine  # noqa: F401

logger = logging.getLogger(__name__)

# The fine-tune's own code: a checkpoint written by other code does not resume (part of the fingerprint).
CODE_MODULES = (finetune_net, finetune_data, training, checkpoints, distributed)


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


# ------------------------------------------------------------------------------------------------- main
def fingerprint_of(**facts: Any) -> str:
    """sha256 of everything that determines the training trajectory (a checkpoint resumes only on a match)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def code_sha256() -> dict[str, str]:
    """{module: sha256 of its file} for this stage module and the fine-tune's modules below it."""
    modules = (sys.modules[__name__], *CODE_MODULES)
    return {module.__name__: sha256_file(Path(module.__file__)) for module in modules}


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



@dataclass(frozen=True)
class StageInputs:
    """The checked inputs of one fine-tune: backbone, classes, the split plan, the preprocessing extract used, the
    verified weights' and the manifest's sha256, and the probe to start from (None with init_head random)."""
    backbone: Backbone
    classes: list[str]
    plan: SplitPlan
    preprocess: Preprocess
    weights_sha256: str
    manifest_sha256: str
    probe: Probe | None

    def provenance(self) -> dict[str, Any]:
        """What the fine-tune started from, for the fingerprint and the export."""
        return {"manifest_sha256": self.manifest_sha256, "weights_sha256": self.weights_sha256,
                "probe_sha256": self.probe.sha256 if self.probe else None,
                "probe_kind": self.probe.kind if self.probe else None}


def read_inputs(args: argparse.Namespace, params: Params) -> StageInputs:
    """Read and check the classes, manifest, weights (sha256 against the registry) and probe."""
    p = params.finetune
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
    return StageInputs(backbone, classes, plan, preprocess, weights_sha256, sha256_file(args.manifest), probe)


def build_net(inputs: StageInputs, args: argparse.Namespace, p: FinetuneParams) -> tuple[FinetuneNet, dict[str, int]]:
    """The seeded net (head from the probe or a seeded init) with the regime applied; its parameter counts."""
    seed_everything(p.seed)
    net = build_finetune_net(inputs.backbone, args.weights, len(inputs.classes))
    if inputs.probe is not None:
        init_head_from_probe(net, inputs.probe.weight, inputs.probe.bias)
        net.l2_normalize = inputs.probe.l2_normalize
    counts = apply_regime(net, p.regime, p.unfreeze_from, batchnorm=p.batchnorm, suggestions=inputs.backbone.layers)
    return net, counts


def training_device(ddp: Distributed) -> torch.device:
    """This process's GPU (deterministic cuDNN), else the CPU."""
    device = torch.device(f"cuda:{ddp.local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return device


def build_loaders(inputs: StageInputs, args: argparse.Namespace, p: FinetuneParams, *, ddp: Distributed,
                  batch_size: int, workers: int) -> tuple[torch.utils.data.DataLoader, dict[str, Any],
                                                          torch.Generator]:
    """The augmented train loader (this rank's shard under DDP), the selection and held-out eval loaders, and the
    generator the train loader draws from (its state is checkpointed)."""
    if ddp.world_size > 1:  # the same initial model everywhere (seeded before), then each rank its own augmentations
        seed_everything(p.seed + ddp.rank)
    generator = torch.Generator().manual_seed(p.seed + ddp.rank)
    plan = inputs.plan
    train_set = ImageDataset(args.raw, plan.train.paths, plan.train.labels,
                             train_augmentation(inputs.preprocess, p.crop_scale))
    sampler = (DistributedSampler(train_set, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True,
                                  seed=p.seed) if ddp.world_size > 1 else None)
    train_loader = make_loader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                               generator=generator, sampler=sampler)
    eval_loaders = {name: make_loader(eval_dataset(args.raw, rows.paths, rows.labels, inputs.preprocess),
                                      batch_size=p.batch_size, shuffle=False, num_workers=workers,
                                      generator=torch.Generator().manual_seed(p.seed))
                    for name, rows in (("selection", plan.selection), ("heldout", plan.heldout))}
    return train_loader, eval_loaders, generator


def heldout_metrics(inputs: StageInputs, result: FinetuneResult, params: Params, *, proba: np.ndarray,
                    start_proba: np.ndarray, labels: np.ndarray, facts: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the chosen epoch's held-out metrics, the start's (the probe at step 0), the gain, how the epoch
    was chosen, cost and provenance; `facts` are the run's counts and settings, appended as they are."""
    p, plan = params.finetune, inputs.plan
    chosen = next(r for r in result.history if r.epoch == result.best_epoch)
    heldout = classification_metrics(proba, labels, inputs.classes, ece_bins=params.head.ece_bins)
    start = classification_metrics(start_proba, labels, inputs.classes, ece_bins=params.head.ece_bins)
    return {
        "backbone": inputs.backbone.name, "head": "linear", "layer": "pool", "C": None,
        "regime": p.regime, "unfreeze_from": p.unfreeze_from if p.regime == "partial" else None,
        "init_head": p.init_head, "batchnorm": p.batchnorm, "crop_scale": list(p.crop_scale),
        "heldout_split": plan.heldout_split,
        "heldout": heldout,
        plan.heldout_split: heldout,  # the same numbers under the split's name (`val.accuracy` / `test.accuracy`)
        "selection": {"method": plan.selection_method, "n": len(plan.selection.paths), "epoch": chosen.epoch,
                      "accuracy": chosen.selection_accuracy, "loss": chosen.selection_loss},
        "probe_heldout" if inputs.probe is not None else "start_heldout": with_interval(start),
        # beyond_interval: the fine-tune's held-out accuracy is above the start's 95% interval (its upper end)
        "gain_over_start": {"accuracy": heldout["accuracy"] - start["accuracy"],
                            "beyond_interval": bool(heldout["accuracy"] > start["accuracy_ci_high"])},
        "train_seconds": round(sum(r.seconds for r in result.history), 3),
        "seconds_per_epoch": round(float(np.mean([r.seconds for r in result.history])), 3),
        **facts,
        "features": {"backbone": inputs.backbone.name, "weights_sha256": inputs.weights_sha256,
                     "manifest_sha256": inputs.manifest_sha256, "preprocess": inputs.preprocess.as_dict(),
                     "probe_sha256": inputs.probe.sha256 if inputs.probe else None},
    }


def write_outputs(inputs: StageInputs, args: argparse.Namespace, net: FinetuneNet, metrics: dict[str, Any], *,
                  regime: str, proba: np.ndarray, start_proba: np.ndarray, labels: np.ndarray) -> None:
    """classifier.pt and classifier.onnx (checked on held-out images, as the head's), predictions.json (rows
    finetune and probe/start) and metrics.json."""
    plan = inputs.plan
    net.cpu()
    export = export_classifier(net, inputs.backbone, preprocess=inputs.preprocess, classes=inputs.classes,
                               provenance={**inputs.provenance(), "regime": regime,
                                           "best_epoch": metrics["best_epoch"], "selection": metrics["selection"]})
    save_export(args.out / "classifier.pt", export)
    save_onnx(onnx_path_for(args.out / "classifier.pt"), export,
              images=read_sample_images(args.raw, plan.heldout.paths, inputs.preprocess))
    rows = {"finetune": predictions_from_proba(proba),
            "probe" if inputs.probe is not None else "start": predictions_from_proba(start_proba)}
    write_predictions(args.reports / "predictions.json", Predictions(
        split=plan.heldout_split, classes=inputs.classes, paths=list(plan.heldout.paths), labels=labels, rows=rows))
    write_json(args.reports / "metrics.json", metrics)


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
    inputs = read_inputs(args, params)
    net, counts = build_net(inputs, args, p)
    device = training_device(ddp)
    workers = resolve_workers(p.num_workers, ddp.world_size)
    train_loader, eval_loaders, generator = build_loaders(inputs, args, p, ddp=ddp, batch_size=batch_size,
                                                          workers=workers)
    fingerprint = fingerprint_of(
        params={k: v for k, v in asdict(p).items() if k not in ("backbones", "resume", "num_workers")},
        backbone=inputs.backbone.name, workers=workers, world_size=ddp.world_size,
        provenance=inputs.provenance(), preprocess=inputs.preprocess.as_dict(), classes=inputs.classes,
        device=device.type, code=code_sha256())

    # Step 0: the net before any update. With init_head probe it computes the probe's predictions (the test suite
    # checks this), so these are the probe's held-out predictions for the paired comparison.
    start_proba = None
    if ddp.is_main:
        start_proba, labels = predict_proba(net.to(device), eval_loaders["heldout"], device=device)
    curves = CurveLogger(args.reports / "live") if ddp.is_main else contextlib.nullcontext(lambda record: None)
    with curves as log_epoch:  # rank 0 alone writes the curves
        result = run_finetune(net, train_loader, eval_loaders["selection"], params=p,
                              checkpoint_dir=args.out / "checkpoints", fingerprint=fingerprint,
                              loader_generator=generator, device=device,
                              precision=lambda: resolve_precision(p.precision, device), ddp=ddp, log_epoch=log_epoch)
    if not ddp.is_main:
        return None
    proba, _ = predict_proba(net.to(device), eval_loaders["heldout"], device=device)  # the chosen epoch's net
    plan = inputs.plan
    facts = {"feature_dim": net.head.in_features, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
             "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from,
             "device": device.type, "precision": result.precision, "precision_choice": result.precision_choice,
             "num_workers": workers, "world_size": ddp.world_size, "per_process_batch_size": batch_size,
             **counts, **plan.split_counts, "n_fit": len(plan.train.paths), "n_selection": len(plan.selection.paths),
             "n_heldout": len(plan.heldout.paths)}
    metrics = heldout_metrics(inputs, result, params, proba=proba, start_proba=start_proba, labels=labels,
                              facts=facts)
    write_outputs(inputs, args, net, metrics, regime=p.regime, proba=proba, start_proba=start_proba, labels=labels)
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
