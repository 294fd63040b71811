"""Config loading errors and the CLI entry point."""

import json
import subprocess
import sys

import pytest

from adaptive.cli import main
from adaptive.config import check_keys, get_number, load_toml
from adaptive.errors import ConfigError


def test_config_typo_is_a_specific_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[stage]\nbudjet_s = 3\n")
    cfg = load_toml(p)
    with pytest.raises(ConfigError, match="budjet_s"):
        check_keys(cfg["stage"], {"budget_s"}, "c.toml[stage]")


def test_config_invalid_toml_and_missing_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[stage\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(p)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "nope.toml")


def test_get_number_bounds():
    with pytest.raises(ConfigError, match="below the minimum"):
        get_number({"x": -1}, "x", "s", minimum=0)
    with pytest.raises(ConfigError, match="expected a number"):
        get_number({"x": "1"}, "x", "s")
    assert get_number({}, "x", "s", default=2.0) == 2.0


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
