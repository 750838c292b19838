"""Model registry: built-in models, checksums, lookups and the operator's override file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.models.registry import (
    BUILTIN_MODELS,
    DEMO_DETECTOR,
    DEMO_RECOGNIZER,
    ModelRegistry,
    Preprocess,
    RegistryError,
)

# The published list (shared/MODELS.md): name -> (family, Google Drive id, md5 or None).
PUBLISHED = {
    "scrfd_500m_bnkps": ("scrfd", "1ccagW08CyKJoeFAmL2ao7pjwr3_m_Zm1", "03fd8fe67902798b7584b1e7ff3e0f6f"),
    "scrfd_10g_bnkps": ("scrfd", "1llbQa8HFle-45wscZulzGcNncPFgYruJ", "2740f9259d46355ca5fa0d9b54943524"),
    "scrfd_500m_gnkps": ("scrfd", "19CeBV03a3DEhZeas4olZn7GgiUESDu0L", "ef4bcb0606d6e5ebf325f8322e507a7b"),
    "scrfd_2.5g_gnkps": ("scrfd", "1_LeETpKhWL4sRPvLZEvka-bGNMN4tMOU", "50febd32caa699ef7a47cf7422c56bbd"),
    "scrfd_10g_gnkps": ("scrfd", "14BuXR6L73w1mwKXHPIcZlc9LYaid4Evl", "1d9b64bb0e6e18d4838872c9e7efd709"),
    "glintr100": ("arcface", "1TR_ImGvuY7Dt22a9BOAUAlHasFfkrJp-", "3b366b98f786426f79629ddb2e56629c"),
    "w600k_r50": ("arcface", "1_3WcTE64Mlt_12PZHNWdhVCRpoPiblwq", "80248d427976241cbd1343889ed132b3"),
    "w600k_mbf": ("arcface", "1GtBKfGucgJDRLHvGWR3jOQovHYXY-Lpe", "c5b029527cb6f874e057613fc10bae1b"),
    "arcface_r100_v1": ("arcface", "1sj170K3rbo5iOdjvjHw-hKWvXgH4dld3", None),
}  # fmt: skip
# The shared real models (shared/DATA.md): the operator supplies the files; sha256 pinned.
OPERATOR_SUPPLIED = {
    "scrfd_2.5g_bnkps": ("scrfd", "bc24bb349491481c3ca793cf89306723162c280cb284c5a5e49df3760bf5c2ce"),
    "mobilefacenet_128": ("arcface", "93fac2c9747e612f4f491c7842563a515ee2b6c237d9fee05e96291b07ac6019"),
}  # fmt: skip


def write_override(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "models.override.json"
    path.write_text(json.dumps(data))
    return path


def test_builtin_models_are_the_published_list_and_the_shared_real_models() -> None:
    assert set(BUILTIN_MODELS) == set(PUBLISHED) | set(OPERATOR_SUPPLIED)


@pytest.mark.parametrize("name", sorted(OPERATOR_SUPPLIED))
def test_shared_real_models_are_pinned_by_sha256_and_never_fetched(name: str) -> None:
    info = BUILTIN_MODELS[name]
    family, sha256 = OPERATOR_SUPPLIED[name]
    assert (info.family, info.file, info.url) == (family, f"{name}.onnx", None)
    assert info.checksum == f"sha256:{sha256}"


def test_registry_facts_of_the_shared_real_models() -> None:
    scrfd = BUILTIN_MODELS["scrfd_2.5g_bnkps"]
    # Opaque graph-number output names: the meaning order is recorded, not read from names.
    assert scrfd.output_order == tuple(range(9))
    assert scrfd.default_preprocess == Preprocess(mean=127.5, std=128.0, rgb=True)
    mbf = BUILTIN_MODELS["mobilefacenet_128"]
    assert mbf.default_preprocess == Preprocess(mean=127.5, std=127.5, rgb=True)
    assert mbf.normalizes_input is False


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builtin_checksums(name: str) -> None:
    info = BUILTIN_MODELS[name]
    family, file_id, md5 = PUBLISHED[name]
    assert info.name == name
    assert info.family == family
    assert info.file == f"{name}.onnx"
    assert info.url is not None and file_id in info.url
    if md5 is None:
        assert info.checksum is None
        assert not info.verified
    else:
        assert info.checksum is not None
        assert re.fullmatch(r"md5:[0-9a-f]{32}", info.checksum)
        assert info.checksum == f"md5:{md5}"
        assert info.verified


def test_only_arcface_r100_v1_is_unverified() -> None:
    unverified = [m.name for m in BUILTIN_MODELS.values() if m.checksum is None]
    assert unverified == ["arcface_r100_v1"]


def test_input_shapes_and_preprocessing() -> None:
    scrfd = BUILTIN_MODELS["scrfd_10g_gnkps"]
    assert scrfd.input_shape == (3, 640, 640)
    assert scrfd.keypoints
    assert scrfd.default_preprocess == Preprocess(mean=127.5, std=128.0)
    glint = BUILTIN_MODELS["glintr100"]
    assert glint.input_shape == (3, 112, 112)
    assert glint.default_preprocess == Preprocess(mean=127.5, std=127.5)
    assert glint.normalizes_input is False
    mxnet = BUILTIN_MODELS["arcface_r100_v1"]
    assert mxnet.normalizes_input is True
    assert mxnet.default_preprocess == Preprocess(mean=0.0, std=1.0)


def test_default_models_exist() -> None:
    registry = ModelRegistry.load()
    settings = Settings()
    assert settings.det_model in registry
    assert settings.rec_model in registry
    assert registry.get("scrfd_10g_gnkps").family == "scrfd"
    assert registry.get("glintr100").family == "arcface"
    assert DEMO_DETECTOR in registry
    assert DEMO_RECOGNIZER in registry


def test_demo_models_optional() -> None:
    registry = ModelRegistry.load(include_demo=False)
    assert DEMO_DETECTOR not in registry
    assert registry.names() == sorted(set(PUBLISHED) | set(OPERATOR_SUPPLIED))


def test_unknown_name_lists_known() -> None:
    registry = ModelRegistry.load()
    with pytest.raises(RegistryError, match="'scrfd_1g'") as info:
        registry.get("scrfd_1g")
    message = str(info.value)
    for name in PUBLISHED:
        assert name in message


def test_iteration_groups_by_family() -> None:
    models = list(ModelRegistry.load(include_demo=False))
    families = [m.family for m in models]
    assert families == ["arcface"] * 5 + ["scrfd"] * 6
    assert [m.name for m in models[:5]] == sorted(
        ["glintr100", "w600k_r50", "w600k_mbf", "arcface_r100_v1", "mobilefacenet_128"]
    )


def test_to_dict_is_json_ready() -> None:
    data = BUILTIN_MODELS["glintr100"].to_dict()
    assert data["input_shape"] == [3, 112, 112]
    json.dumps(data)


def test_missing_override_file_is_fine(tmp_path: Path) -> None:
    registry = ModelRegistry.load(tmp_path / "absent.json")
    assert "glintr100" in registry


def test_override_adds_scrfd_model(tmp_path: Path) -> None:
    path = write_override(
        tmp_path,
        {"my_scrfd": {"family": "scrfd", "file": "mine.onnx", "checksum": "sha256:" + "a" * 64}},
    )
    registry = ModelRegistry.load(path)
    info = registry.get("my_scrfd")
    assert info.family == "scrfd"
    assert info.file == "mine.onnx"
    assert info.input_shape == (3, 640, 640)
    assert info.checksum == "sha256:" + "a" * 64
    assert info.verified
    assert info.default_preprocess == Preprocess(mean=127.5, std=128.0)
    assert "glintr100" in registry  # built-ins stay


def test_override_adds_arcface_with_defaults_and_preprocess(tmp_path: Path) -> None:
    path = write_override(
        tmp_path,
        {
            "my_arc": {"family": "arcface", "mean": 0, "std": 1, "output_order": [0]},
            "plain_arc": {"family": "arcface"},
        },
    )
    registry = ModelRegistry.load(path)
    mine = registry.get("my_arc")
    assert mine.file == "my_arc.onnx"
    assert mine.input_shape == (3, 112, 112)
    assert mine.preprocess == Preprocess(mean=0.0, std=1.0)
    assert mine.output_order == (0,)
    assert mine.checksum is None
    assert registry.get("plain_arc").default_preprocess == Preprocess(mean=127.5, std=127.5)


def test_override_of_builtin_keeps_its_other_fields(tmp_path: Path) -> None:
    path = write_override(tmp_path, {"glintr100": {"file": "local_glint.onnx"}})
    info = ModelRegistry.load(path).get("glintr100")
    assert info.file == "local_glint.onnx"
    assert info.family == "arcface"
    assert info.checksum == "md5:3b366b98f786426f79629ddb2e56629c"


def test_override_sets_colour_order_and_normalisation_keeping_the_rest(tmp_path: Path) -> None:
    path = write_override(
        tmp_path,
        {
            "mobilefacenet_128": {"rgb": False},
            "bgr_raw": {"family": "arcface", "rgb": False, "normalizes_input": True},
            "glintr100": {"normalizes_input": None},  # detect from the graph instead
        },
    )
    registry = ModelRegistry.load(path)
    mbf = registry.get("mobilefacenet_128")
    assert mbf.default_preprocess == Preprocess(mean=127.5, std=127.5, rgb=False)
    assert mbf.checksum is not None and mbf.checksum.startswith("sha256:")
    raw = registry.get("bgr_raw")
    assert raw.normalizes_input is True and raw.default_preprocess.rgb is False
    assert registry.get("glintr100").normalizes_input is None


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"family": "yolo"}, "family"),
        ({"file": "x.onnx"}, "family"),  # a new model must say its family
        ({"family": "scrfd", "filename": "x.onnx"}, "unknown keys"),
        ({"family": "scrfd", "name": "other"}, "unknown keys"),
        ({"family": "scrfd", "input_shape": [640, 640]}, "input_shape"),
        ({"family": "scrfd", "input_shape": [3, "640", 640]}, "input_shape"),
        ({"family": "scrfd", "checksum": "deadbeef"}, "checksum"),
        ({"family": "arcface", "rgb": "yes"}, "rgb"),
        ({"family": "arcface", "normalizes_input": "no"}, "normalizes_input"),
        ({"family": "arcface", "normalized_in_graph": True}, "now normalizes_input"),
        ("scrfd", "must be an object"),
    ],
)
def test_override_rejects_bad_entries(tmp_path: Path, entry: object, match: str) -> None:
    path = write_override(tmp_path, {"bad_model": entry})
    with pytest.raises(RegistryError, match=match) as info:
        ModelRegistry.load(path)
    assert "bad_model" in str(info.value)


def test_override_file_must_be_json_object(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="JSON object"):
        ModelRegistry.load(write_override(tmp_path, ["a", "b"]))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(RegistryError, match="cannot read"):
        ModelRegistry.load(broken)
