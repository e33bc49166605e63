"""Build the files `test_tflite_update.py` needs, for an environment without torch (the legacy venv).

`python -m tests.agent.build_tflite_fixture OUT` (in the main venv) writes `OUT/digits-cnn.onnx`,
`OUT/digits-cnn-int8.tflite` and `OUT/x.npy`; `EDGEFLEET_TFLITE_FIXTURE_DIR=OUT` makes the test use
them instead of training the CNN. `make test` does this to run the TFLite test once under
tflite-runtime 2.14 with NumPy 1.x, the way an older ARM board installs the agent.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

SAMPLES = 60


def build(out: Path) -> None:
    """Train the reference CNN, export ONNX, convert to int8 TFLite, save held-out inputs."""
    from compression.cnn import INPUT_SHAPE, build_reference_cnn
    from compression.data import load_dataset
    from compression.variants import build_variant

    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    cnn = build_reference_cnn(work, epochs=15)
    variant = build_variant(
        "tflite-int8",
        onnx_model=cnn.onnx_path,
        torch_program=cnn.program_path,
        calibration=load_dataset("digits-train"),
        out_dir=work,
    )
    shutil.copyfile(cnn.onnx_path, out / "digits-cnn.onnx")
    shutil.copyfile(variant.path, out / "digits-cnn-int8.tflite")
    np.save(out / "x.npy", load_dataset("digits").shaped(INPUT_SHAPE)[:SAMPLES])
    shutil.rmtree(work)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.agent.build_tflite_fixture OUT")
    build(Path(sys.argv[1]))
