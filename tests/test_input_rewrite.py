"""The uint8 NHWC input rewrite: the same numbers as the float blob, in the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from appliance.backends.engine_cache import EngineKey, ProfileShape
from appliance.backends.ort import OnnxRuntimeBackend
from appliance.models import onnx_graph
from appliance.models.loader import load_models
from appliance.models.registry import ModelRegistry
from appliance.pipeline.embed import to_blob
from appliance.pipeline.images import ImageDecoder, letterbox
from tests.golden import real_settings
from tests.real_data import REAL_DETECTOR, REAL_RECOGNIZER


def rewrite_for(name: str) -> onnx_graph.InputRewrite:
    pre = ModelRegistry.load(Path("/nonexistent.json")).get(name).default_preprocess
    return onnx_graph.InputRewrite(rgb=pre.rgb, mean=pre.mean, std=pre.std)


@pytest.mark.parametrize("name", [REAL_DETECTOR, REAL_RECOGNIZER])
def test_rewritten_real_model_on_pixels_equals_original_on_blob(
    real_models: Path, photos: Path, name: str
) -> None:
    info = ModelRegistry.load(real_models / "none.json").get(name)
    img = ImageDecoder.create(50_000_000).decode((photos / "t1.jpg").read_bytes())
    size = (640, 640) if name == REAL_DETECTOR else (112, 112)
    canvas, _ = letterbox(img, size)
    shape = (3, size[1], size[0])
    plain = OnnxRuntimeBackend(real_models / f"{name}.onnx", info, 1, 1, shape)
    pixels = OnnxRuntimeBackend(
        real_models / f"{name}.onnx", info, 1, 1, shape, input_rewrite=rewrite_for(name)
    )
    assert pixels.inputs[0].dtype == "uint8"
    assert pixels.inputs[0].shape[-1] == 3
    want = plain.infer(to_blob(canvas, info.default_preprocess))
    got = pixels.infer(canvas[None])
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4)
    # A wrong colour order in the rewrite would show: the swap is really in the graph.
    swapped = OnnxRuntimeBackend(
        real_models / f"{name}.onnx",
        info,
        1,
        1,
        shape,
        input_rewrite=onnx_graph.InputRewrite(
            rgb=not info.default_preprocess.rgb,
            mean=info.default_preprocess.mean,
            std=info.default_preprocess.std,
        ),
    )
    other = swapped.infer(canvas[None])
    assert max(float(np.abs(other[k] - want[k]).max()) for k in want) > 1e-2


def test_backend_input_buffer_is_reused_and_feeds_infer(real_models: Path) -> None:
    info = ModelRegistry.load(real_models / "none.json").get(REAL_RECOGNIZER)
    backend = OnnxRuntimeBackend(
        real_models / f"{REAL_RECOGNIZER}.onnx",
        info,
        max_batch=4,
        image_shape=(3, 112, 112),
        input_rewrite=rewrite_for(REAL_RECOGNIZER),
    )
    buffer = backend.input_buffer(3)
    assert buffer.shape == (3, 112, 112, 3) and buffer.dtype == np.uint8
    rng = np.random.default_rng(1)
    buffer[...] = rng.integers(0, 256, buffer.shape, dtype=np.uint8)
    expected = backend.infer(buffer.copy())["output0"]
    assert np.shares_memory(backend.input_buffer(2), buffer)
    np.testing.assert_allclose(backend.infer(buffer)["output0"], expected, rtol=1e-5, atol=1e-5)


def test_rewrite_refuses_an_input_without_three_channels() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph)
    with pytest.raises(ValueError, match="1 channels"):
        onnx_graph.prepend_input_conversion(model, onnx_graph.InputRewrite(True, 0.0, 1.0))


def test_engine_key_names_the_rewrite_and_old_keys_read_as_other_engines() -> None:
    profile = ProfileShape("x", (1, 640, 640, 3), (1, 640, 640, 3), (1, 640, 640, 3))
    plain = EngineKey("ab" * 32, "10.3.0", "Orin", "8.7", "fp16", (profile,))
    rgb = onnx_graph.InputRewrite(rgb=True, mean=127.5, std=128.0)
    bgr = onnx_graph.InputRewrite(rgb=False, mean=127.5, std=128.0)
    with_rgb = EngineKey(**{**plain.__dict__, "input_rewrite": rgb.describe()})
    with_bgr = EngineKey(**{**plain.__dict__, "input_rewrite": bgr.describe()})
    assert len({plain.digest(), with_rgb.digest(), with_bgr.digest()}) == 3
    assert EngineKey.from_dict(with_rgb.to_dict()) == with_rgb
    # A cache file written before the rewrite existed has no such field: another engine.
    old = plain.to_dict()
    del old["input_rewrite"]
    assert EngineKey.from_dict(old) == plain != with_rgb


def test_loader_opens_workers_with_the_rewrite_and_says_so(real_models: Path) -> None:
    loaded = load_models(real_settings(real_models, det_workers=2, rec_workers=3, cpu_threads=2))
    try:
        det, rec = loaded.detector, loaded.recognizer
        assert det.backend.workers == 2 and rec.backend.workers == 3
        assert det.backend.inputs[0].shape[1:] == (-1, -1, 3)
        assert det.input_size == (640, 640)
        assert rec.backend.inputs[0].dtype == "uint8"
        facts = det.describe()
        assert facts["workers"] == 2 and facts["input"].startswith("uint8 NHWC")
        # Fixed worker counts: the budget split between them, no wide session.
        assert loaded.threads.det.intra_op_threads == loaded.threads.rec.intra_op_threads == 1
        assert det.backend.wide is None and facts["wide_session_threads"] == 0
    finally:
        loaded.close()


@pytest.mark.parametrize("name", [REAL_DETECTOR, REAL_RECOGNIZER])
def test_colour_swap_goes_into_the_first_convolution_of_real_models(
    real_models: Path, name: str
) -> None:
    model = onnx_graph.load(real_models / f"{name}.onnx")
    rewritten = onnx_graph.prepend_input_conversion(model, rewrite_for(name))
    ops = [n.op_type for n in rewritten.graph.node[:4]]
    assert ops == ["Transpose", "Cast", "Sub", "Mul"]
    assert "Gather" not in {n.op_type for n in rewritten.graph.node[:8]}


def test_colour_swap_falls_back_to_a_gather_where_the_input_feeds_no_convolution() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 2, 2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 2, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten = onnx_graph.prepend_input_conversion(
        model, onnx_graph.InputRewrite(rgb=True, mean=0.0, std=1.0)
    )
    import onnxruntime as ort

    session = ort.InferenceSession(
        rewritten.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    pixels = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    (out,) = session.run(None, {onnx_graph.UINT8_INPUT: pixels})
    # BGR pixels in, RGB NCHW floats out.
    np.testing.assert_array_equal(out[0], pixels[0].transpose(2, 0, 1)[::-1].astype(np.float32))
