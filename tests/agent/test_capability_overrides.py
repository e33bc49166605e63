"""An operator (or a simulated fleet) can limit runtimes and pin what the variant policy sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.runtime import default_catalog


def test_restricting_runtimes_keeps_only_those_named() -> None:
    catalog = default_catalog()
    assert [n.partition("-")[0] for n in catalog.restricted_to(["litert"]).names()] == ["litert"]
    assert [n.partition("-")[0] for n in catalog.restricted_to(["onnxruntime"]).names()] == ["onnxruntime"]


def test_tflite_runtime_and_litert_stand_in_for_each_other() -> None:
    names = default_catalog().restricted_to(["tflite_runtime"]).names()
    assert len(names) == 1 and names[0].partition("-")[0] in {"litert", "tflite_runtime"}


def test_asking_for_a_runtime_that_is_not_installed_names_what_is() -> None:
    with pytest.raises(ConfigError, match=r"\['tensorrt'\] are not installed.*onnxruntime"):
        default_catalog().restricted_to(["onnxruntime", "tensorrt"])


def test_capability_overrides_come_from_toml_and_environment(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        'device_id = "board-1"\ndata_dir = "data"\ncoordinator_url = "http://127.0.0.1:8080"\n'
        'runtimes = ["litert"]\ncpu_features = ["asimd", "asimddp"]\n'
    )
    config = load_config(config_file, {"EDGEFLEET_AGENT_MEMORY_MB": "256", "EDGEFLEET_AGENT_RUNTIMES": "litert,"})
    assert config.runtimes == ["litert"]
    assert config.cpu_features == ["asimd", "asimddp"]
    assert config.memory_mb == 256
    with pytest.raises(ConfigError, match="memory_mb"):
        load_config(config_file, {"EDGEFLEET_AGENT_MEMORY_MB": "lots"})
