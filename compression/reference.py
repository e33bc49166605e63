"""The reference model: a small classifier on scikit-learn's bundled 8x8 digits, exported to ONNX.

No download is needed: the digits data ships inside scikit-learn. The classifier is an MLP trained with
scikit-learn and written out as an ONNX graph (Gemm → Relu → Gemm → Softmax) with the `onnx` helpers,
so no converter is needed. Input `input`: FP32 `[batch, 64]`, pixel values scaled to 0..1.
Output `probabilities`: FP32 `[batch, 10]`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
N_FEATURES = 64
N_CLASSES = 10
OPSET = 17


@dataclass(frozen=True)
class DigitsSplit:
    """Digits features (FP32, scaled to 0..1) and labels, split into train and held-out test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Load scikit-learn's bundled digits and split them reproducibly."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsSplit(x_train, y_train, x_test, y_test)


@dataclass(frozen=True)
class ReferenceModel:
    """A serialized ONNX classifier and its accuracy on the held-out digits."""

    onnx_bytes: bytes
    accuracy: float


def train_digits_mlp(hidden: int = 32, seed: int = 0, max_iter: int = 300) -> ReferenceModel:
    """Train the reference MLP on the digits and export it to ONNX."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    split = load_digits_split(seed=seed)
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # A fixed iteration budget keeps training fast and reproducible; full convergence is not the point.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(split.x_train, split.y_train)
    weights = [w.astype(np.float32) for w in clf.coefs_]
    biases = [b.astype(np.float32) for b in clf.intercepts_]
    model = mlp_to_onnx(weights, biases)
    accuracy = float((clf.predict(split.x_test) == split.y_test).mean())
    return ReferenceModel(onnx_bytes=model.SerializeToString(), accuracy=accuracy)


def mlp_to_onnx(weights: list[np.ndarray], biases: list[np.ndarray], *, name: str = "digits-mlp") -> onnx.ModelProto:
    """An ONNX graph of a ReLU MLP with a softmax head, from its weight matrices and biases."""
    initializers = []
    nodes = []
    current = INPUT_NAME
    for index, (w, b) in enumerate(zip(weights, biases, strict=True)):
        w_name, b_name, out = f"W{index}", f"B{index}", f"gemm{index}"
        initializers += [numpy_helper.from_array(w, w_name), numpy_helper.from_array(b, b_name)]
        nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [out]))
        current = out
        if index < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{index}"]))
            current = f"relu{index}"
    nodes.append(helper.make_node("Softmax", [current], [OUTPUT_NAME], axis=1))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", weights[0].shape[0]])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", weights[-1].shape[1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgefleet")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def shifted_model(model_bytes: bytes, class_shift: int = 1) -> bytes:
    """A deliberately degraded copy whose predictions are rotated by `class_shift` classes (for tests)."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    last_w = next(i for i in graph.initializer if i.name == f"W{_last_layer(graph)}")
    last_b = next(i for i in graph.initializer if i.name == f"B{_last_layer(graph)}")
    w = np.roll(numpy_helper.to_array(last_w), class_shift, axis=1)
    b = np.roll(numpy_helper.to_array(last_b), class_shift)
    last_w.CopyFrom(numpy_helper.from_array(w.astype(np.float32), last_w.name))
    last_b.CopyFrom(numpy_helper.from_array(b.astype(np.float32), last_b.name))
    return model.SerializeToString()


def _last_layer(graph: onnx.GraphProto) -> int:
    return max(int(i.name[1:]) for i in graph.initializer if i.name.startswith("W"))
