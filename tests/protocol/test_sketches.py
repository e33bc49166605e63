"""Per-window KLL sketches: merges agree with exact quantiles, windows stay small, hostile bytes are refused."""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import numpy as np
import pytest
from datasketches import kll_floats_sketch

from protocol import Predictions, TelemetryWindow, decode, encode
from protocol.codec import MAX_PAYLOAD_BYTES
from protocol.sketches import (
    MAX_DIRECT_FEATURES,
    PROJECTIONS,
    SKETCH_K,
    SketchError,
    SketchSet,
    WindowSketches,
    decode_sketch,
    encode_sketch,
    feature_matrix,
)

QUANTILES = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]


def classifier_predictions(rng: np.random.Generator, n: int) -> Predictions:
    top1 = rng.uniform(0.3, 1.0, n)
    return Predictions(classes=rng.integers(0, 10, n), top1=top1, margin=top1 * rng.uniform(0, 1, n))


def test_merged_windows_agree_with_exact_quantiles_within_the_kll_bound() -> None:
    rng = np.random.default_rng(0)
    total = SketchSet("input")
    batches, tops = [], []
    for window in range(20):
        one = SketchSet("input")
        for _ in range(5):
            # Each window sees a shifted mixture: merging has to get the fleet-wide distribution right.
            batch = rng.normal(window * 0.1, 1.0 + window * 0.05, (100, 4)).astype(np.float32)
            batch[:, 3] = rng.exponential(2.0, 100)
            predicted = classifier_predictions(rng, 100)
            one.update(batch, predicted)
            batches.append(batch)
            tops.append(np.asarray(predicted.top1))
        wire = one.to_wire()
        assert wire is not None
        total.merge(decode(TelemetryWindow, encode(window_with(wire))).sketches)  # type: ignore[arg-type]
    data = np.concatenate(batches).astype(np.float64)
    assert total.rows == len(data) == 10_000 and total.feature_mode == "direct"
    bound = kll_floats_sketch.get_normalized_rank_error(SKETCH_K, False)
    for i in range(4):
        sketch = total.feature_sketch(i)
        assert sketch is not None and sketch.n == len(data)
        exact = np.sort(data[:, i].astype(np.float32))
        for q in QUANTILES:
            # The rank the exact data gives the sketch's quantile is within the bound of q.
            rank = np.searchsorted(exact, sketch.get_quantile(q), side="right") / len(exact)
            assert abs(rank - q) <= bound, (i, q, rank)
            assert abs(sketch.get_rank(float(np.quantile(exact, q))) - q) <= bound + 1 / len(exact)
    confidence = total.confidence_sketch()
    assert confidence is not None and confidence.n == 10_000
    exact_top = np.sort(np.concatenate(tops).astype(np.float32))
    for q in QUANTILES:
        rank = np.searchsorted(exact_top, confidence.get_quantile(q), side="right") / len(exact_top)
        assert abs(rank - q) <= bound


def window_with(sketches: WindowSketches | None, seq: int = 1) -> TelemetryWindow:
    now = datetime.now(UTC)
    return TelemetryWindow(
        device_id="dev-1",
        seq=seq,
        window_start=now,
        window_end=now,
        inference_count=1,
        error_count=0,
        sketches=sketches,
    )


def test_a_full_window_after_10000_rows_stays_far_below_the_payload_limit() -> None:
    rng = np.random.default_rng(1)
    sketches = SketchSet("input")
    for _ in range(100):
        sketches.update(rng.random((100, MAX_DIRECT_FEATURES)), classifier_predictions(rng, 100))
    wire = sketches.to_wire()
    assert wire is not None and len(wire.features) == MAX_DIRECT_FEATURES and wire.margin and wire.confidence
    payload = encode(window_with(wire))
    print(f"window with 16 direct features + confidence + margin after 10,000 rows: {len(payload)} bytes")
    assert len(payload) < 64 * 1024 < MAX_PAYLOAD_BYTES
    assert decode(TelemetryWindow, payload).sketches == wire


def test_direct_features_up_to_16_values_per_row_then_chunk_means_like_array_split() -> None:
    batch = np.arange(2 * 16, dtype=np.float32).reshape(2, 16)
    features, mode = feature_matrix(batch)
    assert mode == "direct" and features.dtype == np.float64 and np.array_equal(features, batch)
    images = np.random.default_rng(2).random((3, 1, 8, 9))  # 72 values a row: chunks of 9
    features, mode = feature_matrix(images)
    expected = [[chunk.mean() for chunk in np.array_split(row.ravel(), PROJECTIONS)] for row in images]
    assert mode == "chunk-means" and features.shape == (3, PROJECTIONS)
    np.testing.assert_allclose(features, expected)
    odd = np.random.default_rng(3).random((2, 19))  # uneven chunks: 3,3,3,2,2,2,2,2
    np.testing.assert_allclose(feature_matrix(odd)[0], [[c.mean() for c in np.array_split(r, 8)] for r in odd])
    assert feature_matrix(np.array([1, 2, 3]))[0].shape == (3, 1)  # a vector is rows of one value


@pytest.mark.parametrize("bad", [np.array([["a"]]), np.zeros((2, 0))])
def test_inputs_that_cannot_be_sketched_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(SketchError):
        SketchSet("input").update(bad, Predictions())


def test_windows_of_another_input_shape_are_refused_and_nothing_is_merged() -> None:
    rng = np.random.default_rng(4)
    mine, theirs = SketchSet("input"), SketchSet("input")
    mine.update(rng.random((10, 4)), classifier_predictions(rng, 10))
    theirs.update(rng.random((10, 64)), classifier_predictions(rng, 10))
    before = mine.to_wire()
    with pytest.raises(SketchError, match="8 chunk-means features do not merge with 4 direct"):
        mine.merge(theirs.to_wire())  # type: ignore[arg-type]
    with pytest.raises(SketchError, match="3 direct"):
        mine.update(rng.random((10, 3)), Predictions())
    assert mine.to_wire() == before


def test_a_regressor_window_sketches_values_and_no_confidence() -> None:
    sketches = SketchSet("x")
    sketches.update(np.ones((5, 2)), Predictions(values=np.arange(5.0)))
    wire = sketches.to_wire()
    assert wire is not None and wire.confidence is None and wire.margin is None and wire.value is not None
    value = decode_sketch(wire.value)
    assert value.n == 5 and value.get_max_value() == 4.0
    assert SketchSet("x").to_wire() is None  # nothing sketched: nothing on the wire


def test_older_windows_without_sketches_still_decode() -> None:
    window = window_with(None)
    raw = encode(window).replace(b',"sketches":null', b"")
    assert b"sketches" not in raw and decode(TelemetryWindow, raw).sketches is None


def test_every_real_sketch_decodes_to_the_same_sketch() -> None:
    rng = np.random.default_rng(5)
    merged = kll_floats_sketch(SKETCH_K)
    cases = [kll_floats_sketch(SKETCH_K), kll_floats_sketch(8)]
    for n in (1, 2, 199, 200, 201, 5_000, 100_000):
        s = kll_floats_sketch(SKETCH_K)
        s.update(rng.normal(size=n).astype(np.float32))
        merged.merge(s)
        cases += [s]
    cases.append(merged)
    for s in cases:
        back = decode_sketch(encode_sketch(s))
        assert back.serialize() == s.serialize()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        base64.b64encode(b"\x05\x01\x0f\x00").decode(),
        base64.b64encode(bytes(range(256)) * 4).decode(),
        "A" * 10_000_000,  # huge: refused before decoding
        base64.b64encode(b"\x05\x01\x0f\x00\xc8\x00\x08\x00" + b"\xff" * 12).decode(),  # n and levels absurd
    ],
)
def test_hostile_sketches_are_refused_cleanly(text: str) -> None:
    with pytest.raises(SketchError):
        decode_sketch(text)


def test_mutated_and_random_sketches_never_crash_the_decoder() -> None:
    # The DataSketches library segfaults or hangs on some malformed bytes; decode_sketch must refuse them first.
    # Run in a child process so that a crash fails this test rather than killing the test run.
    script = textwrap.dedent(
        """
        import base64, random
        import numpy as np
        from datasketches import kll_floats_sketch
        from protocol.sketches import SketchError, decode_sketch, encode_sketch
        rng, bases = random.Random(7), []
        for n in (0, 1, 37, 10_000):
            s = kll_floats_sketch(200)
            if n:
                s.update(np.random.default_rng(n).random(n).astype(np.float32))
            bases.append(s.serialize())
        accepted = refused = 0
        for _ in range(4000):
            b = bytearray(rng.choice(bases))
            how = rng.randrange(4)
            if how == 0:
                for _ in range(rng.randrange(1, 6)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            elif how == 1:
                b = b[: rng.randrange(len(b))]
            elif how == 2:
                b = bytearray(rng.randbytes(rng.randrange(300)))
            else:
                b[rng.randrange(min(24, len(b)))] = rng.randrange(256)
            try:
                d = decode_sketch(base64.b64encode(bytes(b)).decode())
            except SketchError:
                refused += 1
                continue
            merged = kll_floats_sketch(200)
            merged.merge(d)
            merged.get_quantile(0.5) if not merged.is_empty() else None
            encode_sketch(merged)
            accepted += 1
        print(accepted, refused)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"decoder crashed (rc {done.returncode}): {done.stderr[-2000:]}"
    accepted, refused = map(int, done.stdout.split())
    assert refused > 3000 and accepted + refused == 4000
