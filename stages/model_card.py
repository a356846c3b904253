"""MODEL_CARD.md beside an exported classifier (stages/export.py): what it was trained on, its held-out metrics with
intervals, provenance, intended use and limits, how to run it. Pure text from the head's metrics.json content."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")


def model_card(*, backbone_name: str, metrics: dict[str, Any], classes: Sequence[str], split_counts: dict[str, dict[str, int]],
               preprocess: dict[str, Any] | None, weights_path: Path, model_path: Path) -> str:
    """MODEL_CARD.md beside classifier.pt: data, held-out metrics with intervals, provenance, use and limits."""
    heldout, chosen, selection = metrics["heldout"], metrics["selection"]["chosen"], metrics["selection"]
    split = metrics["heldout_split"]
    rows = "\n".join(f"| {escape_md(c)} | " + " | ".join(str(split_counts.get(s, {}).get(c, 0)) for s in SPLITS) +
                     f" | {heldout['per_class'][c]['recall']:.3f} |" for c in classes)
    pre = preprocess or {}
    calibration = metrics.get("calibration") or {"method": "none"}
    ece = f"{heldout['ece']:.4f}"
    if calibration["method"] == "temperature":
        ece = (f"{heldout['ece']:.4f} before, {calibration['heldout']['ece_after']:.4f} after temperature scaling "
               f"(what the classifier outputs)")
    return f"""# Model card: {backbone_name} + {chosen['kind']} head

`{model_path}`: a frozen ImageNet-pretrained `{backbone_name}` backbone with a {chosen['kind']} head trained on
its cached features ({' + '.join(chosen['layers'])}, {chosen['normalization']}, C = {chosen['C']:g}, class weight
{chosen.get('class_weight', 'none')}). {calibration_sentence(calibration)}

## Held-out performance ({split} split, {heldout['n']} images, never used to choose anything)

| metric | value |
| --- | ---: |
| accuracy [95% Wilson interval] | {heldout['accuracy']:.4f} [{heldout['accuracy_ci_low']:.4f}, {heldout['accuracy_ci_high']:.4f}] |
| mean per-class accuracy | {heldout['mean_class_accuracy']:.4f} |
| macro F1 | {heldout['macro_f1']:.4f} |
| log loss | {heldout['log_loss']:.4f} |
| expected calibration error | {ece} |

Selection: {selection['method']} on the {selection['split']} images ({selection['n']}); selection accuracy
{selection['accuracy']:.4f} over {len(selection['candidates'])} candidates. The chosen setting was then refit on those images.

## Training data

| class | {' | '.join(SPLITS)} | held-out recall |
| --- | {' | '.join('---:' for _ in SPLITS)} | ---: |
{rows}

## Provenance

- backbone weights: `{weights_path}`, sha256 `{metrics['features']['weights_sha256']}`
- features: `{metrics['features']['path']}`, sha256 `{metrics['features']['sha256']}` (precision {metrics['features'].get('precision')}, TTA {metrics['features'].get('tta')})
- manifest sha256 `{metrics['features']['manifest_sha256']}`
- preprocessing: resize short side to {pre.get('resize')} ({pre.get('interpolation')}), centre crop {pre.get('input_size')}, mean {pre.get('mean')}, std {pre.get('std')}

## Intended use and limits

For images like the training images: the same classes, camera or microscope, framing and resolution. It always
answers with one of the {len(classes)} classes above, also for images of none of them (no rejection option); check
the calibration before trusting its probabilities as confidences. The interval above is for images drawn like the
held-out split; on another population (other site, device, time) accuracy can be lower. {len(heldout.get('per_class', {}))}
classes were evaluated on {heldout['n']} images: small classes have wide per-class uncertainty.

## How to run it

```bash
python -m stages.predict path/to/image_or_folder --model {model_path} --topk 3
python -m stages.predict path/to/image_or_folder --model {model_path} --engine onnxruntime  # the .onnx beside it
```
"""


def calibration_sentence(calibration: dict[str, Any]) -> str:
    """How the card's classifier turns scores into probabilities (metrics.json "calibration")."""
    if calibration["method"] != "temperature":
        return f"Its probabilities are not temperature-scaled ({calibration.get('reason', 'head.calibration: none')})."
    return (f"Its probabilities are temperature-scaled: softmax(logits / T), T = {calibration['temperature']:.4g}, "
            f"fitted on the out-of-fold logits of {calibration['fitted_on']['images']} selection images; held-out "
            f"log loss {calibration['heldout']['log_loss_before']:.4f} -> "
            f"{calibration['heldout']['log_loss_after']:.4f}.")


def escape_md(text: str) -> str:
    """A class name safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

