"""Configuration precedence and every configuration error."""

from __future__ import annotations

from pathlib import Path

import pytest

from wyoming_kyutai.settings import (
    DEFAULTS,
    Settings,
    SettingsError,
    build_settings,
    default_yaml,
    load_yaml,
)

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_cli_over_env_over_yaml_over_default() -> None:
    s = build_settings(
        {"slots": 2, "threads": 1, "device": "cpu"},
        {"WYOMING_KYUTAI_SLOTS": "3", "WYOMING_KYUTAI_THREADS": "5", "OTHER": "x"},
        {"threads": "7"},
    )
    assert (s.slots, s.threads, s.device, s.dtype) == (3, 7, "cpu", "auto")


def test_value_parsing() -> None:
    s = build_settings(
        {"languages": ["en"], "zeroconf": "kitchen"},
        {
            "WYOMING_KYUTAI_END_OF_TURN": "no",
            "WYOMING_KYUTAI_DATA_DIR": "null",
            "WYOMING_KYUTAI_SLOT_WAIT": "0.5",
        },
        {"languages": "en,fr"},
    )
    assert s.languages == ["en", "fr"] and s.end_of_turn is False
    assert s.data_dir is None and s.slot_wait == 0.5 and s.zeroconf == "kitchen"


@pytest.mark.parametrize(
    ("yaml_values", "env", "message"),
    [
        ({"nope": 1}, {}, "unknown setting 'nope' in the config file"),
        ({}, {"WYOMING_KYUTAI_NOPE": "1"}, "unknown setting 'nope' (environment variable"),
        ({"slots": "many"}, {}, "setting 'slots': expected an integer, got 'many'"),
        ({"slots": True}, {}, "setting 'slots': expected an integer, got True"),
        ({"slots": 0}, {}, "setting 'slots': must be at least 1, got 0"),
        ({"end_of_turn_threshold": 1.5}, {}, "setting 'end_of_turn_threshold': must be at most 1"),
        ({"slot_wait": "soon"}, {}, "setting 'slot_wait': expected a number, got 'soon'"),
        ({"offline": "maybe"}, {}, "setting 'offline': expected true or false, got 'maybe'"),
        ({"dtype": "int4"}, {}, "setting 'dtype': choose one of auto, float32, bfloat16"),
        ({"device": "tpu"}, {}, "setting 'device': auto, cpu, cuda or cuda:N; got 'tpu'"),
        ({"model": ""}, {}, "setting 'model': expected a non-empty string"),
        ({"languages": []}, {}, "setting 'languages': expected a list of strings"),
        ({"uri": "tcp://nohost"}, {}, "setting 'uri': use tcp://HOST:PORT"),
    ],
)
def test_bad_values_name_the_key(yaml_values: dict, env: dict, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        build_settings(yaml_values, env, {})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("slots: [1,\n")
    with pytest.raises(SettingsError, match="not valid YAML at line"):
        load_yaml(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SettingsError, match="expected a mapping of settings"):
        load_yaml(listy)
    with pytest.raises(SettingsError, match="cannot read it"):
        load_yaml(tmp_path / "missing.yaml")


def test_default_yaml_lists_every_setting_with_its_default() -> None:
    shipped = (ROOT / "config" / "default.yaml").read_text()
    assert shipped == default_yaml(), "regenerate config/default.yaml from settings.default_yaml()"
    loaded = load_yaml(ROOT / "config" / "default.yaml")
    assert loaded == DEFAULTS
    assert set(DEFAULTS) == set(Settings.__dataclass_fields__)
    assert build_settings(loaded) == build_settings()


def test_languages_are_normalised_and_numbers_must_be_finite() -> None:
    assert build_settings({"languages": ["en-US", "EN", "fr_FR"]}).languages == ["en", "fr"]
    for bad in ("nan", "inf"):
        with pytest.raises(SettingsError, match="expected a finite number"):
            build_settings({}, {"WYOMING_KYUTAI_AUDIO_TIMEOUT": bad}, {})


def test_home_assistant_settings() -> None:
    s = build_settings({}, {"WYOMING_KYUTAI_HASS_TOKEN": "abc"}, {"hass_url": "http://ha:8123"})
    assert (s.hass_url, s.hass_token) == ("http://ha:8123", "abc")
    assert build_settings().hass_url is None and build_settings().hass_token is None
    with pytest.raises(SettingsError, match="setting 'hass_url': use http"):
        build_settings({"hass_url": "ha:8123"})


def test_print_config_hides_the_token() -> None:
    from wyoming_kyutai.__main__ import config_text

    text = config_text(build_settings({"quantize": "none", "hass_token": "very-secret"}))
    assert "very-secret" not in text and "hass_token: <hidden>" in text
    assert "hass_token: null" in config_text(build_settings({"quantize": "none"}))
