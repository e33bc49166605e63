"""Reference profiles (`protocol.profiles`): a model run over reference data, sketched the way devices sketch.

`build_profile` runs the ONNX model on every sample of the data (all outputs, in chunks of its fixed batch if it
has one), reads the outputs with the version's semantics (`protocol.outputs`), feeds the same `SketchSet` an agent
feeds, counts classes, and — for a classifier with labels — measures accuracy and calibrates the top-1
confidence against correctness (isotonic regression, so the estimate rises with confidence), summarised in at
most `bins` ranges of equal population.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from compression.data import Dataset, fixed_batches
from compression.errors import InvalidInputError
from compression.specs import tensor_specs
from protocol.outputs import OutputSemantics, infer_output_semantics, predictions
from protocol.profiles import CalibrationBin, ReferenceProfile
from protocol.sketches import SketchSet

__all__ = ["CALIBRATION_BINS", "build_profile", "calibration_bins", "write_profile"]

CALIBRATION_BINS = 20


def build_profile(
    model_path: Path,
    data: Dataset,
    *,
    semantics: OutputSemantics | None = None,
    bins: int = CALIBRATION_BINS,
    source: str = "",
) -> ReferenceProfile:
    """The reference profile of `model_path` over `data` (labels, if any, give accuracy and calibration)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unloadable models
        raise InvalidInputError(f"{model_path}: ONNX Runtime cannot load this model ({exc})") from exc
    _, outputs = tensor_specs(model_path)
    semantics = semantics or infer_output_semantics(outputs)
    model_input = session.get_inputs()[0]
    sample_shape = tuple(int(d) if isinstance(d, int) else 1 for d in model_input.shape[1:])
    first = model_input.shape[0] if model_input.shape else None
    batch = first if isinstance(first, int) and first > 0 else 256
    x = data.shaped(sample_shape)
    names = [o.name for o in session.get_outputs()]
    sketches, classes, top1 = SketchSet(), Counter[int](), []
    predicted: list[np.ndarray] = []
    for chunk, rows in fixed_batches(x, batch):
        try:
            values = session.run(None, {model_input.name: chunk})
        except Exception as exc:  # wrap onnxruntime's own exception types at the boundary
            raise InvalidInputError(f"{model_path.name}: ONNX Runtime failed to run the model ({exc})") from exc
        outs = {name: np.asarray(v)[:rows] for name, v in zip(names, values, strict=True)}
        read = predictions(semantics, outs)
        sketches.update(chunk[:rows], read)
        if read.classes is not None:
            classes.update(int(c) for c in read.classes)
            predicted.append(np.asarray(read.classes))
        if read.top1 is not None:
            top1.append(np.asarray(read.top1, dtype=np.float64))
    wire = sketches.to_wire()
    if wire is None:
        raise InvalidInputError(f"{data.name}: no samples to profile")
    accuracy, calibration = None, []
    if data.y is not None and predicted and semantics.kind == "classifier":
        labels = np.asarray(data.y).reshape(-1).astype(np.int64)
        right = np.concatenate(predicted) == labels
        accuracy = float(right.mean())
        if top1:
            calibration = calibration_bins(np.concatenate(top1), right, bins=bins)
    return ReferenceProfile(
        semantics=semantics,
        rows=len(x),
        sketches=wire,
        class_counts={str(k): v for k, v in sorted(classes.items())},
        accuracy=accuracy,
        calibration=calibration,
        source=source[:256],
    )


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, *, bins: int = CALIBRATION_BINS
) -> list[CalibrationBin]:
    """Ranges of top-1 confidence with the (isotonic, so non-decreasing) share of right predictions in each."""
    from sklearn.isotonic import IsotonicRegression

    order = np.argsort(confidence, kind="stable")
    conf = np.clip(confidence[order], 0.0, 1.0)
    right = correct[order].astype(np.float64)
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit_transform(conf, right)
    out: list[CalibrationBin] = []
    for part in np.array_split(np.arange(len(conf)), min(bins, len(conf))):
        if len(part) == 0:
            continue
        low = float(conf[part[0]]) if not out else out[-1].high
        out.append(
            CalibrationBin(low=low, high=float(conf[part[-1]]), rows=len(part), accuracy=float(fitted[part].mean()))
        )
    return out


def write_profile(profile: ReferenceProfile, path: Path) -> Path:
    """Write the profile as JSON (what `edgefleet models push --profile` and `--variants` read)."""
    path.write_text(profile.model_dump_json(indent=None) + "\n")
    return path
