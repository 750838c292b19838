"""The known models: what each file is, where it comes from and how to feed it.

Sources and checksums are InsightFace-REST's published model list (see shared/MODELS.md):
Google Drive file ids and md5 sums. A checksum is kept with its algorithm (`md5:...`,
`sha256:...`) and never invented: a model that would be downloaded without one is only
fetched and used with `trust_unverified`; the operator's own file (no URL) is used as given.

Operators add models of a known family with a JSON override file (InsightFace-REST's
`models.override.json`): `{"my_scrfd": {"family": "scrfd", "file": "my.onnx", ...}}`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from appliance.config import Settings

Family = Literal["scrfd", "arcface"]
FAMILIES: tuple[Family, ...] = ("scrfd", "arcface")
GDRIVE_URL = "https://drive.google.com/uc?export=download&id={file_id}"


class RegistryError(ValueError):
    """An unknown model name or an invalid override entry."""


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How pixels become the network input: (x - mean) / std per channel, in RGB order when
    `rgb` (decoded images are BGR, as OpenCV gives them; every InsightFace model takes RGB)."""

    mean: float
    std: float
    rgb: bool = True


# SCRFD: RGB, (x - 127.5) / 128 (InsightFace's SCRFD.detect uses 1/128).
SCRFD_PREPROCESS = Preprocess(mean=127.5, std=128.0)
# ArcFace (arcface_torch exports): (x - 127.5) / 127.5.
ARCFACE_PREPROCESS = Preprocess(mean=127.5, std=127.5)
# MXNet-converted ArcFace normalises inside the graph and takes raw 0..255 pixels.
RAW_PREPROCESS = Preprocess(mean=0.0, std=1.0)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    family: Family
    file: str
    # (C, H, W) of one input image.
    input_shape: tuple[int, int, int]
    url: str | None = None
    # "algorithm:hexdigest"; None when nobody published one.
    checksum: str | None = None
    preprocess: Preprocess | None = None
    # Whether the graph normalises its own input (MXNet ArcFace), so it takes raw 0..255
    # pixels whatever `preprocess` says; None = detect from the graph as InsightFace does
    # (`onnx_graph.normalizes_input`). The one name for this fact, in overrides and /info too.
    normalizes_input: bool | None = None
    # SCRFD: whether the model also returns 5 keypoints per anchor.
    keypoints: bool = True
    # Index of each output in the model's declared order, by meaning. SCRFD exports name
    # outputs with opaque numbers, so the order (scores s8,s16,s32, boxes.., kps..) is
    # recorded instead of trusting names. None = declared order.
    output_order: tuple[int, ...] | None = None
    description: str = ""

    @property
    def default_preprocess(self) -> Preprocess:
        if self.preprocess is not None:
            return self.preprocess
        return SCRFD_PREPROCESS if self.family == "scrfd" else ARCFACE_PREPROCESS

    @property
    def verified(self) -> bool:
        return self.checksum is not None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data


def _scrfd(name: str, file_id: str, md5: str, description: str) -> ModelInfo:
    return ModelInfo(
        name=name,
        family="scrfd",
        file=f"{name}.onnx",
        input_shape=(3, 640, 640),
        url=GDRIVE_URL.format(file_id=file_id),
        checksum=f"md5:{md5}",
        description=description,
    )


def _arcface(name: str, file_id: str, md5: str | None, description: str, **kw: Any) -> ModelInfo:
    return ModelInfo(
        name=name,
        family="arcface",
        file=f"{name}.onnx",
        input_shape=(3, 112, 112),
        url=GDRIVE_URL.format(file_id=file_id),
        checksum=f"md5:{md5}" if md5 else None,
        description=description,
        **kw,
    )


BUILTIN_MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        _scrfd(
            "scrfd_500m_bnkps",
            "1ccagW08CyKJoeFAmL2ao7pjwr3_m_Zm1",
            "03fd8fe67902798b7584b1e7ff3e0f6f",
            "SCRFD 0.5 GFLOPs, BatchNorm, keypoints",
        ),
        # InsightFace's original export (model packs, `../shared/models`), not the copy
        # InsightFace-REST hosts (md5 02710671...): fixed batch of 1, '?' height and width,
        # 2-D outputs without a batch axis, graph numbers as output names in the declared
        # order scores s8..s32, boxes, keypoints. The operator supplies the file.
        ModelInfo(
            name="scrfd_2.5g_bnkps",
            family="scrfd",
            file="scrfd_2.5g_bnkps.onnx",
            input_shape=(3, 640, 640),
            checksum="sha256:bc24bb349491481c3ca793cf89306723162c280cb284c5a5e49df3760bf5c2ce",
            preprocess=SCRFD_PREPROCESS,
            output_order=(0, 1, 2, 3, 4, 5, 6, 7, 8),
            description="SCRFD 2.5 GFLOPs, BatchNorm, keypoints (InsightFace's export; "
            "operator-supplied)",
        ),
        _scrfd(
            "scrfd_10g_bnkps",
            "1llbQa8HFle-45wscZulzGcNncPFgYruJ",
            "2740f9259d46355ca5fa0d9b54943524",
            "SCRFD 10 GFLOPs, BatchNorm, keypoints",
        ),
        _scrfd(
            "scrfd_500m_gnkps",
            "19CeBV03a3DEhZeas4olZn7GgiUESDu0L",
            "ef4bcb0606d6e5ebf325f8322e507a7b",
            "SCRFD 0.5 GFLOPs, GroupNorm, keypoints",
        ),
        _scrfd(
            "scrfd_2.5g_gnkps",
            "1_LeETpKhWL4sRPvLZEvka-bGNMN4tMOU",
            "50febd32caa699ef7a47cf7422c56bbd",
            "SCRFD 2.5 GFLOPs, GroupNorm, keypoints",
        ),
        _scrfd(
            "scrfd_10g_gnkps",
            "14BuXR6L73w1mwKXHPIcZlc9LYaid4Evl",
            "1d9b64bb0e6e18d4838872c9e7efd709",
            "SCRFD 10 GFLOPs, GroupNorm, keypoints",
        ),
        _arcface(
            "glintr100",
            "1TR_ImGvuY7Dt22a9BOAUAlHasFfkrJp-",
            "3b366b98f786426f79629ddb2e56629c",
            "ArcFace ResNet100 trained on Glint360K",
            normalizes_input=False,
        ),
        _arcface(
            "w600k_r50",
            "1_3WcTE64Mlt_12PZHNWdhVCRpoPiblwq",
            "80248d427976241cbd1343889ed132b3",
            "ArcFace ResNet50 trained on WebFace600K",
            normalizes_input=False,
        ),
        _arcface(
            "w600k_mbf",
            "1GtBKfGucgJDRLHvGWR3jOQovHYXY-Lpe",
            "c5b029527cb6f874e057613fc10bae1b",
            "ArcFace MobileFaceNet, WebFace600K",
            normalizes_input=False,
        ),
        # A 128-d MobileFaceNet with a fixed batch of 1 (`../shared/models`); RGB,
        # (x - 127.5) / 127.5. The operator supplies the file.
        ModelInfo(
            name="mobilefacenet_128",
            family="arcface",
            file="mobilefacenet_128.onnx",
            input_shape=(3, 112, 112),
            checksum="sha256:93fac2c9747e612f4f491c7842563a515ee2b6c237d9fee05e96291b07ac6019",
            preprocess=ARCFACE_PREPROCESS,
            normalizes_input=False,
            description="MobileFaceNet, 128-d embeddings, fixed batch 1 (operator-supplied)",
        ),
        # No checksum is published for the MXNet conversion: it needs trust_unverified.
        _arcface(
            "arcface_r100_v1",
            "1sj170K3rbo5iOdjvjHw-hKWvXgH4dld3",
            None,
            "ArcFace ResNet100 converted from MXNet (normalises inside the graph)",
            normalizes_input=True,
            preprocess=RAW_PREPROCESS,
        ),
    )
}

# Names of the generated test models (appliance.models.demo); never downloaded.
DEMO_DETECTOR = "demo_scrfd"
DEMO_RECOGNIZER = "demo_arcface"


def model_names(settings: Settings) -> tuple[str, str]:
    """The detector and recognizer the settings select: DET_MODEL and REC_MODEL, or the
    generated demo pair."""
    if settings.demo_models:
        return DEMO_DETECTOR, DEMO_RECOGNIZER
    return settings.det_model, settings.rec_model


DEMO_MODELS: dict[str, ModelInfo] = {
    DEMO_DETECTOR: ModelInfo(
        name=DEMO_DETECTOR,
        family="scrfd",
        file=f"{DEMO_DETECTOR}.onnx",
        input_shape=(3, 640, 640),
        description="generated SCRFD-signature test detector",
    ),
    DEMO_RECOGNIZER: ModelInfo(
        name=DEMO_RECOGNIZER,
        family="arcface",
        file=f"{DEMO_RECOGNIZER}.onnx",
        input_shape=(3, 112, 112),
        normalizes_input=False,
        description="generated ArcFace-signature test recognizer",
    ),
}

_OVERRIDE_KEYS = {f.name for f in dataclasses.fields(ModelInfo)} - {"name", "preprocess"}
_PREPROCESS_KEYS = {"mean", "std", "rgb"}


def _from_override(name: str, entry: Mapping[str, Any], base: ModelInfo | None) -> ModelInfo:
    if not isinstance(entry, Mapping):
        raise RegistryError(f"override for {name!r} must be an object")
    unknown = set(entry) - _OVERRIDE_KEYS - _PREPROCESS_KEYS
    if unknown:
        hint = (
            "; normalized_in_graph is now normalizes_input"
            if "normalized_in_graph" in unknown
            else ""
        )
        raise RegistryError(f"override for {name!r}: unknown keys {sorted(unknown)}{hint}")
    values: dict[str, Any] = dataclasses.asdict(base) if base else {"name": name}
    values.pop("preprocess", None)
    values.update({k: v for k, v in entry.items() if k in _OVERRIDE_KEYS})
    family = values.get("family")
    if family not in FAMILIES:
        raise RegistryError(
            f"override for {name!r}: family must be one of {FAMILIES}, got {family!r}"
        )
    if "file" not in values:
        values["file"] = f"{name}.onnx"
    if "input_shape" not in values:
        values["input_shape"] = (3, 640, 640) if family == "scrfd" else (3, 112, 112)
    shape = values["input_shape"]
    if not (
        isinstance(shape, (list, tuple))
        and len(shape) == 3
        and all(isinstance(d, int) for d in shape)
    ):
        raise RegistryError(f"override for {name!r}: input_shape must be [C, H, W]")
    values["input_shape"] = tuple(shape)
    if values.get("output_order") is not None:
        values["output_order"] = tuple(values["output_order"])
    checksum = values.get("checksum")
    if checksum is not None and (not isinstance(checksum, str) or ":" not in checksum):
        raise RegistryError(f"override for {name!r}: checksum must be 'algorithm:hexdigest'")
    preprocess = base.preprocess if base else None
    if _PREPROCESS_KEYS & set(entry):
        start = preprocess or (SCRFD_PREPROCESS if family == "scrfd" else ARCFACE_PREPROCESS)
        rgb = entry.get("rgb", start.rgb)
        if not isinstance(rgb, bool):
            raise RegistryError(f"override for {name!r}: rgb must be true or false")
        preprocess = Preprocess(
            mean=float(entry.get("mean", start.mean)),
            std=float(entry.get("std", start.std)),
            rgb=rgb,
        )
    normalizes = values.get("normalizes_input")
    if normalizes is not None and not isinstance(normalizes, bool):
        raise RegistryError(f"override for {name!r}: normalizes_input must be true, false or null")
    return ModelInfo(
        name=name, preprocess=preprocess, **{k: v for k, v in values.items() if k != "name"}
    )


class ModelRegistry:
    """Built-in models plus the operator's overrides; immutable once built."""

    def __init__(self, models: Mapping[str, ModelInfo]) -> None:
        self._models = dict(models)

    @classmethod
    def load(cls, override_file: Path | None = None, include_demo: bool = True) -> ModelRegistry:
        models = dict(BUILTIN_MODELS)
        if include_demo:
            models.update(DEMO_MODELS)
        if override_file is not None and override_file.exists():
            try:
                data = json.loads(override_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise RegistryError(f"cannot read model overrides {override_file}: {exc}") from None
            if not isinstance(data, dict):
                raise RegistryError(f"{override_file}: must be a JSON object of model entries")
            for name, entry in data.items():
                models[name] = _from_override(name, entry, models.get(name))
        return cls(models)

    def get(self, name: str) -> ModelInfo:
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models))
            raise RegistryError(f"unknown model {name!r}; known models: {known}") from None

    def selected(self, det_name: str, rec_name: str) -> tuple[ModelInfo, ModelInfo]:
        """The detector and recognizer DET_MODEL and REC_MODEL name, or RegistryError saying
        which name is unknown or of the wrong family."""
        det, rec = self.get(det_name), self.get(rec_name)
        if det.family != "scrfd" or rec.family != "arcface":
            raise RegistryError(
                f"DET_MODEL must be an scrfd model and REC_MODEL an arcface model; got "
                f"{det_name} ({det.family}) and {rec_name} ({rec.family})"
            )
        return det, rec

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._models.values(), key=lambda m: (m.family, m.name)))

    def names(self) -> list[str]:
        return sorted(self._models)
