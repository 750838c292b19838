"""Small deterministic ONNX models with the exact signatures of SCRFD and ArcFace.

Real weights cannot be downloaded in CI, so the test suite (and `appliance serve
--demo-models`) builds these instead. They run through the same backends and the same
pre/post-processing as the real models:

* the detector takes (N, 3, H, W) and returns SCRFD's nine outputs in InsightFace's order
  (scores s8, s16, s32; boxes s8.. ; keypoints s8..) with opaque numeric names. A small
  convolution trunk does real work on the input (its cost is tunable for benchmarks) and the
  outputs place faces exactly where the caller planted them, in detector-input pixels;
* the recognizer maps (N, 3, 112, 112) to (N, 512) through a fixed random convolution and
  projection, so different crops give different, repeatable embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.pipeline.detect import ANCHORS_PER_LOCATION, STRIDES

FloatArray = npt.NDArray[np.float32]
OPSET = 17
BACKGROUND_SCORE = 0.01


@dataclasses.dataclass(frozen=True)
class PlantedFace:
    """A face the generated detector reports, in detector-input pixel coordinates."""

    bbox: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float = 0.95

    @classmethod
    def square(cls, x: float, y: float, size: float, score: float = 0.95) -> PlantedFace:
        """A frontal face whose landmarks sit where the ArcFace template puts them."""
        from appliance.pipeline.align import ARCFACE_TEMPLATE, CROP_SIZE

        k = size / CROP_SIZE
        points = tuple((float(x + px * k), float(y + py * k)) for px, py in ARCFACE_TEMPLATE)
        return cls(bbox=(x, y, x + size, y + size), landmarks=points, score=score)

    def scaled(self, factor: float) -> PlantedFace:
        """The same face after the image is scaled by `factor` (original -> letterboxed)."""
        x1, y1, x2, y2 = self.bbox
        return PlantedFace(
            bbox=(x1 * factor, y1 * factor, x2 * factor, y2 * factor),
            landmarks=tuple((px * factor, py * factor) for px, py in self.landmarks),
            score=self.score,
        )


def _stride_for(face: PlantedFace) -> int:
    # Same split SCRFD learns: small faces on the fine stride, large ones on the coarse.
    size = max(face.bbox[2] - face.bbox[0], face.bbox[3] - face.bbox[1])
    return 8 if size < 64 else 16 if size < 160 else 32


def planted_outputs(
    faces: Sequence[PlantedFace], input_size: tuple[int, int], keypoints: bool = True
) -> list[FloatArray]:
    """The raw SCRFD outputs (without batch axis) that decode to exactly these faces."""
    width, height = input_size
    scores, boxes, kps = [], [], []
    for stride in STRIDES:
        h, w = height // stride, width // stride
        anchors = h * w * ANCHORS_PER_LOCATION
        s = np.full((anchors, 1), BACKGROUND_SCORE, np.float32)
        b = np.ones((anchors, 4), np.float32)
        k = np.zeros((anchors, 10), np.float32)
        for face in faces:
            if _stride_for(face) != stride:
                continue
            x1, y1, x2, y2 = face.bbox
            col = int(np.clip(round((x1 + x2) / 2 / stride), 0, w - 1))
            row = int(np.clip(round((y1 + y2) / 2 / stride), 0, h - 1))
            cx, cy = col * stride, row * stride
            idx = (row * w + col) * ANCHORS_PER_LOCATION
            s[idx, 0] = face.score
            b[idx] = [
                (cx - x1) / stride,
                (cy - y1) / stride,
                (x2 - cx) / stride,
                (y2 - cy) / stride,
            ]
            k[idx] = [
                v for px, py in face.landmarks for v in ((px - cx) / stride, (py - cy) / stride)
            ]
        scores.append(s)
        boxes.append(b)
        kps.append(k)
    return scores + boxes + (kps if keypoints else [])


def _const(name: str, array: FloatArray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name=name)


def build_scrfd_model(
    path: Path,
    faces: Sequence[PlantedFace] = (),
    input_size: tuple[int, int] = (640, 640),
    keypoints: bool = True,
    dynamic_batch: bool = True,
    batch_axis_on_outputs: bool = True,
    trunk_channels: int = 16,
    trunk_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a detector with SCRFD's input/outputs that reports `faces` for every image.

    `dynamic_batch=False` and `batch_axis_on_outputs=False` reproduce the export variants the
    loaders must absorb (fixed 1x3x640x640 input; outputs shaped (A, K) instead of (N, A, K)).
    """
    rng = np.random.default_rng(seed)
    width, height = input_size
    batch: int | str = "batch" if dynamic_batch else 1
    inputs = [
        helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, height, width])
    ]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    # Trunk: real convolutions over the image so the model costs what a detector costs.
    prev, channels = "input.1", 3
    for i in range(trunk_layers):
        weight = rng.normal(0, 0.1, (trunk_channels, channels, 3, 3)).astype(np.float32)
        inits.append(_const(f"trunk.{i}.w", weight))
        nodes.append(
            helper.make_node(
                "Conv",
                [prev, f"trunk.{i}.w"],
                [f"trunk.{i}"],
                kernel_shape=[3, 3],
                strides=[2, 2] if i == 0 else [1, 1],
                pads=[1, 1, 1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [f"trunk.{i}"], [f"trunk.{i}.relu"]))
        prev, channels = f"trunk.{i}.relu", trunk_channels
    # (N, 1, 1) zero that depends on the trunk, so the outputs cannot be folded to constants.
    nodes.append(helper.make_node("ReduceMean", [prev], ["pooled"], axes=[1, 2, 3], keepdims=1))
    inits.append(_const("zero", np.zeros((1,), np.float32)))
    nodes.append(helper.make_node("Mul", ["pooled", "zero"], ["tied4"]))
    inits.append(numpy_helper.from_array(np.array([-1, 1, 1], np.int64), name="shape3"))
    nodes.append(helper.make_node("Reshape", ["tied4", "shape3"], ["tied"]))

    raw = planted_outputs(faces, input_size, keypoints)
    outputs = []
    # Opaque numeric names, as in the InsightFace exports: the registry's order is the truth.
    names = [str(443 + 3 * i) for i in range(len(raw))]
    for name, value in zip(names, raw, strict=True):
        inits.append(_const(f"{name}.planted", value[None]))
        if batch_axis_on_outputs:
            nodes.append(helper.make_node("Add", ["tied", f"{name}.planted"], [name]))
            shape: list[int | str] = [batch, value.shape[0], value.shape[1]]
        else:
            nodes.append(helper.make_node("Add", ["tied", f"{name}.planted"], [f"{name}.b"]))
            inits.append(
                numpy_helper.from_array(np.array([-1, value.shape[1]], np.int64), name=f"{name}.s")
            )
            nodes.append(helper.make_node("Reshape", [f"{name}.b", f"{name}.s"], [name]))
            shape = [value.shape[0], value.shape[1]]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "scrfd_test", inputs, outputs, initializer=inits)
    return _save(graph, path)


def build_arcface_model(
    path: Path,
    input_name: str = "data",
    normalize_in_graph: bool = False,
    embedding_size: int = 512,
    dynamic_batch: bool = True,
    seed: int = 1,
) -> Path:
    """Write a recognizer with ArcFace's signature: (N, 3, 112, 112) -> (N, 512)."""
    rng = np.random.default_rng(seed)
    batch: int | str = "batch" if dynamic_batch else 1
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, 112, 112])]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    prev = input_name
    if normalize_in_graph:
        # The MXNet-converted ArcFace starts with nodes named `_minusscalar0` and `_mulscalar0`:
        # InsightFace detects it by those names, and so do the loaders.
        inits += [
            _const("mean", np.array([127.5], np.float32)),
            _const("scale", np.array([1 / 127.5], np.float32)),
        ]
        nodes += [
            helper.make_node("Sub", [input_name, "mean"], ["centered"], name="_minusscalar0"),
            helper.make_node("Mul", ["centered", "scale"], ["normalized"], name="_mulscalar0"),
        ]
        prev = "normalized"
    conv_w = rng.normal(0, 0.2, (8, 3, 8, 8)).astype(np.float32)
    proj = rng.normal(0, 0.05, (8 * 14 * 14, embedding_size)).astype(np.float32)
    inits += [_const("conv.w", conv_w), _const("proj", proj)]
    nodes += [
        helper.make_node("Conv", [prev, "conv.w"], ["conv"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["conv"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["fc1"]),
    ]
    outputs = [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, embedding_size])]
    graph = helper.make_graph(nodes, "arcface_test", inputs, outputs, initializer=inits)
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14 and TensorRT 10's parser
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


# The faces `appliance serve --demo-models` reports, in 640x640 detector-input pixels.
DEMO_FACES = (
    PlantedFace.square(180, 140, 120, score=0.93),
    PlantedFace.square(400, 260, 48, score=0.81),
)


def build_demo_models(
    models_dir: Path, input_size: tuple[int, int] = (640, 640)
) -> tuple[Path, Path]:
    """Write the demo detector and recognizer into `models_dir` (idempotent)."""
    from appliance.models.registry import DEMO_DETECTOR, DEMO_MODELS, DEMO_RECOGNIZER

    det = build_scrfd_model(models_dir / DEMO_MODELS[DEMO_DETECTOR].file, DEMO_FACES, input_size)
    rec = build_arcface_model(models_dir / DEMO_MODELS[DEMO_RECOGNIZER].file)
    return det, rec
