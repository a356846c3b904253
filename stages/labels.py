"""Labels files: a CSV or Parquet table naming each image and its class, beside the folder layout.

`data.labels` names the file, relative to the dataset root (data/raw, the tree `data.source` gives), so DVC
tracks it with the images. `data.label_columns` says which columns hold what:

- `path`: the image path relative to the dataset root (POSIX `/`; no `..`, not absolute);
- `label`: the class name, or, with `separator` (e.g. ";"), a list of them;
- `onehot`: instead of `label`, one column per class holding 0 or 1 (the column name is the class);
- `split` (optional): train, val (valid, validation) or test, like the split folders.

Every row must name an existing file once, with at least one label; a bad row raises LabelsError naming the
file, the row (1-based data row; CSV line = row + 1) and what was expected. Cells are read as text (CSV: no
"NA" -> NaN guessing), surrounding spaces are stripped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from stages.params import LabelColumns

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
ONEHOT_VALUES = {"0": False, "1": True, "0.0": False, "1.0": True, "false": False, "true": True}


class LabelsError(ValueError):
    """The labels file is missing, unreadable, or has a bad row; the message names the file and row."""


@dataclass(frozen=True)
class LabelRow:
    """One row of the labels file: POSIX path under the dataset root, its labels, its split (or None)."""
    row: int  # 1-based data row
    path: str
    labels: tuple[str, ...]
    split: str | None


def read_labels_table(path: Path) -> pd.DataFrame:
    """Every cell of the CSV (.csv, .tsv) or Parquet (.parquet, .pq) file at `path` as a string (I/O)."""
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist; data.labels is relative to the dataset root "
                          f"(data/raw). Edit params.yaml or add the file to the dataset.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ",",
                                encoding="utf-8")
        elif suffix in (".parquet", ".pq"):
            table = pd.read_parquet(path)
            table = table.astype(object).where(table.notna(), "").astype(str)
        else:
            raise LabelsError(f"labels file {path}: expected a .csv, .tsv or .parquet file; got {suffix!r}.")
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        if isinstance(exc, LabelsError):
            raise
        raise LabelsError(f"labels file {path} cannot be read: {exc}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def parse_labels(table: pd.DataFrame, columns: LabelColumns, *, source: str) -> list[LabelRow]:
    """Check and parse the table's rows (see the module docstring); `source` names the file in messages."""
    needed = [columns.path] + ([columns.label] if columns.label else []) + list(columns.onehot) \
        + ([columns.split] if columns.split else [])
    unknown = [c for c in needed if c not in table.columns]
    if unknown:
        raise LabelsError(f"{source}: column(s) {', '.join(map(repr, unknown))} named in data.label_columns are "
                          f"not in the file; its columns are {', '.join(map(repr, table.columns))}. Edit "
                          f"data.label_columns in params.yaml.")
    rows, seen = [], {}
    for number, record in enumerate(table[needed].itertuples(index=False, name=None), start=1):
        values = dict(zip(needed, (str(v).strip() for v in record)))
        where = f"{source}: row {number}" + (f" (line {number + 1})" if source.endswith((".csv", ".tsv")) else "")
        path = _row_path(values[columns.path], where=where, column=columns.path)
        if path in seen:
            raise LabelsError(f"{where}: {path!r} is listed again (first at row {seen[path]}); each image must "
                              f"appear once. Remove the duplicate row.")
        seen[path] = number
        labels = _row_labels(values, columns, where=where)
        split = None
        if columns.split:
            split = SPLIT_NAMES.get(values[columns.split].lower())
            if split is None:
                raise LabelsError(f"{where}: column {columns.split!r} must be one of "
                                  f"{', '.join(SPLIT_NAMES)}; got {values[columns.split]!r}.")
        rows.append(LabelRow(number, path, labels, split))
    if not rows:
        raise LabelsError(f"{source}: no rows; expected a header and one row per image.")
    return rows


def _row_path(value: str, *, where: str, column: str) -> str:
    path = PurePosixPath(value.replace("\\", "/"))
    if not value or path.is_absolute() or ".." in path.parts:
        raise LabelsError(f"{where}: column {column!r} must be an image path relative to the dataset root "
                          f"(no '..', not absolute); got {value!r}.")
    return str(path)


def _row_labels(values: dict[str, str], columns: LabelColumns, *, where: str) -> tuple[str, ...]:
    if columns.onehot:
        labels = []
        for name in columns.onehot:
            flag = ONEHOT_VALUES.get(values[name].lower())
            if flag is None:
                raise LabelsError(f"{where}: one-hot column {name!r} must be 0 or 1; got {values[name]!r}.")
            labels += [name] if flag else []
    elif columns.separator:
        labels = [part.strip() for part in values[columns.label].split(columns.separator) if part.strip()]
    else:
        labels = [values[columns.label]] if values[columns.label] else []
    if not labels:
        what = f"one-hot columns {', '.join(columns.onehot)} are all 0" if columns.onehot else \
            f"column {columns.label!r} is empty"
        raise LabelsError(f"{where}: no label ({what}); every image needs at least one. Fill it in or remove "
                          f"the row.")
    if len(set(labels)) != len(labels):
        raise LabelsError(f"{where}: label {sorted(l for l in labels if labels.count(l) > 1)[0]!r} is given twice.")
    return tuple(labels)


def read_labels(raw: Path, labels: str, columns: LabelColumns) -> list[LabelRow]:
    """The rows of `raw`/`labels`, each checked, and each path checked to be a file under `raw` (I/O)."""
    path = Path(raw) / labels
    rows = parse_labels(read_labels_table(path), columns, source=str(path))
    for row in rows:
        if not (Path(raw) / row.path).is_file():
            raise LabelsError(f"{path}: row {row.row}: image {row.path!r} does not exist under {raw}. Fix the "
                              f"path (relative to the dataset root) or remove the row.")
    return rows
