"""Load and validate params.yaml into frozen dataclasses.

Every key of params.yaml is declared here. Unknown keys and bad values raise `ParamError` with a
message naming the key, what is allowed, what was given and how to fix it.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml

# Names are interpolated into dvc.yaml shell commands and file paths: a letter or digit first (no `.`, `..`
# or option-like `-x`), then letters, digits, `_`, `.`, `-`. Matched with fullmatch (`$` alone allows "\n").
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ParamError(ValueError):
    """A value in params.yaml is missing, unknown or invalid."""


def _check(ok: bool, key: str, allowed: str, got: Any, example: str = "") -> None:
    if not ok:
        hint = f" Edit params.yaml, e.g. `{example}`." if example else " Edit params.yaml."
        raise ParamError(f"{key} must be {allowed}; got {got!r}.{hint}")


def _fraction(key: str, value: float) -> None:
    _check(0.0 <= value < 1.0, key, "a fraction in [0, 1)", value, f"{key.split('.')[-1]}: 0.2")


def _positive(key: str, value: float) -> None:
    _check(value > 0, key, "a positive number", value)


def _non_negative(key: str, value: float) -> None:
    _check(value >= 0, key, "zero or a positive number", value)


def _name(key: str, value: str) -> None:
    _check(bool(NAME_RE.fullmatch(value)), key,
           "a name of lowercase letters, digits, '_', '.' or '-', starting with a letter or digit "
           "(it is used in file names and commands)",
           value, "efficientnet_lite0")


def _source(key: str, value: str) -> None:
    if "://" in value:
        scheme = value.split("://", 1)[0]
        _check(scheme in ("http", "https"), key, "a local path, an http:// or https:// URL", value)


@dataclass(frozen=True)
class LabelColumns:
    """The columns of a labels file (stages/labels.py): image path, label (or one-hot columns), split."""
    path: str = "path"
    label: str | None = "label"
    separator: str | None = None
    onehot: tuple[str, ...] | tuple[()] = ()
    split: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.label) != bool(self.onehot), "data.label_columns",
               "either `label` (a column of class names) or `onehot` (a list of 0/1 class columns), not both "
               "nor neither", {"label": self.label, "onehot": list(self.onehot)},
               "label_columns: {path: image, label: null, onehot: [cat, dog]}")
        _check(len(set(self.onehot)) == len(self.onehot), "data.label_columns.onehot", "distinct column names",
               list(self.onehot))
        _check(self.separator is None or bool(self.label), "data.label_columns.separator",
               "null with one-hot columns", self.separator)


@dataclass(frozen=True)
class DataParams:
    source: str = "hymenoptera_data"
    url: str | None = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
    mirror: str | None = None
    max_per_class: int | None = None
    max_archive_mb: int = 20_000
    labels: str | None = None
    label_columns: LabelColumns = field(default_factory=LabelColumns)
    checks = {"source": _source, "url": _source, "max_per_class": _positive,
              "max_archive_mb": _positive}

    def __post_init__(self) -> None:
        if self.labels is not None:
            relative = PurePosixPath(self.labels)
            _check(not relative.is_absolute() and ".." not in relative.parts, "data.labels",
                   "a path relative to the dataset root (data/raw), without '..'", self.labels,
                   "labels: train.csv")
            _check(relative.suffix.lower() in (".csv", ".tsv", ".parquet", ".pq"), "data.labels",
                   "a .csv, .tsv or .parquet file", self.labels, "labels: train.csv")
            _check(self.max_per_class is None, "data.max_per_class",
                   "null when data.labels is set (it keeps the first N files of each folder, which would "
                   "drop images the labels file lists)", self.max_per_class, "max_per_class: null")


@dataclass(frozen=True)
class CustomBackbone:
    arch: str
    source: str
    sha256: str
    input_size: int = 224
    resize: int | None = None
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mid_layer: str | None = None  # the module that extract.layers `mid` names (its last stage before the final one)
    checks = {"source": _source, "input_size": _positive}

    def __post_init__(self) -> None:
        _check(bool(SHA256_RE.match(self.sha256)), "weights.custom.*.sha256",
               "the file's full sha256 (64 lowercase hex digits)", self.sha256)
        _check(self.arch.startswith(("timm:", "torchvision:")), "weights.custom.*.arch",
               "'timm:<model name>' or 'torchvision:<model name>'", self.arch, "arch: timm:resnet26d")


@dataclass(frozen=True)
class WeightsParams:
    mirror: str | None = None
    allow_network: bool = True
    timeout_s: float = 30.0
    retries: int = 3
    custom: dict[str, CustomBackbone] = field(default_factory=dict)
    checks = {"timeout_s": _positive, "retries": _non_negative}


@dataclass(frozen=True)
class PrepareParams:
    # Used only for splits the dataset has no folder for (stages/prepare.py). The held-out split (the one that is
    # reported, stages/evaluation.py) is test, drawn by test_fraction when the dataset has neither a val/ nor a
    # test/ folder; val is optional (selection is by cross-validation on train) and drawn when val_fraction > 0.
    val_fraction: float = 0.0
    test_fraction: float = 0.2
    seed: int = 0
    normalization: Literal["backbone", "dataset"] = "backbone"
    stats_size: int = 224
    num_workers: int | Literal["auto"] = "auto"
    checks = {"val_fraction": _fraction, "test_fraction": _fraction, "stats_size": _positive}

    def __post_init__(self) -> None:
        _check(self.val_fraction + self.test_fraction < 1.0, "prepare.val_fraction + prepare.test_fraction",
               "below 1 so that training images remain", self.val_fraction + self.test_fraction)


@dataclass(frozen=True)
class ExtractParams:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # float32 (default): the same features, within 1e-4, on every machine. auto: by hardware capability alone, never
    # by a timing (CUDA: its AMP dtype; CPU: bf16 only where native).
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    compile: Literal["auto", "on", "off"] = "auto"
    storage_dtype: Literal["float16", "float32"] = "float32"
    batch_size: int = 32
    num_workers: int | Literal["auto"] = "auto"
    layers: tuple[str, ...] = ("pool", "mid")  # mid: each backbone's mid_layer (stages/backbones.py)
    tta: tuple[Literal["none", "hflip"], ...] = ("none",)
    tta_mode: Literal["average", "rows"] = "average"
    # Extra RandomResizedCrop + flip views of each train image, stored apart from the main rows (augmented/<layer>).
    augment_views: int = 0
    # Crop size: null = each backbone's own; an int for every backbone; or {backbone name: int}.
    input_size: int | None | dict[str, int] = None
    # Where the backbone runs: this process (local) or a Ray cluster (ray; stages/extract_ray.py). Same bytes.
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # ray: a cluster to join; null: $RAY_ADDRESS, else a local instance
    # Compute engines the local run measures and chooses among at the precision (stages/engines/choose.py); eager
    # torch is always measured as the baseline.
    engines: tuple[Literal["torch", "onnxruntime", "openvino"], ...] = ("torch", "onnxruntime", "openvino")
    checks = {"batch_size": _positive, "augment_views": _non_negative}

    def __post_init__(self) -> None:
        sizes = self.input_size.values() if isinstance(self.input_size, dict) else [self.input_size]
        _check(all(s is None or 16 <= s <= 4096 for s in sizes), "extract.input_size",
               "null, an integer from 16 to 4096, or a mapping {backbone name: integer}", self.input_size,
               "input_size: {efficientnet_lite0: 260}")
        _check(len(self.engines) > 0, "extract.engines", "a non-empty list of torch, onnxruntime, openvino",
               list(self.engines), "engines: [torch, onnxruntime, openvino]")


@dataclass(frozen=True)
class HeadParams:
    # Every setting below that is a list is a set of candidates; the protocol (head.selection) chooses among them
    # on the selection rows only (stages/evaluation.py), never on the held-out split.
    kind: tuple[Literal["logreg", "linear_svm", "svm_rbf", "softmax"], ...] = ("logreg",)
    C: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    selection: Literal["cv", "val"] = "cv"
    folds: int = 5
    feature_sets: tuple[tuple[str, ...], ...] = (("pool",), ("pool", "mid"))
    normalization: tuple[Literal["standardize", "l2", "l2+standardize"], ...] = ("standardize", "l2+standardize")
    knn_k: tuple[int, ...] = (1, 5, 10, 20)
    few_shot: tuple[int, ...] = (1, 2, 5, 10)
    few_shot_draws: int = 5
    max_iter: int = 2000
    seed: int = 0
    ece_bins: int = 15
    selection_max_rows: int | None = 20000  # more selection rows than this: choose on a stratified subsample
    # Class weights in the fit's loss, candidates like C: "balanced" weighs class c by n / (K n_c) (scikit-learn's
    # formula); skipped where the selection rows' classes are balanced (stages/probes.class_weight_candidates).
    class_weight: tuple[Literal["none", "balanced"], ...] = ("none", "balanced")
    # Probabilities of the chosen logreg head: one temperature fitted on its out-of-fold selection logits, or none.
    calibration: Literal["temperature", "none"] = "temperature"
    checks = {"max_iter": _positive, "ece_bins": _positive, "knn_k": _positive, "few_shot": _positive,
              "few_shot_draws": _positive, "selection_max_rows": _positive}

    def __post_init__(self) -> None:
        _check(len(self.C) > 0 and all(c > 0 for c in self.C), "head.C",
               "a positive float or a list of them", list(self.C), "C: [0.1, 1.0, 10.0]")
        _check(self.folds >= 2, "head.folds", "an integer of at least 2 (cross-validation folds)", self.folds,
               "folds: 5")
        _check(all(len(s) > 0 for s in self.feature_sets), "head.feature_sets",
               "a list of layer lists, each naming stored layers (pool, mid or a module name)",
               [list(s) for s in self.feature_sets], "feature_sets: [[pool], [pool, mid]]")
        _check(self.selection_max_rows is None or self.selection_max_rows >= 10 * self.folds,
               "head.selection_max_rows", f"null or an integer of at least 10 x head.folds ({10 * self.folds})",
               self.selection_max_rows, "selection_max_rows: 20000")
        _check(len(set(self.class_weight)) == len(self.class_weight), "head.class_weight",
               "a list of distinct values, each none or balanced", list(self.class_weight),
               "class_weight: [none, balanced]")


@dataclass(frozen=True)
class FinetuneParams:
    # Backbones to fine-tune, each one of `backbones` (it starts from that backbone's weights@ and head@ outputs).
    # Empty: fine-tuning is off and dvc.yaml's `foreach` generates no finetune@ stage.
    backbones: tuple[str, ...] | tuple[()] = ()
    regime: Literal["head", "partial", "full"] = "partial"
    unfreeze_from: str = "blocks.5"
    init_head: Literal["probe", "random"] = "probe"
    epochs: int = 5
    batch_size: int = 32
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr_backbone: float = 1e-4
    lr_head: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batchnorm: Literal["frozen", "train"] = "frozen"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    selection_fraction: float = 0.15
    patience: int = 3
    resume: bool = True
    seed: int = 0
    num_workers: int | Literal["auto"] = "auto"
    checks = {"epochs": _positive, "batch_size": _positive, "lr_backbone": _non_negative,
              "lr_head": _positive, "weight_decay": _non_negative, "warmup_epochs": _non_negative,
              "label_smoothing": _fraction, "grad_clip": _positive, "patience": _positive,
              "selection_fraction": _positive}

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        _check(0.0 < low <= high <= 1.0, "finetune.crop_scale",
               "[min, max] fractions of the image area with 0 < min <= max <= 1", list(self.crop_scale),
               "crop_scale: [0.35, 1.0]")
        _check(self.selection_fraction < 1.0, "finetune.selection_fraction", "a fraction in (0, 1)",
               self.selection_fraction, "selection_fraction: 0.15")


def _unit_interval(key: str, value: float) -> None:
    _check(0.0 < value <= 1.0, key, "a number in (0, 1]", value)


@dataclass(frozen=True)
class AuditParams:
    # Dataset audit on the cached features (stages/audit.py). Thresholds were set from `python -m stages.bench_audit`
    # on hymenoptera_data and pbc_blood_cells (planted duplicates, flips, off-topic images), not tuned to one set.
    layer: str = "pool"  # the stored layer whose features every check uses (pool, mid or a module name)
    duplicate_cosine: float = 0.8  # candidate pairs: cosine similarity of the L2-normalized features >= this
    duplicate_neighbors: int = 10  # nearest neighbours searched per image (faiss); also the largest group seen at once
    # confirmation: the best Pearson correlation of small grayscale thumbnails over crop windows >= this
    duplicate_pixel_correlation: float = 0.92
    cross_split: Literal["report", "drop_from_heldout"] = "report"  # duplicates across splits: only listed, or the
    #                                       held-out copies also left out of head's held-out evaluation (listed)
    label_folds: int = 5  # out-of-fold probabilities of the probe (standardized logreg); a class needs this many
    label_C: float = 1.0  # the probe's inverse regularisation
    # cleanlab.filter.find_label_issues filter_by: which out-of-fold disagreements count as likely label errors
    label_filter: Literal["low_self_confidence", "prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                          "predicted_neq_given", "low_normalized_margin"] = "low_self_confidence"
    outlier_k: int = 10  # outlier score: median cosine distance to the k nearest other images
    outlier_z: float = 3.5  # outlier when the score's robust z-score over the dataset (median, MAD) is above this
    sheet_max: int = 48  # thumbnails per contact sheet
    seed: int = 0
    checks = {"duplicate_cosine": _unit_interval, "duplicate_neighbors": _positive,
              "duplicate_pixel_correlation": _unit_interval, "label_C": _positive, "outlier_k": _positive,
              "outlier_z": _positive, "sheet_max": _positive}

    def __post_init__(self) -> None:
        _check(self.label_folds >= 2, "audit.label_folds", "an integer of at least 2 (cross-validation folds)",
               self.label_folds, "label_folds: 5")


PRIMARY_METRICS = ("heldout.accuracy", "heldout.mean_class_accuracy", "heldout.macro_f1")


def _primary_metric(key: str, value: str) -> None:
    allowed = "one of " + ", ".join(repr(m) for m in PRIMARY_METRICS)
    if value.split(".", 1)[0] in ("val", "test"):
        suggestion = f"heldout.{value.split('.', 1)[-1]}"
        raise ParamError(
            f"{key} must be {allowed}; got {value!r}. val.* and test.* keys no longer exist: every metric is "
            f"measured on the held-out split only (test when the dataset has one, else val), which chooses nothing, "
            f"and is reported under heldout.* (summary.json names the split in heldout_split). "
            f"Edit params.yaml, e.g. `primary_metric: "
            f"{suggestion if suggestion in PRIMARY_METRICS else PRIMARY_METRICS[0]}`.")
    _check(value in PRIMARY_METRICS, key, allowed, value, "primary_metric: heldout.accuracy")


@dataclass(frozen=True)
class ReportParams:
    # Every reported metric is measured on the held-out split (stages/evaluation.py), under heldout.*.
    primary_metric: str = "heldout.accuracy"
    checks = {"primary_metric": _primary_metric}


@dataclass(frozen=True)
class Params:
    backbones: tuple[str, ...] = ("efficientnet_lite0",)
    data: DataParams = DataParams()
    weights: WeightsParams = WeightsParams()
    prepare: PrepareParams = PrepareParams()
    extract: ExtractParams = ExtractParams()
    head: HeadParams = HeadParams()
    finetune: FinetuneParams = FinetuneParams()
    report: ReportParams = ReportParams()
    audit: AuditParams = AuditParams()


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple and not typing.get_args(tp):
        return "an empty list []"
    if origin is tuple:
        return f"a list of ({_describe(typing.get_args(tp)[0])})"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert a YAML value to type `tp`, raising ParamError naming `key` when it does not fit."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _convert(arm, value, key)
            except ParamError:
                continue
    elif origin is tuple and not typing.get_args(tp):  # tuple[()]: only an empty list
        if isinstance(value, list) and not value:
            return ()
    elif origin is tuple:
        (inner, *rest) = typing.get_args(tp)
        if rest and rest[0] is not Ellipsis:  # fixed-length tuple such as an RGB triple
            if isinstance(value, list) and len(value) == len(typing.get_args(tp)):
                return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
        else:
            items = value if isinstance(value, list) else [value]
            if items:
                return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(items))
    elif origin is dict:
        if value is None:
            return {}
        if isinstance(value, dict):
            _, inner = typing.get_args(tp)
            out = {}
            for name, sub in value.items():
                _name(f"{key}.{name}", str(name))
                out[str(name)] = _convert(inner, sub, f"{key}.{name}")
            return out
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str) and value:
            return value
    raise ParamError(f"{key} must be {_describe(tp)}; got {value!r}. Edit params.yaml.")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from mapping `raw`; `prefix` is the dotted key used in messages."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamError(f"{prefix or 'params.yaml'} must be a mapping of keys; got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ParamError(f"unknown parameter '{where}'.{hint} Allowed keys"
                             f"{' in ' + prefix if prefix else ''}: {', '.join(names)}.")
    checks = getattr(cls, "checks", {})
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = _convert(hints[name], raw[name], key)
        if name in checks and value is not None:
            for item in (value if isinstance(value, tuple) else (value,)):
                if isinstance(item, (int, float, str)) and not isinstance(item, bool):
                    checks[name](key, item)
        kwargs[name] = value
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ParamError(f"{prefix}: missing required key(s) {', '.join(missing)}.")
    return cls(**kwargs)


def parse_params(raw: Any, *, known_backbones: typing.Iterable[str] | None = None) -> Params:
    """Validate a parsed params.yaml mapping; `known_backbones` defaults to the registry."""
    params = _build(Params, raw, "")
    if known_backbones is None:
        from stages.backbones import REGISTRY
        known_backbones = REGISTRY
    known = set(known_backbones) | set(params.weights.custom)
    if len(set(params.backbones)) != len(params.backbones):
        raise ParamError(f"backbones must not repeat a name; got {list(params.backbones)}.")
    for i, name in enumerate(params.backbones):
        _name(f"backbones[{i}]", name)
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ParamError(
                f"backbones[{i}] must be a registered backbone or one declared under weights.custom; "
                f"got {name!r}.{hint} Registered: {', '.join(sorted(known))}.")
    finetune = params.finetune.backbones
    if len(set(finetune)) != len(finetune):
        raise ParamError(f"finetune.backbones must not repeat a name; got {list(finetune)}.")
    for i, name in enumerate(finetune):
        _name(f"finetune.backbones[{i}]", name)
        if name not in params.backbones:
            raise ParamError(
                f"finetune.backbones[{i}] must be one of `backbones` ({', '.join(params.backbones)}): the "
                f"fine-tune starts from that backbone's weights@ and head@ outputs; got {name!r}. Edit params.yaml: "
                f"add it to `backbones`, or e.g. `dvc exp run -S 'finetune.backbones=[{params.backbones[0]}]'`.")
    return params


def read_params_yaml(path: str | Path = "params.yaml") -> Any:
    """The parsed YAML of `path` (not validated)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamError(f"{path} not found; run from the repository root.") from None
    except yaml.YAMLError as exc:
        raise ParamError(f"{path} is not valid YAML: {exc}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    return parse_params(read_params_yaml(path))


def check_command_names(raw: Any) -> None:
    """Validate the names dvc.yaml interpolates into shell commands (`backbones`, `finetune.backbones`,
    `weights.custom` keys) and every value's type, without importing the registry (it needs torch).

    DVC substitutes `${item...}` into a command before any stage code runs, so each command that carries a
    name starts with `python -m stages.params || exit 1;`: the shell runs that check first and exits
    before reaching the rest of the line when a name could be shell syntax (`resnet50;rm -rf ~`).
    """
    params = _build(Params, raw, "")
    for key, names in (("backbones", params.backbones), ("finetune.backbones", params.finetune.backbones)):
        for i, name in enumerate(names):
            _name(f"{key}[{i}]", name)


# What `--check --out` writes: the same bytes for every valid params.yaml, so that the `params` stage of dvc.yaml
# re-runs on any change to params.yaml without making the stages downstream of its output re-run.
VALID_MARKER = "params.yaml is valid (python -m stages.params --check)\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.params [params.yaml]`: exit 1 with the ParamError when a name is unsafe (see above).

    `--check`: validate every key and value (`load_params`, backbone names against the registry) instead; with
    `--out PATH`, write VALID_MARKER there (atomically) when valid. This is dvc.yaml's `params` stage: every
    first-level stage depends on its output, so DVC runs it first and an invalid params.yaml stops `dvc repro`
    before any stage has removed its outputs.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m stages.params", description=check_command_names.__doc__)
    parser.add_argument("params", nargs="?", type=Path, default=Path("params.yaml"))
    parser.add_argument("--check", action="store_true", help="validate every key and value (imports the registry)")
    parser.add_argument("--out", type=Path, help="with --check: write a marker file here when params.yaml is valid")
    args = parser.parse_args(argv)
    if args.out and not args.check:
        parser.error("--out needs --check")
    try:
        if args.check:
            load_params(args.params)
        else:
            check_command_names(read_params_yaml(args.params))
    except ParamError as exc:
        print(f"params: error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        from stages.io import write_text
        try:
            write_text(args.out, VALID_MARKER)
        except OSError as exc:
            print(f"params: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
