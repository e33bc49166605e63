"""The trainable form of a version (`compression.trainable`): it loads, trains, carries its weights as `.npz`
by parameter name, and gives back an ONNX model that answers like torch after new weights are applied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compression.cnn import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME, ReferenceCNN
from compression.errors import InvalidInputError
from compression.reference import load_digits_split
from compression.trainable import (
    export_onnx_from_trainable,
    input_shape,
    load_state_npz,
    load_trainable,
    read_state_npz,
    state_dict_npz,
)


def _train(module: torch.nn.Module, steps: int = 30) -> list[float]:
    split = load_digits_split()
    x = torch.from_numpy(split.x_train.reshape(-1, *INPUT_SHAPE))
    y = torch.from_numpy(split.y_train)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        idx = slice((step * 64) % (len(x) - 64), (step * 64) % (len(x) - 64) + 64)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _fresh_weights(module: torch.nn.Module) -> None:
    """Re-initialise every parameter (a model that has everything left to learn)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def test_trainable_form_loads_serves_any_batch_and_trains(reference_cnn: ReferenceCNN) -> None:
    module = load_trainable(reference_cnn.trainable_path)
    assert all(p.requires_grad for p in module.parameters())
    names = list(module.state_dict())
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias", "9.weight", "9.bias"]
    assert input_shape(reference_cnn.trainable_path) == INPUT_SHAPE
    for batch in (1, 3, 257):
        assert tuple(module(torch.zeros(batch, *INPUT_SHAPE)).shape) == (batch, 10)
    _fresh_weights(module)
    losses = _train(module, steps=150)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_state_dict_round_trips_through_npz(reference_cnn: ReferenceCNN, tmp_path: Path) -> None:
    trained = load_trainable(reference_cnn.trainable_path)
    _train(trained, steps=5)
    state_dict_npz(trained, tmp_path / "w.npz")
    arrays = read_state_npz(tmp_path / "w.npz")
    assert list(arrays) == list(trained.state_dict())
    other = load_state_npz(load_trainable(reference_cnn.trainable_path), tmp_path / "w.npz")
    for name, tensor in trained.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("9.bias"), "missing 9.bias"),
        (lambda a: a.update({"extra.weight": np.zeros(3, np.float32)}), "not in the model: extra.weight"),
        (lambda a: a.update({"9.weight": np.zeros((3, 32), np.float32)}), "9.weight (3, 32) (the model has (10, 32))"),
    ],
)
def test_rejects_weights_that_do_not_fit_the_model(
    reference_cnn: ReferenceCNN, tmp_path: Path, change: object, message: str
) -> None:
    module = load_trainable(reference_cnn.trainable_path)
    arrays = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    change(arrays)  # type: ignore[operator]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InvalidInputError, match="do not fit the model") as caught:
        load_state_npz(module, tmp_path / "bad.npz")
    assert message in str(caught.value)


def test_rejects_a_file_that_is_no_program(tmp_path: Path) -> None:
    (tmp_path / "x.pt2").write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match=r"not a torch\.export program"):
        load_trainable(tmp_path / "x.pt2")


def test_onnx_of_retrained_weights_answers_like_torch(reference_cnn: ReferenceCNN, tmp_path: Path) -> None:
    retrained = load_trainable(reference_cnn.trainable_path)
    _train(retrained, steps=10)
    state_dict_npz(retrained, tmp_path / "final.npz")
    candidate = load_state_npz(load_trainable(reference_cnn.trainable_path), tmp_path / "final.npz")
    onnx_path = export_onnx_from_trainable(
        candidate, INPUT_NAME, OUTPUT_NAME, tmp_path / "candidate.onnx", torch.zeros(1, *INPUT_SHAPE)
    )
    assert not list(tmp_path.glob("*.data")), "the ONNX model must be self-contained"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.name == INPUT_NAME and model_input.shape[1:] == list(INPUT_SHAPE)
    assert isinstance(model_input.shape[0], str), "the batch axis must be dynamic"
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    x = load_digits_split().x_test[:50].reshape(-1, *INPUT_SHAPE)
    (logits,) = session.run(None, {INPUT_NAME: x})
    with torch.no_grad():
        expected = candidate(torch.from_numpy(x)).numpy()
        parent = load_trainable(reference_cnn.trainable_path)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert np.abs(parent - expected).max() > 1e-3, "the new weights must have been applied"


def test_compress_copies_the_trainable_form_beside_the_variants(
    model_dir: Path, reference_cnn: ReferenceCNN, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from compression.cli import app

    (model_dir / "model.trainable.pt2").write_bytes(reference_cnn.trainable_path.read_bytes())
    out = tmp_path / "out"
    args = [str(model_dir / "model.onnx"), "--to", "int8-dynamic", "--out", str(out)]
    args += ["--latency-iterations", "3", "--no-memory"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert (out / "trainable.pt2").read_bytes() == reference_cnn.trainable_path.read_bytes()
    assert f"trainable form: {out / 'trainable.pt2'}" in result.stdout
    # Compressed again without one: the earlier trainable form must not be pushed with the new variants.
    (model_dir / "model.trainable.pt2").unlink()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert not (out / "trainable.pt2").exists()
