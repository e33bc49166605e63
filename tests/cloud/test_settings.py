"""Settings: derived defaults, file < environment < explicit precedence, production refuses placeholders."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.errors import ConfigurationError
from cloud.settings import Environment, Settings, settings_error


def test_database_defaults_to_sqlite_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_DATA_DIR", str(tmp_path / "d"))
    settings = Settings()
    assert settings.data_dir == tmp_path / "d"
    assert settings.database_url == f"sqlite:///{tmp_path / 'd' / 'edgefleet.db'}"
    assert settings.mqtt_url is None and settings.topic_base == "edgefleet/v1"


def test_explicit_beats_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "edgefleet.toml"
    file.write_text(f'data_dir = "{tmp_path / "from-file"}"\nport = 9000\nhost = "0.0.0.0"\n')
    monkeypatch.setenv("EDGEFLEET_PORT", "9100")
    settings = Settings.load(file, host="127.0.0.2")
    assert settings.port == 9100 and settings.host == "127.0.0.2"
    assert settings.database_url == f"sqlite:///{tmp_path / 'from-file' / 'edgefleet.db'}"


def test_public_url_follows_the_bound_port_unless_set() -> None:
    assert Settings(host="0.0.0.0", port=0).resolved_public_url(43210) == "http://127.0.0.1:43210"
    assert Settings(public_url="https://fleet.example/").resolved_public_url(1) == "https://fleet.example"


@pytest.mark.parametrize("token", ["", "changeme", "admin", "short-token"])
def test_production_refuses_placeholder_admin_tokens(token: str) -> None:
    settings = Settings(environment=Environment.PRODUCTION, admin_token=token)
    with pytest.raises(ConfigurationError, match="refusing to start in production"):
        settings.check_production_ready()
    Settings(environment=Environment.DEVELOPMENT, admin_token=token).check_production_ready()
    Settings(environment=Environment.PRODUCTION, admin_token="x" * 40).check_production_ready()


def test_rejects_a_topic_base_with_wildcards() -> None:
    with pytest.raises(ValueError, match="invalid topic base"):
        Settings(topic_base="a/#")


def test_unreadable_settings_file_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ConfigurationError, match=r"cannot read settings file"):
        Settings.load(bad)


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"alert_webhook_urls": ["ftp://ops:hunter2@hooks.example"]}, "alert_webhook_urls"),
        ({"database_url": "mysql+nosuch://ops:hunter2@db.example/fleet"}, "database_url"),
        ({"database_url": "postgresql+psycopg://ops:hunter2@db.example:notaport/fleet"}, "database_url"),
    ],
)
def test_refused_settings_name_the_field_without_echoing_a_password(
    tmp_path: Path, given: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError) as refused:
        Settings(data_dir=tmp_path, **given)  # type: ignore[arg-type]
    message = settings_error(refused.value)  # pydantic's own message repeats the input; this one does not
    assert message.startswith(f"{field}: ") and "hunter2" not in message


@pytest.mark.parametrize(
    "given",
    ["mqtt://node-1:1883, mqtt://node-2:1884/", ["mqtt://node-1:1883", "mqtt://node-2:1884"]],
    ids=["comma-separated", "toml-list"],
)
def test_several_broker_urls_are_kept_as_one_list(tmp_path: Path, given: object) -> None:
    settings = Settings(data_dir=tmp_path, mqtt_url=given, device_mqtt_url=given)  # type: ignore[arg-type]
    assert settings.mqtt_url == settings.device_mqtt_url == "mqtt://node-1:1883,mqtt://node-2:1884"


def test_broker_list_from_a_settings_file(tmp_path: Path) -> None:
    path = tmp_path / "edgefleet.toml"
    path.write_text('mqtt_url = ["mqtts://node-1:8883", "mqtts://node-2:8883"]\n')
    assert Settings.load(path, data_dir=tmp_path).mqtt_url == "mqtts://node-1:8883,mqtts://node-2:8883"


@pytest.mark.parametrize(
    ("urls", "why"),
    [
        ("mqtts://ops:hunter2@node-1:8883,mqtt://node-2:1883", "mix TLS"),
        ("mqtt://ops:hunter2@node-1:1883,http://node-2", "must look like"),
        ("mqtt://ops:hunter2@node-1:1883,mqtt://node-2:port", "invalid port"),
    ],
)
@pytest.mark.parametrize("field", ["mqtt_url", "device_mqtt_url"])
def test_refused_broker_lists_name_the_field_without_echoing_a_password(
    tmp_path: Path, urls: str, why: str, field: str
) -> None:
    with pytest.raises(ValueError) as refused:
        Settings(data_dir=tmp_path, **{field: urls})  # type: ignore[arg-type]
    message = settings_error(refused.value)
    assert message.startswith(f"{field}: ") and why in message and "hunter2" not in message
