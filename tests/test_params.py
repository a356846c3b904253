"""params.yaml validation: typos and bad values are rejected with a message naming the key."""
from __future__ import annotations

import copy
import re
import dataclasses
from pathlib import Path

import pytest
import yaml

from stages import params as params_module
from stages.params import ParamError, Params, PrepareParams, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def with_value(raw: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def test_repo_params_load_and_cover_every_key(raw: dict) -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    # params.yaml documents every knob: each dataclass field appears in the file.
    for section in dataclasses.fields(Params):
        if section.name == "backbones":
            continue
        declared = {f.name for f in dataclasses.fields(getattr(params, section.name))}
        assert declared == set(raw[section.name]), section.name


@pytest.mark.parametrize("dotted, suggestion", [
    ("head.Cs", "C"),
    ("head.class_weights", "class_weight"),
    ("head.calibrate", "calibration"),
    ("extract.batchsize", "batch_size"),
    ("prepare.val_fraction_", "val_fraction"),
    ("weights.alow_network", "allow_network"),
    ("finetune.lr_bakbone", "lr_backbone"),
    ("data.sorce", "source"),
    ("reprot", None),
])
def test_unknown_key_is_rejected_with_suggestion(raw: dict, dotted: str, suggestion) -> None:
    bad = with_value(raw, dotted, 1)
    with pytest.raises(ParamError, match=f"unknown parameter '{dotted}'") as err:
        parse_params(bad)
    if suggestion:
        assert f"Did you mean '{suggestion}'" in str(err.value)


# One bad value for every key: (dotted key, bad value, text the message must contain).
BAD_VALUES = [
    ("backbones", ["resnet50;rm -rf ~"], "backbones[0] must be a name"),
    ("backbones", ["resnet5o"], "backbones[0] must be a registered backbone"),
    ("backbones", ["efficientnet_lite0", "efficientnet_lite0"], "must not repeat"),
    ("backbones", [], "backbones must be a list"),
    ("data.source", "ftp://example.org/x.zip", "data.source must be a local path, an http"),
    ("data.source", "", "data.source must be a string"),
    ("data.url", "file:///etc/passwd", "data.url must be a local path, an http"),
    ("data.mirror", 3, "data.mirror must be"),
    ("data.max_per_class", 0, "data.max_per_class must be a positive number"),
    ("data.max_per_class", "ten", "data.max_per_class must be"),
    ("data.max_archive_mb", -1, "data.max_archive_mb must be a positive"),
    ("data.labels", "../labels.csv", "data.labels must be a path relative to the dataset root"),
    ("data.labels", "labels.xlsx", "data.labels must be a .csv, .tsv or .parquet file"),
    ("data.label_columns", "path", "data.label_columns must be a mapping"),
    ("data.label_columns", {"pth": "image"}, "unknown parameter 'data.label_columns.pth'. Did you mean 'path'?"),
    ("data.label_columns", {"label": "y", "onehot": ["a", "b"]}, "either `label`"),
    ("data.label_columns", {"label": None}, "either `label`"),
    ("data.label_columns", {"label": None, "onehot": ["a", "a"]}, "data.label_columns.onehot must be distinct"),
    ("data.label_columns", {"label": None, "onehot": ["a"], "separator": ";"}, "data.label_columns.separator"),
    ("data.label_columns", {"split": 3}, "data.label_columns.split must be"),
    ("weights.mirror", ["a"], "weights.mirror must be"),
    ("weights.allow_network", "yes", "weights.allow_network must be true or false"),
    ("weights.timeout_s", 0, "weights.timeout_s must be a positive"),
    ("weights.retries", -1, "weights.retries must be zero or a positive"),
    ("weights.custom", "resnet", "weights.custom must be a mapping"),
    ("weights.custom", {"Bad Name": {"arch": "timm:resnet18", "source": "x.pth", "sha256": "0" * 64}},
     "weights.custom.Bad Name must be a name"),
    ("weights.custom", {"mine": {"arch": "resnet18", "source": "x.pth", "sha256": "0" * 64}},
     "weights.custom.*.arch must be 'timm:"),
    ("weights.custom", {"mine": {"arch": "timm:resnet18", "source": "x.pth", "sha256": "abc"}},
     "weights.custom.*.sha256 must be the file's full sha256"),
    ("weights.custom", {"mine": {"arch": "timm:resnet18", "source": "x.pth"}}, "missing required key"),
    ("weights.custom", {"mine": {"arch": "timm:resnet18", "source": "x.pth", "sha256": "0" * 64,
                                 "size": 3}}, "unknown parameter 'weights.custom.mine.size'"),
    ("prepare.val_fraction", 1.5, "prepare.val_fraction must be a fraction"),
    ("prepare.test_fraction", -0.1, "prepare.test_fraction must be a fraction"),
    ("prepare.seed", 1.5, "prepare.seed must be an integer"),
    ("prepare.normalization", "imagenet", "prepare.normalization must be one of 'backbone', 'dataset'"),
    ("prepare.stats_size", 0, "prepare.stats_size must be a positive"),
    ("prepare.num_workers", "many", "prepare.num_workers must be an integer or one of 'auto'"),
    ("extract.device", "gpu", "extract.device must be one of 'auto', 'cpu', 'cuda'"),
    ("extract.precision", "fp32", "extract.precision must be one of"),
    ("extract.compile", True, "extract.compile must be one of"),
    ("extract.storage_dtype", "float64", "extract.storage_dtype must be one of"),
    ("extract.batch_size", 0, "extract.batch_size must be a positive"),
    ("extract.num_workers", -2.5, "extract.num_workers must be"),
    ("extract.layers", [3], "extract.layers[0] must be a string"),
    ("extract.tta", ["vflip"], "extract.tta[0] must be one of 'none', 'hflip'"),
    ("extract.tta_mode", "max", "extract.tta_mode must be one of 'average', 'rows'"),
    ("extract.augment_views", -1, "extract.augment_views must be zero or a positive number"),
    ("extract.input_size", 8, "extract.input_size must be null, an integer from 16 to 4096, or a mapping"),
    ("extract.input_size", {"efficientnet_lite0": 5000}, "extract.input_size must be null, an integer from 16"),
    ("extract.engine", "dask", "extract.engine must be one of 'local', 'ray'"),
    ("extract.ray_address", 6379, "extract.ray_address must be a string or null"),
    ("extract.engines", ["tensorrt"], "extract.engines[0] must be one of 'torch', 'onnxruntime', 'openvino'"),
    ("extract.engines", [], "extract.engines must be a list of (one of 'torch', 'onnxruntime', 'openvino'); got []"),
    ("head.kind", "mlp", "head.kind[0] must be one of 'logreg', 'linear_svm', 'svm_rbf', 'softmax'"),
    ("head.selection", "kfold", "head.selection must be one of 'cv', 'val'"),
    ("head.folds", 1, "head.folds must be an integer of at least 2"),
    ("head.feature_sets", [[]], "head.feature_sets[0] must be a list"),
    ("head.normalization", ["zscore"], "head.normalization[0] must be one of 'standardize', 'l2', 'l2+standardize'"),
    ("head.knn_k", [0], "head.knn_k must be a positive number"),
    ("head.few_shot", [0], "head.few_shot must be a positive number"),
    ("head.few_shot_draws", 0, "head.few_shot_draws must be a positive number"),
    ("head.C", -1, "head.C must be a positive float or a list of them"),
    ("head.C", [1.0, 0], "head.C must be a positive float or a list of them"),
    ("head.C", "big", "head.C[0] must be a number"),
    ("head.max_iter", 0, "head.max_iter must be a positive"),
    ("head.selection_max_rows", 20, "head.selection_max_rows must be null or an integer of at least 10 x head.folds"),
    ("head.seed", "0", "head.seed must be an integer"),
    ("head.ece_bins", 0, "head.ece_bins must be a positive"),
    ("head.class_weight", ["balance"], "head.class_weight[0] must be one of 'none', 'balanced'; got 'balance'"),
    ("head.class_weight", ["none", "none"], "head.class_weight must be a list of distinct values, each none or "
                                            "balanced; got ['none', 'none']"),
    ("head.class_weight", [], "head.class_weight must be a list of (one of 'none', 'balanced')"),
    ("head.calibration", "platt", "head.calibration must be one of 'temperature', 'none'; got 'platt'"),
    ("finetune.backbones", ["Res Net"], "finetune.backbones[0] must be a name"),
    ("finetune.backbones", ["efficientnet_lite0", "resnet50"],
     "finetune.backbones[1] must be one of `backbones` (efficientnet_lite0, efficientnet_lite1, efficientnet_lite2)"),
    ("finetune.backbones", ["efficientnet_lite1", "efficientnet_lite1"], "finetune.backbones must not repeat"),
    ("finetune.backbones", None, "finetune.backbones must be a list of (a string) or an empty list []"),
    ("finetune.regime", "some", "finetune.regime must be one of 'head', 'partial', 'full'"),
    ("finetune.unfreeze_from", 4, "finetune.unfreeze_from must be a string"),
    ("finetune.init_head", "zeros", "finetune.init_head must be one of 'probe', 'random'"),
    ("finetune.epochs", 0, "finetune.epochs must be a positive"),
    ("finetune.batch_size", -1, "finetune.batch_size must be a positive"),
    ("finetune.optimizer", "adam", "finetune.optimizer must be one of 'adamw', 'sgd'"),
    ("finetune.lr_backbone", -1e-4, "finetune.lr_backbone must be zero or a positive"),
    ("finetune.lr_head", 0, "finetune.lr_head must be a positive"),
    ("finetune.momentum", "high", "finetune.momentum must be a number"),
    ("finetune.weight_decay", -0.1, "finetune.weight_decay must be zero or a positive"),
    ("finetune.warmup_epochs", -1, "finetune.warmup_epochs must be zero or a positive"),
    ("finetune.label_smoothing", 1.0, "finetune.label_smoothing must be a fraction"),
    ("finetune.grad_clip", 0, "finetune.grad_clip must be a positive"),
    ("finetune.precision", "half", "finetune.precision must be one of"),
    ("finetune.batchnorm", "eval", "finetune.batchnorm must be one of 'frozen', 'train'"),
    ("finetune.crop_scale", [0.5, 0.2], "finetune.crop_scale must be [min, max] fractions"),
    ("finetune.selection_fraction", 1.0, "finetune.selection_fraction must be a fraction in (0, 1)"),
    ("finetune.patience", 0, "finetune.patience must be a positive"),
    ("finetune.resume", "no", "finetune.resume must be true or false"),
    ("finetune.seed", None, "finetune.seed must be an integer"),
    ("finetune.num_workers", "x", "finetune.num_workers must be"),
    ("report.primary_metric", "accuracy", "report.primary_metric must be one of"),
    # audit (stages/audit.py)
    ("audit.layer", 5, "audit.layer must be a string"),
    ("audit.duplicate_cosine", 0, "audit.duplicate_cosine must be a number in (0, 1]"),
    ("audit.duplicate_neighbors", 0, "audit.duplicate_neighbors must be a positive"),
    ("audit.duplicate_pixel_correlation", 1.5, "audit.duplicate_pixel_correlation must be a number in (0, 1]"),
    ("audit.cross_split", "drop", "audit.cross_split must be one of 'report', 'drop_from_heldout'"),
    ("audit.label_folds", 1, "audit.label_folds must be an integer of at least 2"),
    ("audit.label_C", 0, "audit.label_C must be a positive"),
    ("audit.label_filter", "all", "audit.label_filter must be one of 'low_self_confidence'"),
    ("audit.outlier_k", 0, "audit.outlier_k must be a positive"),
    ("audit.outlier_z", -1, "audit.outlier_z must be a positive"),
    ("audit.sheet_max", 0, "audit.sheet_max must be a positive"),
    ("audit.seed", 0.5, "audit.seed must be an integer"),
]


@pytest.mark.parametrize("dotted, value, message", BAD_VALUES, ids=[f"{d}={v!r}" for d, v, _ in BAD_VALUES])
def test_bad_value_is_rejected_naming_the_key(raw: dict, dotted: str, value, message: str) -> None:
    with pytest.raises(ParamError, match=re.escape(message)):
        parse_params(with_value(raw, dotted, value))


def test_every_key_has_a_bad_value_test() -> None:
    tested = {d for d, _, _ in BAD_VALUES}
    for section in dataclasses.fields(Params):
        if section.name == "backbones":
            assert "backbones" in tested
            continue
        for f in dataclasses.fields(section.default):
            assert f"{section.name}.{f.name}" in tested, f"no bad-value test for {section.name}.{f.name}"


def test_labels_file_rules_out_max_per_class(raw: dict) -> None:
    bad = with_value(with_value(raw, "data.labels", "train.csv"), "data.max_per_class", 10)
    with pytest.raises(ParamError, match=re.escape("data.max_per_class must be null when data.labels is set")):
        parse_params(bad)
    assert parse_params(with_value(raw, "data.labels", "meta/train.parquet")).data.labels == "meta/train.parquet"


def test_fractions_must_leave_training_images(raw: dict) -> None:
    bad = with_value(with_value(raw, "prepare.val_fraction", 0.6), "prepare.test_fraction", 0.5)
    with pytest.raises(ParamError, match=re.escape("prepare.val_fraction + prepare.test_fraction")):
        parse_params(bad)


def test_prepare_defaults_hold_out_a_test_split_and_need_no_val(raw: dict) -> None:
    """Selection is by cross-validation on train; test is the held-out split that is reported."""
    assert (PrepareParams().val_fraction, PrepareParams().test_fraction) == (0.0, 0.2)
    assert parse_params(raw).prepare == PrepareParams()  # params.yaml states the defaults
    assert parse_params({}).prepare == PrepareParams()


def test_check_writes_the_same_marker_for_every_valid_params_yaml(raw: dict, tmp_path: Path, capsys) -> None:
    """dvc.yaml's `params` stage: valid -> identical bytes (downstream stages stay cached); invalid -> exit 1
    naming the key, and no marker."""
    markers = []
    for i, variant in enumerate((raw, with_value(raw, "head.C", [0.5]), with_value(raw, "backbones", ["resnet50"]))):
        path = tmp_path / f"params{i}.yaml"
        path.write_text(yaml.safe_dump(variant, sort_keys=False))
        out = tmp_path / f"ok{i}" / "params.ok"
        assert params_module.main(["--check", "--out", str(out), str(path)]) == 0
        markers.append(out.read_bytes())
    assert markers == [params_module.VALID_MARKER.encode()] * 3
    for dotted, value, message in (("backbones", ["efficientnet_lite3"], "backbones[0] must be a registered backbone"),
                                   ("prepare.stats_sise", 224, "unknown parameter 'prepare.stats_sise'"),
                                   ("reprot", {}, "unknown parameter 'reprot'. Did you mean 'report'?")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(with_value(raw, dotted, value), sort_keys=False))
        out = tmp_path / "bad" / "params.ok"
        assert params_module.main(["--check", "--out", str(out), str(path)]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()
    # without --check only the names interpolated into commands are checked (no registry import)
    path.write_text(yaml.safe_dump(with_value(raw, "backbones", ["efficientnet_lite3"]), sort_keys=False))
    assert params_module.main([str(path)]) == 0
    with pytest.raises(SystemExit):
        params_module.main(["--out", str(out), str(path)])
    assert "--out needs --check" in capsys.readouterr().err


def test_scalar_c_becomes_a_list_and_custom_backbone_is_accepted(raw: dict) -> None:
    custom = {"mine": {"arch": "timm:resnet18", "source": "weights/mine.pth", "sha256": "a" * 64}}
    params = parse_params(with_value(with_value(with_value(raw, "head.C", 2), "weights.custom", custom),
                                     "backbones", ["mine"]))
    assert params.head.C == (2.0,)
    assert params.backbones == ("mine",)
    assert params.weights.custom["mine"].input_size == 224


def test_finetune_is_off_by_default_and_takes_listed_backbones(raw: dict) -> None:
    assert raw["finetune"]["backbones"] == [] and parse_params(raw).finetune.backbones == ()
    assert parse_params({}).finetune.backbones == ()
    params = parse_params(with_value(raw, "finetune.backbones", ["efficientnet_lite2", "efficientnet_lite0"]))
    assert params.finetune.backbones == ("efficientnet_lite2", "efficientnet_lite0")
    with pytest.raises(ParamError, match=re.escape("finetune.backbones[0] must be one of `backbones` "
                                                   "(efficientnet_lite0): the fine-tune starts from")):
        parse_params({"finetune": {"backbones": ["efficientnet_lite1"]}})


def test_params_are_frozen() -> None:
    params = parse_params({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.head.kind = "softmax"  # type: ignore[misc]


def test_missing_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("head: [unclosed\n")
    with pytest.raises(ParamError, match="is not valid YAML"):
        load_params(broken)
    broken.write_text("- just\n- a list\n")
    with pytest.raises(ParamError, match="must be a mapping"):
        load_params(broken)
