"""The local sample store (federated retraining): served requests kept per model, labels fed back over HTTP.

Real parts: a real agent (or `create_app` on real uvicorn) serving the digits model in ONNX Runtime, the
store's SQLite file read back the way the device's ClientApp reads it (sqlite3 + numpy).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent import Agent, AgentConfig, ConfigError
from agent.config import load_config
from agent.samples import LabelEntry, LabelsError, SampleStore, parse_labels, sample_store_path
from protocol.inference import INFERENCE_HEADER_CONTENT_LENGTH
from tests.agent.conftest import install_model, model_spec
from tests.agent.test_server import digits_serving, endpoint, offline_config

ROWS = np.random.default_rng(12).random((3, 64), dtype=np.float32)
TOKEN = "s3cret-token-of-the-device"


def infer_body(rows: np.ndarray, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]
    }
    if request_id is not None:
        body["id"] = request_id
    return body


def stored(path: Path, model: str = "digits") -> list[dict[str, Any]]:
    """The store's rows of `model` in insertion order, as the ClientApp reads them (read-only)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM samples WHERE model = ? ORDER BY id", (model,))]


def as_array(row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(row["data"], dtype=np.dtype(row["dtype"])).reshape(json.loads(row["shape"]))


@contextmanager
def sampled_endpoint(
    tmp_path: Path, model_bytes: bytes, rates: dict[str, float], **options: Any
) -> Iterator[tuple[httpx.Client, SampleStore]]:
    """`create_app` with the digits model and a sample store on real uvicorn; a client on it."""
    max_rows = options.pop("max_rows", 5000)
    store = SampleStore(tmp_path / "samples" / "samples.sqlite3", rates=rates, max_rows=max_rows, seed=1)
    with (
        endpoint(digits_serving(tmp_path, model_bytes), samples=store, **options) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        yield client, store
    store.close()


@pytest.fixture(scope="module")
def sampling_agent(tmp_path_factory: pytest.TempPathFactory, digits_model_bytes: bytes) -> Iterator[Agent]:
    """A real agent serving digits with every request of it sampled (its broker is absent on purpose)."""
    data_dir = tmp_path_factory.mktemp("sampling") / "data"
    install_model(data_dir, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    agent = Agent(offline_config(data_dir, sample_rates={"digits": 1.0}))
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def client(sampling_agent: Agent) -> Iterator[httpx.Client]:
    assert sampling_agent.inference_url is not None
    with httpx.Client(base_url=sampling_agent.inference_url, timeout=10) as http:
        yield http


# -- keeping served requests ------------------------------------------------------------------------------


def test_rate_one_keeps_every_row_of_a_served_request_as_sent(sampling_agent: Agent, client: httpx.Client) -> None:
    response = client.post("/v2/models/digits/infer", json=infer_body(ROWS, "batch-of-3"))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "batch-of-3"  # echoed, as the protocol says

    rows = [r for r in stored(sample_store_path(sampling_agent.config.data_dir)) if r["request_id"] == "batch-of-3"]
    assert [r["row"] for r in rows] == [0, 1, 2]
    assert {(r["model"], r["version"], r["input_name"], r["dtype"]) for r in rows} == {
        ("digits", "1.0", "input", "float32")
    }
    for row, sent in zip(rows, ROWS, strict=True):
        assert json.loads(row["shape"]) == [64]  # one example, without the batch axis
        back = as_array(row)
        assert back.dtype == sent.dtype and back.shape == sent.shape
        assert back.tobytes() == sent.tobytes()
        assert row["label"] is None and row["labelled_at"] is None and row["created_at"] > 0
    stats = sampling_agent.sample_stats
    assert stats is not None and stats.rows["digits"] >= 3 and stats.errors == 0


def test_binary_tensor_data_round_trips_bytes_exactly(sampling_agent: Agent, client: httpx.Client) -> None:
    rows = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    header = json.dumps(
        {
            "id": "binary-2",
            "inputs": [
                {"name": "input", "shape": [2, 64], "datatype": "FP32", "parameters": {"binary_data_size": rows.nbytes}}
            ],
        }
    ).encode()
    response = client.post(
        "/v2/models/digits/infer",
        content=header + rows.tobytes(),
        headers={INFERENCE_HEADER_CONTENT_LENGTH: str(len(header)), "content-type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    kept = [r for r in stored(sample_store_path(sampling_agent.config.data_dir)) if r["request_id"] == "binary-2"]
    np.testing.assert_array_equal(np.stack([as_array(r) for r in kept]), rows)


def test_request_without_an_id_gets_one_to_label_it_by(sampling_agent: Agent, client: httpx.Client) -> None:
    first = client.post("/v2/models/digits/infer", json=infer_body(ROWS[:1])).json()["id"]
    second = client.post("/v2/models/digits/infer", json=infer_body(ROWS[:1])).json()["id"]
    assert len(first) == 32 and int(first, 16) >= 0 and first != second  # uuid4 hex, one per request
    ids = {r["request_id"] for r in stored(sample_store_path(sampling_agent.config.data_dir))}
    assert {first, second} <= ids


def test_labels_are_stored_by_request_and_row(sampling_agent: Agent, client: httpx.Client) -> None:
    client.post("/v2/models/digits/infer", json=infer_body(ROWS, "three-rows"))
    one = client.post("/v2/models/digits/infer", json=infer_body(ROWS[:1])).json()["id"]
    before = sampling_agent.sample_stats
    assert before is not None

    response = client.post(
        "/v2/models/digits/labels",
        json={"labels": [{"id": "three-rows", "label": [7, 1, 4]}, {"id": one, "label": 2.5}]},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"stored": 4, "unknown": []}

    rows = {(r["request_id"], r["row"]): r for r in stored(sample_store_path(sampling_agent.config.data_dir))}
    assert [json.loads(rows[("three-rows", i)]["label"]) for i in range(3)] == [7, 1, 4]
    assert json.loads(rows[(one, 0)]["label"]) == 2.5
    assert all(rows[k]["labelled_at"] is not None for k in [("three-rows", 0), (one, 0)])
    after = sampling_agent.sample_stats
    assert after is not None and after.labels_stored == before.labels_stored + 4
    assert after.labelled["digits"] >= 4


def test_unknown_ids_are_reported_and_known_ones_still_stored(client: httpx.Client) -> None:
    client.post("/v2/models/digits/infer", json=infer_body(ROWS[:1], "known-1"))
    response = client.post(
        "/v2/models/digits/labels",
        json={
            "labels": [
                {"id": "never-sent", "label": 1},
                {"id": "known-1", "label": 3},
                {"id": "never-sent", "label": 2},
            ]
        },
    )
    assert response.status_code == 200
    assert response.json() == {"stored": 1, "unknown": ["never-sent"]}


def test_a_reused_id_replaces_the_earlier_request(sampling_agent: Agent, client: httpx.Client) -> None:
    client.post("/v2/models/digits/infer", json=infer_body(ROWS, "reused"))
    client.post("/v2/models/digits/infer", json=infer_body(ROWS[2:], "reused"))
    rows = [r for r in stored(sample_store_path(sampling_agent.config.data_dir)) if r["request_id"] == "reused"]
    assert [r["row"] for r in rows] == [0]
    np.testing.assert_array_equal(as_array(rows[0]), ROWS[2])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "the body is not JSON"),
        (b"[1, 2]", 'a JSON object with a "labels" list'),
        (b'{"label": 3}', 'a JSON object with a "labels" list'),
        (b'{"labels": {"id": "x"}}', '"labels" must be a list'),
        (b'{"labels": ["x"]}', "labels[0] must be an object"),
        (b'{"labels": [{"label": 3}]}', "labels[0].id must be the request id"),
        (b'{"labels": [{"id": "x"}]}', "labels[0] has no label"),
        (b'{"labels": [{"id": "x", "label": "cat"}]}', "labels[0].label must be an int (class index) or a float"),
        (b'{"labels": [{"id": "x", "label": true}]}', "labels[0].label must be an int"),
        (b'{"labels": [{"id": "x", "label": [1, [2]]}]}', "labels[0].label[1] must be an int"),
        (b'{"labels": [{"id": "x", "label": NaN}]}', "must be a finite number"),
        (b'{"labels": [{"id": "x", "label": []}]}', "empty list"),
        (
            b'{"labels": [{"id": "known-1", "label": 1}, {"id": "three", "label": [1, 2]}]}',
            "had 3 rows, its label list has 2",
        ),
        (b'{"labels": [{"id": "three", "label": 1}]}', "had 3 rows; give a list of 3 labels"),
    ],
)
def test_bad_label_bodies_are_400_naming_the_problem_and_store_nothing(
    sampling_agent: Agent, client: httpx.Client, content: bytes, fragment: str
) -> None:
    client.post("/v2/models/digits/infer", json=infer_body(ROWS, "three"))
    client.post("/v2/models/digits/infer", json=infer_body(ROWS[:1], "known-1"))
    response = client.post("/v2/models/digits/labels", content=content)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]
    labelled = {r["request_id"] for r in stored(sample_store_path(sampling_agent.config.data_dir)) if r["label"]}
    assert "known-1" not in labelled  # all or nothing: the good entry before the bad one was not kept either


# -- rates and opt-in -------------------------------------------------------------------------------------


def test_rate_zero_keeps_nothing_but_requests_still_get_ids(tmp_path: Path, digits_model_bytes: bytes) -> None:
    with sampled_endpoint(tmp_path, digits_model_bytes, {"digits": 0.0}) as (client, store):
        answer = client.post("/v2/models/digits/infer", json=infer_body(ROWS)).json()
        assert answer["id"]
        labels = client.post("/v2/models/digits/labels", json={"labels": [{"id": answer["id"], "label": [1, 2, 3]}]})
        assert labels.json() == {"stored": 0, "unknown": [answer["id"]]}
        assert store.stats().kept == 0


def test_model_not_opted_in_keeps_nothing_gets_no_id_and_takes_no_labels(
    tmp_path: Path, digits_model_bytes: bytes
) -> None:
    with sampled_endpoint(tmp_path, digits_model_bytes, {"other-model": 1.0}) as (client, store):
        answer = client.post("/v2/models/digits/infer", json=infer_body(ROWS)).json()
        assert "id" not in answer
        labels = client.post("/v2/models/digits/labels", json={"labels": []})
        assert labels.status_code == 404
        assert labels.json()["error"] == ("sampling is not enabled for model 'digits' on this device: set sample_rates")
        assert store.stats().kept == 0


def test_agent_without_sample_rates_has_no_store_and_no_labels_route(tmp_path: Path, digits_model_bytes: bytes) -> None:
    data_dir = tmp_path / "data"
    install_model(data_dir, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    with Agent(offline_config(data_dir)) as agent:
        assert agent.sample_stats is None
        assert agent.inference_url is not None
        with httpx.Client(base_url=agent.inference_url, timeout=10) as client:
            assert "id" not in client.post("/v2/models/digits/infer", json=infer_body(ROWS)).json()
            assert client.post("/v2/models/digits/labels", json={"labels": []}).status_code == 404
    assert not sample_store_path(data_dir).exists()


def test_a_fraction_is_decided_per_request_and_keeps_whole_batches(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s.sqlite3", rates={"m": 0.5}, seed=7)
    kept = [store.offer(f"r{i}", "m", "1", {"x": np.zeros((2, 4), np.float32)}) for i in range(200)]
    assert set(kept) == {0, 2}  # all rows of a request, or none
    assert 70 <= kept.count(2) <= 130
    assert store.stats().rows == {"m": kept.count(2) * 2}


# -- bounds, shapes and failures --------------------------------------------------------------------------


def test_oldest_rows_of_a_model_are_dropped_beyond_the_bound_and_counted(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s.sqlite3", rates={"m": 1.0, "n": 1.0}, max_rows=5)
    for i in range(3):
        store.offer(f"r{i}", "m", "1", {"x": np.full((2, 3), i, np.float32)})
    store.offer("other", "n", "1", {"x": np.zeros((4, 3), np.float32)})  # another model's rows do not count
    rows = stored(store.path, "m")
    assert [(r["request_id"], r["row"]) for r in rows] == [("r0", 1), ("r1", 0), ("r1", 1), ("r2", 0), ("r2", 1)]
    stats = store.stats()
    assert stats.dropped == {"m": 1} and stats.rows == {"m": 5, "n": 4}
    # A request that lost its first rows still knows its batch size: the list covers the rows that are left.
    result = store.label("m", [LabelEntry("r0", [3, 4])])
    assert result.stored == 1 and json.loads(stored(store.path, "m")[0]["label"]) == 4


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.int8).reshape(2, 3, 4),
        np.linspace(0, 1, 10, dtype=np.float64).reshape(5, 2),
        np.array([[True, False], [False, True]]),
        np.arange(6, dtype=np.uint16).reshape(3, 2)[:, ::-1],  # not C-contiguous: stored as C order
        np.arange(4, dtype=np.float16).reshape(4),  # one scalar per row
    ],
    ids=["int8-3d", "float64", "bool", "non-contiguous", "scalar-rows"],
)
def test_rows_read_back_with_numpy_equal_the_inputs(tmp_path: Path, array: np.ndarray) -> None:
    store = SampleStore(tmp_path / "s.sqlite3", rates={"m": 1.0})
    assert store.offer("r", "m", "1", {"in": array}) == len(array)
    back = np.stack([as_array(r) for r in stored(store.path, "m")])
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_multi_input_requests_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SampleStore(tmp_path / "s.sqlite3", rates={"m": 1.0})
    inputs = {"a": np.zeros((1, 2), np.float32), "b": np.zeros((1, 2), np.float32)}
    with caplog.at_level(logging.WARNING, logger="agent.samples"):
        assert store.offer("r1", "m", "1", inputs) == 0
        assert store.offer("r2", "m", "1", inputs) == 0
    assert store.stats().skipped == 2
    assert [r.getMessage() for r in caplog.records].count(
        "sample not kept: model 'm' has 2 inputs; only single-input models are sampled"
    ) == 1


@pytest.mark.parametrize("damage", ["corrupt file", "unwritable directory"])
def test_a_broken_store_does_not_break_inference(
    tmp_path: Path, digits_model_bytes: bytes, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    install_model(data_dir, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    path = sample_store_path(data_dir)
    if damage == "corrupt file":
        path.parent.mkdir(parents=True)
        path.write_bytes(b"this is not an SQLite database, not at all" * 100)
    else:
        path.parent.write_text("a file where the samples directory should be")  # mkdir fails (also as root)
    with Agent(offline_config(data_dir, sample_rates={"digits": 1.0})) as agent:
        assert agent.inference_url is not None
        with httpx.Client(base_url=agent.inference_url, timeout=10) as client, caplog.at_level(logging.WARNING):
            for _ in range(3):
                answer = client.post("/v2/models/digits/infer", json=infer_body(ROWS))
                assert answer.status_code == 200 and len(answer.json()["outputs"][0]["data"]) == 30
            labels = client.post("/v2/models/digits/labels", json={"labels": [{"id": "x", "label": 1}]})
        stats = agent.sample_stats
    assert labels.status_code == 503 and "sample store" in labels.json()["error"]
    assert stats is not None and stats.errors >= 3 and stats.kept == 0
    failures = [r for r in caplog.records if r.name == "agent.samples" and "keeping samples failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]  # once per kind, then only counted


def test_labels_need_the_token_and_keep_the_body_limit(tmp_path: Path, digits_model_bytes: bytes) -> None:
    options = {"token": TOKEN, "max_request_bytes": 4096}
    with sampled_endpoint(tmp_path, digits_model_bytes, {"digits": 1.0}, **options) as (client, _store):
        body = {"labels": [{"id": "x", "label": 1}]}
        assert client.post("/v2/models/digits/labels", json=body).status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert client.post("/v2/models/digits/labels", json=body, headers=auth).status_code == 200
        huge = {"labels": [{"id": f"id-{i}", "label": i} for i in range(1000)]}
        assert client.post("/v2/models/digits/labels", json=huge, headers=auth).status_code == 413


def test_parse_labels_accepts_the_documented_shapes() -> None:
    entries = parse_labels(
        {"labels": [{"id": "r1", "label": 3}, {"id": "r2", "label": [1, 4]}, {"id": "r3", "label": 0.5}]}
    )
    assert entries == [LabelEntry("r1", 3), LabelEntry("r2", [1, 4]), LabelEntry("r3", 0.5)]
    with pytest.raises(LabelsError):
        parse_labels({"labels": [{"id": "", "label": 1}]})


# -- configuration ----------------------------------------------------------------------------------------


def test_sample_rates_come_from_the_file_or_the_environment(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        'device_id = "d1"\nmqtt_url = "mqtt://h:1883"\ndata_dir = "data"\nsample_store_max = 10\n'
        "[sample_rates]\ndigits = 0.25\n"
    )
    config = load_config(config_file, env={})
    assert config.sample_rates == {"digits": 0.25} and config.sample_store_max == 10
    env = {"EDGEFLEET_AGENT_SAMPLE_RATES": "digits=1,cam=0.5"}
    assert load_config(config_file, env=env).sample_rates == {"digits": 1.0, "cam": 0.5}
    with pytest.raises(ConfigError, match="sample_rates"):
        load_config(config_file, env={"EDGEFLEET_AGENT_SAMPLE_RATES": "digits=2"})


def test_sample_rates_must_be_shares(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="less than or equal to 1"):
        AgentConfig(device_id="d1", data_dir=tmp_path, mqtt_url="mqtt://h:1", sample_rates={"m": 1.5})
