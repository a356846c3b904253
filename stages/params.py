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
from pathlib import Path
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
class DataParams:
    source: str = "hymenoptera_data"
    url: str | None = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
    mirror: str | None = None
    max_per_class: int | None = None
    max_archive_mb: int = 20_000
    checks = {"source": _source, "url": _source, "max_per_class": _positive,
              "max_archive_mb": _positive}


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
    val_fraction: float = 0.2
    test_fraction: float = 0.0
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
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    storage_dtype: Literal["float16", "float32"] = "float32"
    batch_size: int = 32
    num_workers: int | Literal["auto"] = "auto"
    layers: tuple[str, ...] = ("pool",)
    tta: tuple[Literal["none", "hflip"], ...] = ("none",)
    tta_mode: Literal["average", "rows"] = "average"
    # Where the backbone runs: this process (local) or a Ray cluster (ray; stages/extract_ray.py). Same bytes.
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # ray: a cluster to join; null: $RAY_ADDRESS, else a local instance
    checks = {"batch_size": _positive}


@dataclass(frozen=True)
class HeadParams:
    kind: Literal["logreg", "linear_svm", "svm_rbf", "softmax"] = "logreg"
    C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    max_iter: int = 2000
    layer: str = "pool"
    layers: Literal["one", "all"] = "one"
    refit_on_val: bool = False
    seed: int = 0
    ece_bins: int = 15
    checks = {"max_iter": _positive, "ece_bins": _positive}

    def __post_init__(self) -> None:
        _check(len(self.C) > 0 and all(c > 0 for c in self.C), "head.C",
               "a positive float or a list of them", list(self.C), "C: [0.1, 1.0, 10.0]")


@dataclass(frozen=True)
class FinetuneParams:
    # Backbones to fine-tune, each one of `backbones` (it starts from that backbone's weights@ and head@ outputs).
    # Empty: fine-tuning is off and dvc.yaml's `foreach` generates no finetune@ stage.
    backbones: tuple[str, ...] | tuple[()] = ()
    regime: Literal["head", "partial", "full"] = "partial"
    unfreeze_from: str = "blocks.5"
    init_head: Literal["probe", "random"] = "probe"
    epochs: int = 3
    batch_size: int = 32
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    patience: int = 3
    resume: bool = True
    seed: int = 0
    num_workers: int | Literal["auto"] = "auto"
    checks = {"epochs": _positive, "batch_size": _positive, "lr_backbone": _non_negative,
              "lr_head": _positive, "weight_decay": _non_negative, "warmup_epochs": _non_negative,
              "label_smoothing": _fraction, "grad_clip": _positive, "patience": _positive}


@dataclass(frozen=True)
class ReportParams:
    primary_metric: Literal["val.accuracy", "val.mean_class_accuracy", "val.macro_f1",
                            "test.accuracy"] = "val.accuracy"


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
                out[str(name)] = _build(inner, sub, f"{key}.{name}")
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


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.params [params.yaml]`: exit 1 with the ParamError when a name is unsafe (see above)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m stages.params", description=check_command_names.__doc__)
    parser.add_argument("params", nargs="?", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        check_command_names(read_params_yaml(args.params))
    except ParamError as exc:
        print(f"params: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
