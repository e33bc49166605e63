"""Labelled traffic planted on real agents (federated retraining), and a fleet's federated settings."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from agent import Agent
from agent.samples import sample_store_path
from compression.reference import load_digits_split
from simulators import FleetConfig
from simulators.fleet import agent_config
from simulators.traffic import send_labelled, send_labelled_traffic
from tests.agent.conftest import install_model, model_spec
from tests.agent.test_server import offline_config

TOKEN = "token-of-the-simulated-device"


def sampling_agent(tmp_path: Path, model: bytes, rate: float) -> Agent:
    data_dir = tmp_path / "data"
    install_model(data_dir, model_spec("digits", "1.0", model), model)
    return Agent(offline_config(data_dir, sample_rates={"digits": rate}, http_token=TOKEN))


def test_labelled_traffic_plants_every_row_with_its_label(tmp_path: Path, digits_model_bytes: bytes) -> None:
    split = load_digits_split()
    inputs, labels = split.x_test[:37].astype(np.float32), split.y_test[:37]
    with sampling_agent(tmp_path, digits_model_bytes, 1.0) as agent:
        assert send_labelled_traffic(agent, inputs, labels, batch=8) == 37
        path = sample_store_path(agent.config.data_dir)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT dtype, shape, data, label FROM samples ORDER BY id").fetchall()
    assert len(rows) == 37
    kept = np.stack([np.frombuffer(data, dtype=dtype).reshape(json.loads(shape)) for dtype, shape, data, _ in rows])
    np.testing.assert_array_equal(kept, inputs)
    assert [json.loads(label) for *_, label in rows] == labels.tolist()


def test_requests_the_device_did_not_keep_come_back_unknown(tmp_path: Path, digits_model_bytes: bytes) -> None:
    split = load_digits_split()
    with sampling_agent(tmp_path, digits_model_bytes, 0.0) as agent:
        assert agent.inference_url is not None
        traffic = send_labelled(
            agent.inference_url, "digits", "input", split.x_test[:5], split.y_test[:5], batch=2, token=TOKEN
        )
    assert (traffic.requests, traffic.rows, traffic.stored) == (3, 5, 0)
    assert traffic.unknown == traffic.ids and len(set(traffic.ids)) == 3


def test_a_refused_request_names_the_device_answer(tmp_path: Path, digits_model_bytes: bytes) -> None:
    with sampling_agent(tmp_path, digits_model_bytes, 1.0) as agent:
        assert agent.inference_url is not None
        with pytest.raises(RuntimeError, match="401"):
            send_labelled(agent.inference_url, "digits", "input", np.zeros((1, 64), np.float32), [1])


def test_fleet_devices_get_the_federated_settings(tmp_path: Path) -> None:
    fleet = FleetConfig(
        devices=2,
        data_root=tmp_path,
        mqtt_url="mqtt://127.0.0.1:1883",
        federated=True,
        flower_bin_dir=tmp_path / "flower-bin",
        sample_rates={"digits": 0.5},
    )
    config = agent_config(fleet, 1)
    assert config.federated and config.flower_bin_dir == tmp_path / "flower-bin"
    assert config.sample_rates == {"digits": 0.5}
    assert not agent_config(FleetConfig(devices=1, data_root=tmp_path, mqtt_url="mqtt://h:1"), 0).federated
