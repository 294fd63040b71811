"""Config loading errors and the CLI entry point."""

import json
import subprocess
import sys

import pytest

from adaptive.cli import main
from adaptive.config import load_toml
from adaptive.errors import ConfigError


def test_config_invalid_toml_and_missing_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[stage\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(p)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "nope.toml")


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "RESEARCH USE ONLY" in out


def test_logs_are_json_lines_when_not_a_terminal():
    code = ("from adaptive.log import configure_logging, get_logger, bind;"
            "configure_logging(json=None); bind(case_id='pelvis', fraction=2);"
            "get_logger().info('hello', stage='x')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       check=False)
    line = json.loads(p.stderr.strip().splitlines()[-1])
    assert line["event"] == "hello" and line["case_id"] == "pelvis" and line["fraction"] == 2


@pytest.mark.parametrize("text, key", [
    ('[gateway]\nport = "11112"\n', "gateway.port"),          # a string is not an integer
    ("[gateway.access]\ncheck_called_ae_title = 1\n", "gateway.access.check_called_ae_title"),
    ("[tms]\nretries = 2.5\n", "tms.retries"),
    ("[orchestrator]\nheartbeat_liveness = 1\n", "orchestrator.heartbeat_liveness"),
    ("[workers]\nplaning = 1\n", "workers.planing"),
    ("[gatway]\n", "gatway"),
])
def test_typed_config_errors_name_file_and_key(tmp_path, text, key):
    from services.config import load_services_config

    p = tmp_path / "services.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_services_config(p)
    assert str(p) in str(e.value) and f"{key}:" in str(e.value), str(e.value)


def test_typed_config_defaults_are_the_model_defaults(tmp_path):
    """An empty services file is the model's defaults, the same as the shipped file's values
    wherever the shipped file sets them (tested against the file's text, read by tomllib)."""
    import tomllib

    from adaptive.config import config_path
    from services.config import load_services_config

    (tmp_path / "empty.toml").write_text("")
    empty = load_services_config(tmp_path / "empty.toml")
    shipped = tomllib.loads(config_path("services.toml").read_text())
    for section in ("gateway", "orchestrator", "tms"):
        for key, value in shipped[section].items():
            if not isinstance(value, dict):
                got = getattr(getattr(empty, section), key)
                assert got == value, (section, key, got, value)


def test_safety_config_wrong_type_names_table_and_key(tmp_path):
    from adaptive.config import config_path
    from adaptive.pipeline.safety import SafetySettings

    bad = tmp_path / "safety.toml"
    bad.write_text(config_path("safety.toml").read_text().replace(
        "min_nmi = 1.23", 'min_nmi = "1.23"'))
    with pytest.raises(ConfigError, match=r"safety\.toml: registration\.min_nmi: "):
        SafetySettings.load(bad)


def test_write_toml_round_trips_through_tomllib(tmp_path):
    """The writer is tomli-w: keys that need quoting, nested tables and paths come back."""
    import tomllib
    from pathlib import Path

    from adaptive.config import write_toml

    data = {"gateway": {"access": {"peers": {"MY LINAC": {"roles": ["imaging"]}}}},
            "paths": {"root": Path("/tmp/x y")}, "n": 3, "f": 0.5, "b": True}
    p = write_toml(tmp_path / "out.toml", data)
    assert tomllib.loads(p.read_text()) == {**data, "paths": {"root": "/tmp/x y"}}
