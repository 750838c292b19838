"""Settings from env vars and TOML: parsing per type, validation, precedence, display."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from appliance.config import ConfigError, Settings, load_settings, settings_table


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("False", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_bool_spellings_parse(raw: str, expected: bool) -> None:
    assert load_settings(env={"FORCE_FP16": raw}).force_fp16 is expected
    assert load_settings(env={"USE_NVJPEG": raw}).use_nvjpeg is expected


def test_invalid_bool_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FORCE_FP16"):
        load_settings(env={"FORCE_FP16": "maybe"})


def test_int_and_float_parse() -> None:
    s = load_settings(env={"DET_BATCH_SIZE": "8", "PORT": "8080", "BATCH_WINDOW_MS": "3.5"})
    assert s.det_batch_size == 8
    assert isinstance(s.det_batch_size, int)
    assert s.port == 8080
    assert s.batch_window_ms == 3.5
    assert isinstance(s.batch_window_ms, float)


@pytest.mark.parametrize("raw", ["eight", "1.5", ""])
def test_invalid_int_raises_config_error_naming_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="DET_BATCH_SIZE"):
        load_settings(env={"DET_BATCH_SIZE": raw})


def test_invalid_float_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DET_THRESHOLD"):
        load_settings(env={"DET_THRESHOLD": "high"})


def test_out_of_range_int_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DET_BATCH_SIZE"):
        load_settings(env={"DET_BATCH_SIZE": "0"})
    with pytest.raises(ConfigError, match="PORT"):
        load_settings(env={"PORT": "70000"})


def test_max_size_parses_seed_format() -> None:
    assert load_settings(env={"MAX_SIZE": "640,480"}).max_size == (640, 480)
    assert load_settings(env={"MAX_SIZE": " 1024 , 768 "}).max_size == (1024, 768)


def test_max_size_with_wrong_count_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MAX_SIZE"):
        load_settings(env={"MAX_SIZE": "640"})
    with pytest.raises(ConfigError, match="MAX_SIZE"):
        load_settings(env={"MAX_SIZE": "640,640,3"})


def test_max_size_must_be_multiple_of_32() -> None:
    with pytest.raises(ConfigError, match="MAX_SIZE"):
        load_settings(env={"MAX_SIZE": "640,500"})
    with pytest.raises(ConfigError, match="MAX_SIZE"):
        Settings(max_size=(650, 640))
    with pytest.raises(ConfigError, match="MAX_SIZE"):
        Settings(max_size=(0, 0))


def test_url_allowlist_parses_comma_separated() -> None:
    s = load_settings(env={"URL_ALLOWLIST": "10.0.0.0/8, camera.local,"})
    assert s.url_allowlist == ("10.0.0.0/8", "camera.local")
    assert load_settings(env={"URL_ALLOWLIST": ""}).url_allowlist == ()


def test_literal_choices_case_insensitive() -> None:
    assert load_settings(env={"INFERENCE_BACKEND": "ONNX"}).inference_backend == "onnx"
    assert load_settings(env={"INFERENCE_BACKEND": "trt"}).inference_backend == "trt"
    assert load_settings(env={"LOG_FORMAT": "console"}).log_format == "console"


def test_invalid_literal_lists_choices_and_variable() -> None:
    with pytest.raises(ConfigError, match="INFERENCE_BACKEND") as info:
        load_settings(env={"INFERENCE_BACKEND": "tensorflow"})
    assert "auto, trt, onnx" in str(info.value)


def test_api_token_optional() -> None:
    assert load_settings(env={}).api_token is None
    assert load_settings(env={"API_TOKEN": ""}).api_token is None
    assert load_settings(env={"API_TOKEN": "  "}).api_token is None
    assert load_settings(env={"API_TOKEN": "s3cret"}).api_token == "s3cret"


def test_path_fields_parse() -> None:
    s = load_settings(env={"MODELS_DIR": "/tmp/m", "MODELS_OVERRIDE": ""})
    assert s.models_dir == Path("/tmp/m")
    assert s.models_override is None
    assert s.override_file == Path("/tmp/m/models.override.json")


def test_defaults_match_design() -> None:
    s = load_settings(env={})
    assert s.det_model == "scrfd_10g_gnkps"
    assert s.rec_model == "glintr100"
    assert s.max_size == (640, 640)
    assert s.det_batch_size == 1
    assert s.rec_batch_size == 4
    assert s.force_fp16 is True
    assert s.host == "0.0.0.0"
    assert s.port == 18080


def test_unrelated_env_vars_ignored() -> None:
    assert load_settings(env={"PATH": "/bin", "HOME": "/root"}) == Settings()


def test_threshold_order_checked() -> None:
    with pytest.raises(ConfigError, match="TEMP_WARM_C"):
        load_settings(env={"TEMP_WARM_C": "95"})  # above TEMP_HOT_C (90)
    with pytest.raises(ConfigError, match="RAM_WARM_PCT"):
        load_settings(env={"RAM_HOT_PCT": "96"})  # above RAM_CRITICAL_PCT (95)
    with pytest.raises(ConfigError, match="RAM_"):
        load_settings(env={"RAM_CRITICAL_PCT": "101"})
    ok = load_settings(env={"TEMP_WARM_C": "70", "TEMP_HOT_C": "75", "TEMP_CRITICAL_C": "76"})
    assert (ok.temp_warm_c, ok.temp_hot_c, ok.temp_critical_c) == (70.0, 75.0, 76.0)


def test_det_threshold_range_checked() -> None:
    with pytest.raises(ConfigError, match="DET_THRESHOLD"):
        load_settings(env={"DET_THRESHOLD": "1.5"})
    with pytest.raises(ConfigError, match="NMS_THRESHOLD"):
        load_settings(env={"NMS_THRESHOLD": "-0.1"})


def test_log_level_checked() -> None:
    assert load_settings(env={"LOG_LEVEL": "debug"}).log_level == "debug"
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        load_settings(env={"LOG_LEVEL": "chatty"})


def test_toml_file_via_argument(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(
        'det_model = "scrfd_2.5g_bnkps"\n'
        "rec_batch_size = 16\n"
        "force_fp16 = false\n"
        "det_threshold = 0.5\n"
        'models_dir = "/srv/models"\n'
    )
    s = load_settings(env={}, config_file=path)
    assert s.det_model == "scrfd_2.5g_bnkps"
    assert s.rec_batch_size == 16
    assert s.force_fp16 is False
    assert s.det_threshold == 0.5
    assert s.models_dir == Path("/srv/models")


def test_toml_tuple_values(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text('max_size = [320, 256]\nurl_allowlist = ["a.example", "10.1.0.0/16"]\n')
    s = load_settings(env={}, config_file=path)
    assert s.max_size == (320, 256)
    assert s.url_allowlist == ("a.example", "10.1.0.0/16")


def test_toml_file_via_appliance_config_env(tmp_path: Path) -> None:
    path = tmp_path / "from_env.toml"
    path.write_text("port = 9000\n")
    s = load_settings(env={"APPLIANCE_CONFIG": str(path)})
    assert s.port == 9000


def test_env_overrides_toml(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text("port = 9000\nrec_batch_size = 16\n")
    s = load_settings(env={"PORT": "9100"}, config_file=path)
    assert s.port == 9100
    assert s.rec_batch_size == 16


def test_explicit_overrides_win_over_env() -> None:
    s = load_settings(env={"PORT": "9100"}, port=9200)
    assert s.port == 9200
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_settings(env={}, no_such_setting=1)


def test_unknown_toml_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text("port = 9000\ndet_modle = 'typo'\n")
    with pytest.raises(ConfigError, match="det_modle"):
        load_settings(env={}, config_file=path)


def test_invalid_toml_value_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text('det_batch_size = "many"\n')
    with pytest.raises(ConfigError, match="DET_BATCH_SIZE"):
        load_settings(env={}, config_file=path)


def test_missing_or_broken_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="APPLIANCE_CONFIG"):
        load_settings(env={"APPLIANCE_CONFIG": str(tmp_path / "absent.toml")})
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(env={}, config_file=bad)


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    assert s.replace(port=1).port == 1
    assert s.port == 18080


def test_public_dict_hides_token() -> None:
    s = load_settings(env={"API_TOKEN": "hunter2", "MODELS_DIR": "/m"})
    public = s.public_dict()
    assert public["api_token"] is True
    assert "hunter2" not in repr(public)
    assert public["models_dir"] == "/m"
    assert public["max_size"] == [640, 640]
    assert Settings().public_dict()["api_token"] is False


def test_settings_table_lists_every_field() -> None:
    rows = settings_table()
    names = [r[0] for r in rows]
    assert names == [f.name.upper() for f in dataclasses.fields(Settings)]
    by_name = {r[0]: r for r in rows}
    assert by_name["MAX_SIZE"][2] == "640,640"
    assert by_name["PORT"][1:] == ("int", "18080")
    assert by_name["FORCE_FP16"][1:] == ("bool", "True")
    assert by_name["API_TOKEN"][2] == ""
    assert by_name["INFERENCE_BACKEND"][1] == "auto | trt | onnx"
    assert by_name["MODELS_DIR"][1] == "path"


@pytest.mark.parametrize(
    ("line", "env_name"), [("det_batch_size = 2.7", "DET_BATCH_SIZE"), ("port = true", "PORT")]
)
def test_toml_wrong_type_for_int_rejected(tmp_path: Path, line: str, env_name: str) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=env_name):
        load_settings(env={}, config_file=path)
