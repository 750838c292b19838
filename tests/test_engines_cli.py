"""`appliance build-engines` and `appliance check`.

Engines are built here by a stand-in toolchain (a real implementation of the
`EngineToolchain` protocol whose "engine" is a digest of the ONNX bytes and profile), so the
real planning, cache, progress display and idempotency run end to end. On this machine,
without TensorRT, the real commands must fail (build-engines) or say so (check) clearly.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from appliance import cli
from appliance.backends.base import BackendError
from appliance.backends.engine_cache import EngineCache
from appliance.backends.ort import OnnxRuntimeBackend
from appliance.backends.tensorrt_build import EnginePlan, ProgressFn, plan_engine
from appliance.commands.check import check_models
from appliance.commands.engines import (
    EXIT_BUILD_FAILED,
    EXIT_CONFIG,
    EXIT_NO_TENSORRT,
    EXIT_OK,
    ModelTarget,
    build_engines,
    configured_models,
)
from appliance.config import Settings, load_settings
from appliance.models.demo import build_arcface_model
from appliance.models.loader import input_rewrite, normalizes_input


class StandInToolchain:
    """Builds "engines" that are a digest of the plan; `check` accepts only its own."""

    tensorrt_version = "10.3.0"
    gpu_name = "Orin (nvgpu)"
    compute_capability = "8.7"
    fast_fp16 = True

    def __init__(self, fail_with: str | None = None) -> None:
        self.builds: list[str] = []
        self.timing_caches_seen: list[bytes | None] = []
        self.fail_with = fail_with

    def build(
        self, plan: EnginePlan, timing_cache: bytes | None, progress: ProgressFn
    ) -> tuple[bytes, bytes | None]:
        progress("parsing ONNX")
        self.timing_caches_seen.append(timing_cache)
        if self.fail_with:
            raise BackendError(self.fail_with)
        progress(f"building {plan.key.precision} engine")
        self.builds.append(plan.label)
        digest = hashlib.sha256(plan.onnx_bytes + plan.key.digest().encode()).hexdigest()
        return f"stand-in engine {digest}".encode(), f"timings after {len(self.builds)}".encode()

    def check(self, engine: bytes) -> None:
        if not engine.startswith(b"stand-in engine "):
            raise ValueError("not an engine this runtime can read")


@pytest.fixture
def demo(tmp_path: Path) -> tuple[Settings, list[ModelTarget]]:
    settings = load_settings(
        env={},
        demo_models=True,
        models_dir=tmp_path / "models",
        engines_dir=tmp_path / "engines",
        det_batch_size=2,
        rec_batch_size=8,
    )
    return settings, configured_models(settings)


def test_first_run_builds_every_engine_and_second_run_does_nothing(
    demo: tuple[Settings, list[ModelTarget]],
) -> None:
    settings, targets = demo
    toolchain = StandInToolchain()
    out = io.StringIO()
    assert build_engines(settings, targets, toolchain, out=out) == EXIT_OK
    text = out.getvalue()
    assert toolchain.builds == ["demo_scrfd", "demo_arcface"]
    assert "demo_scrfd: built in" in text
    # The server's graph: uint8 NHWC pixels in, the conversion to NCHW floats in the engine.
    assert "(fp16, batch 1..2, input (640, 640, 3); was missing)" in text
    assert "(fp16, batch 1..8, input (112, 112, 3); was missing)" in text
    assert text.rstrip().endswith("2 engine(s) built, 0 up to date")
    engines = sorted(settings.engines_dir.glob("*.engine"))
    assert [p.name.split(".")[0] for p in engines] == ["demo_arcface", "demo_scrfd"]
    stamps = [p.stat().st_mtime_ns for p in engines]

    again = io.StringIO()
    assert build_engines(settings, targets, toolchain, out=again) == EXIT_OK
    lines = again.getvalue().splitlines()
    assert lines[0] == (
        f"TensorRT 10.3.0 on Orin (nvgpu) (compute 8.7); engines in {settings.engines_dir}"
    )
    assert lines[1].startswith("demo_scrfd: up to date (fp16, batch 1..2")
    assert lines[2].startswith("demo_arcface: up to date (fp16, batch 1..8")
    assert lines[3] == "all 2 engine(s) up to date; nothing to do"
    assert toolchain.builds == ["demo_scrfd", "demo_arcface"]
    assert [p.stat().st_mtime_ns for p in engines] == stamps


def test_timing_cache_from_one_build_feeds_the_next(
    demo: tuple[Settings, list[ModelTarget]],
) -> None:
    settings, targets = demo
    toolchain = StandInToolchain()
    build_engines(settings, targets, toolchain, out=io.StringIO())
    assert toolchain.timing_caches_seen == [None, b"timings after 1"]


def test_force_rebuilds_and_a_changed_model_gets_a_new_engine(
    demo: tuple[Settings, list[ModelTarget]],
) -> None:
    settings, targets = demo
    toolchain = StandInToolchain()
    build_engines(settings, targets, toolchain, out=io.StringIO())
    forced = io.StringIO()
    build_engines(settings, targets[:1], toolchain, force=True, out=forced)
    assert "demo_scrfd: built in" in forced.getvalue()
    assert "was forced" in forced.getvalue()

    build_arcface_model(targets[1].path, seed=7)  # the operator replaced the weights
    changed = io.StringIO()
    build_engines(settings, targets, toolchain, out=changed)
    assert "demo_scrfd: up to date" in changed.getvalue()
    assert "demo_arcface: built in" in changed.getvalue()
    assert len(list(settings.engines_dir.glob("demo_arcface.*.engine"))) == 2


def test_corrupt_engine_is_rebuilt_by_the_next_run(
    demo: tuple[Settings, list[ModelTarget]],
) -> None:
    settings, targets = demo
    toolchain = StandInToolchain()
    build_engines(settings, targets, toolchain, out=io.StringIO())
    (engine,) = settings.engines_dir.glob("demo_arcface.*.engine")
    engine.write_bytes(engine.read_bytes()[:100])
    out = io.StringIO()
    assert build_engines(settings, targets, toolchain, out=out) == EXIT_OK
    assert "demo_arcface: built in" in out.getvalue()
    assert "was corrupt: " in out.getvalue()


def test_progress_shows_elapsed_time_and_phase(demo: tuple[Settings, list[ModelTarget]]) -> None:
    settings, targets = demo
    out = io.StringIO()  # not a TTY: one line per phase, as in logs and Ansible output
    build_engines(settings, targets[:1], StandInToolchain(), out=out)
    progress = [line for line in out.getvalue().splitlines() if line.startswith("  demo_scrfd:")]
    phases = [line.split("] ", 1)[1] for line in progress]
    assert phases == ["building (missing)", "parsing ONNX", "building fp16 engine", "writing"]
    assert all(line.startswith("  demo_scrfd: [") and " s] " in line for line in progress)


def test_failed_build_exits_non_zero_and_keeps_the_old_engine(
    demo: tuple[Settings, list[ModelTarget]], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, targets = demo
    build_engines(settings, targets, StandInToolchain(), out=io.StringIO())
    before = {p.name: p.read_bytes() for p in settings.engines_dir.glob("*.engine")}
    out = io.StringIO()
    broken = StandInToolchain(fail_with="Network has dynamic or shape inputs, but no profile")
    code = build_engines(settings, targets, broken, force=True, out=out)
    assert code == EXIT_BUILD_FAILED
    assert "demo_scrfd: FAILED: building the engine for demo_scrfd failed: Network has" in (
        out.getvalue()
    )
    assert "the engine for demo_scrfd could not be built" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in settings.engines_dir.glob("*.engine")}
    assert after == before


def test_build_engines_without_tensorrt_fails_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "build-engines",
            "--demo-models",
            "--models-dir",
            str(tmp_path / "m"),
            "--engines-dir",
            str(tmp_path / "e"),
        ]
    )
    assert code == EXIT_NO_TENSORRT
    err = capsys.readouterr().err
    assert err.startswith("appliance build-engines: TensorRT cannot be used here: ")
    assert "elsewhere the appliance uses ONNX Runtime" in err
    assert not (tmp_path / "e").exists()


def test_build_engines_names_a_missing_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["build-engines", "--models", "glintr100", "--models-dir", str(tmp_path)])
    assert code == EXIT_CONFIG
    assert "glintr100" in capsys.readouterr().err


def test_check_without_tensorrt_runs_onnx_runtime_and_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["check", "--demo-models", "--models-dir", str(tmp_path)])
    assert code == EXIT_NO_TENSORRT == 3
    captured = capsys.readouterr()
    assert (
        "demo_scrfd: ONNX Runtime ran a batch of 1 (dynamic, 1 per run): 9 output(s), all finite"
        in captured.out
    )
    assert (
        "demo_arcface: ONNX Runtime ran a batch of 4 (dynamic, 4 per run): 1 output(s), all finite"
        in captured.out
    )
    assert "only ONNX Runtime is available here" in captured.err
    assert "exit code 3" in captured.err


def _ort(target: ModelTarget) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(target.path, target.info, max_batch=target.max_batch)


def test_check_passes_identical_backends(demo: tuple[Settings, list[ModelTarget]]) -> None:
    settings, targets = demo
    out = io.StringIO()
    assert check_models(settings, targets, _ort, _ort, out=out) == EXIT_OK
    text = out.getvalue()
    assert "demo_scrfd (detector, batch 2): max |diff| 0: ok" in text
    assert "demo_arcface (recogniser, batch 8): cosine min 1.000000 mean 1.000000" in text
    assert text.rstrip().endswith("TensorRT engines match ONNX Runtime within the limits")


def test_check_reports_a_recogniser_that_drifted(
    demo: tuple[Settings, list[ModelTarget]], tmp_path: Path
) -> None:
    settings, targets = demo
    other = build_arcface_model(tmp_path / "other.onnx", seed=99)

    def drifted(target: ModelTarget) -> Any:
        path = other if target.info.family == "arcface" else target.path
        return OnnxRuntimeBackend(path, target.info, max_batch=target.max_batch)

    out = io.StringIO()
    assert check_models(settings, targets[1:], _ort, drifted, out=out) == 1
    line = out.getvalue().splitlines()[0]
    assert line.startswith("demo_arcface (recogniser, batch 8): cosine min ")
    assert line.endswith("MISMATCH")
    cos_min = float(line.split("cosine min ")[1].split()[0])
    assert cos_min < 0.99


def test_override_file_models_are_found(tmp_path: Path) -> None:
    build_arcface_model(tmp_path / "mine.onnx")
    (tmp_path / "models.override.json").write_text(
        json.dumps({"my_rec": {"family": "arcface", "file": "mine.onnx"}})
    )
    settings = load_settings(env={}, models_dir=tmp_path, trust_unverified=True, rec_batch_size=6)
    (target,) = configured_models(settings, ["my_rec"])
    assert (target.info.name, target.path, target.max_batch) == (
        "my_rec",
        tmp_path / "mine.onnx",
        6,
    )


def test_built_engines_are_keyed_by_the_servers_input_conversion(
    demo: tuple[Settings, list[ModelTarget]],
) -> None:
    settings, targets = demo
    toolchain = StandInToolchain()
    build_engines(settings, targets, toolchain, out=io.StringIO())
    for target in targets:
        rewrite = input_rewrite(target.info, normalizes_input(target.info, target.path))
        # What `open_tensorrt_backends` plans at start-up for the same model.
        served = plan_engine(
            settings, target.info, target.path, target.max_batch, toolchain, rewrite
        )
        plain = plan_engine(settings, target.info, target.path, target.max_batch, toolchain)
        assert served.key.input_rewrite == rewrite.describe() != plain.key.input_rewrite
        names = [p.name for p in settings.engines_dir.glob(f"{target.info.name}.*.engine")]
        assert names == [
            EngineCache(settings.engines_dir).path_for(target.info.name, served.key).name
        ]
