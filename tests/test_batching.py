"""Batch plans: a fixed-batch model is made dynamic where that is proved, else run in pieces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.backends.batching import BatchPlan, dims, plan_batch, run_in_pieces
from appliance.backends.ort import OnnxRuntimeBackend
from appliance.models import onnx_graph
from appliance.models.demo import build_arcface_model, build_scrfd_model
from appliance.models.registry import BUILTIN_MODELS, DEMO_MODELS, DEMO_RECOGNIZER


def test_dims_marks_every_open_dimension() -> None:
    assert dims([1, 3, "?", None, 0, 640]) == (1, 3, -1, -1, -1, 640)
    assert dims((np.int64(2), -1)) == (2, -1)


def test_a_generated_fixed_batch_model_is_rewritten_and_proved(tmp_path: Path) -> None:
    path = build_arcface_model(tmp_path / "rec.onnx", dynamic_batch=False)
    model, plan = plan_batch(onnx_graph.load(path), 8, (3, 112, 112))
    assert (plan.mode, plan.configured, plan.model_batch, plan.effective) == ("rewritten", 8, 1, 8)
    assert onnx_graph.has_dynamic_batch(model)
    assert plan.min_batch == 1


def test_batchless_outputs_of_a_rewritten_detector_pass_the_proof(tmp_path: Path) -> None:
    path = build_scrfd_model(
        tmp_path / "det.onnx", dynamic_batch=False, batch_axis_on_outputs=False
    )
    _, plan = plan_batch(onnx_graph.load(path), 2, (3, 640, 640))
    assert plan.mode == "rewritten"


def test_a_dynamic_model_and_a_matching_fixed_batch_are_left_alone(tmp_path: Path) -> None:
    dynamic = onnx_graph.load(build_arcface_model(tmp_path / "d.onnx"))
    model, plan = plan_batch(dynamic, 4, (3, 112, 112))
    assert model is dynamic and plan.mode == "dynamic" and plan.model_batch is None
    fixed = onnx_graph.load(build_arcface_model(tmp_path / "f.onnx", dynamic_batch=False))
    model, plan = plan_batch(fixed, 1, (3, 112, 112))
    assert model is fixed and (plan.mode, plan.effective) == ("fixed", 1)


def test_the_real_recognizer_cannot_be_rewritten_and_says_why(real_models: Path) -> None:
    model = onnx_graph.load(real_models / "mobilefacenet_128.onnx")
    kept, plan = plan_batch(model, 4, (3, 112, 112))
    assert kept is model
    assert (plan.mode, plan.effective, plan.min_batch) == ("pieces", 1, 1)
    assert "(1, 256) for (1, 128)" in plan.reason


def test_the_real_detector_cannot_be_rewritten_either(real_models: Path) -> None:
    # Its head's reshapes interleave the images of a batch: shapes fit, values do not.
    model = onnx_graph.load(real_models / "scrfd_2.5g_bnkps.onnx")
    _, plan = plan_batch(model, 2, (3, 320, 320))
    assert plan.mode == "pieces"
    assert "other values" in plan.reason


def test_the_real_recognizer_at_batch_five_equals_five_single_runs(real_models: Path) -> None:
    info = BUILTIN_MODELS["mobilefacenet_128"]
    backend = OnnxRuntimeBackend(real_models / "mobilefacenet_128.onnx", info, max_batch=5)
    x = np.random.default_rng(3).uniform(-1, 1, (5, 3, 112, 112)).astype(np.float32)
    out = backend.infer(x)["output0"]
    assert out.shape == (5, 128)
    for i in range(5):
        np.testing.assert_allclose(out[i], backend.infer(x[i : i + 1])["output0"][0], atol=1e-6)
    assert backend.batch_plan.describe()["effective_batch"] == 1


def test_pieces_of_a_fixed_batch_above_one_are_padded_and_trimmed() -> None:
    seen: list[int] = []

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        seen.append(batch.shape[0])
        assert batch.shape[0] == 3, "the model takes exactly 3"
        # One output with a batch axis, one without (N * 2 rows).
        return {
            "emb": batch.reshape(3, -1)[:, :2] * 2,
            "flat": np.repeat(batch.reshape(3, -1)[:, :1], 2, axis=0),
        }

    plan = BatchPlan(configured=7, model_batch=3, effective=3, mode="pieces")
    x = np.arange(7 * 4, dtype=np.float32).reshape(7, 1, 2, 2)
    out = run_in_pieces(run, x, plan)
    assert seen == [3, 3, 3]
    assert out["emb"].shape == (7, 2)
    np.testing.assert_array_equal(out["emb"], x.reshape(7, -1)[:, :2] * 2)
    assert out["flat"].shape == (7, 2, 1)
    np.testing.assert_array_equal(out["flat"][:, 0, 0], x.reshape(7, -1)[:, 0])


def test_a_dynamic_plan_runs_the_batch_whole() -> None:
    plan = BatchPlan(configured=4, model_batch=None, effective=4, mode="dynamic")
    calls: list[int] = []

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(batch.shape[0])
        return {"y": batch}

    run_in_pieces(run, np.zeros((4, 1), np.float32), plan)
    assert calls == [4]


def test_a_batch_size_below_one_is_refused(tmp_path: Path) -> None:
    model = onnx_graph.load(build_arcface_model(tmp_path / "r.onnx"))
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        plan_batch(model, 0, (3, 112, 112))


def test_demo_recognizer_normalisation_is_detected_by_node_names(tmp_path: Path) -> None:
    norm = onnx_graph.load(build_arcface_model(tmp_path / "n.onnx", normalize_in_graph=True))
    assert onnx_graph.normalizes_input(norm) is True
    for node in norm.graph.node:
        node.name = ""  # the same operators, unnamed: InsightFace would not call it normalising
    assert onnx_graph.normalizes_input(norm) is False
    assert DEMO_MODELS[DEMO_RECOGNIZER].normalizes_input is False


def test_the_real_models_do_not_normalise_their_input(real_models: Path) -> None:
    for name in ("mobilefacenet_128", "scrfd_2.5g_bnkps"):
        assert onnx_graph.normalizes_input(onnx_graph.load(real_models / f"{name}.onnx")) is False
