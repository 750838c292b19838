"""`appliance build-engines`: build the TensorRT engine of every configured model, once.

Engines are built on the device that will run them (they are specific to the GPU, TensorRT
version and build flags) and cached in ENGINES_DIR under a key (see backends/engine_cache.py).
A second run finds them and does nothing. Exit codes: 0 all engines usable, 1 a build failed,
2 bad settings or a missing model file, 3 TensorRT cannot be used on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from appliance.config import ConfigError, Settings, load_settings
from appliance.models.registry import ModelInfo, ModelRegistry, RegistryError

if TYPE_CHECKING:
    from appliance.backends.tensorrt_build import EngineToolchain

EXIT_OK = 0
EXIT_BUILD_FAILED = 1
EXIT_CONFIG = 2
EXIT_NO_TENSORRT = 3


class TargetError(RuntimeError):
    """A configured model cannot be found or is not of a known family."""


@dataclasses.dataclass(frozen=True)
class ModelTarget:
    """One model to build or check: registry entry, verified file, batch size."""

    info: ModelInfo
    path: Path
    max_batch: int


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "build-engines",
        help="build the TensorRT engines of the configured models (idempotent)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--force", action="store_true", help="rebuild even if a usable engine exists")
    p.set_defaults(handler=run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML settings file (also APPLIANCE_CONFIG)")
    p.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        help="registry names to use (default: DET_MODEL and REC_MODEL)",
    )
    p.add_argument("--models-dir", type=Path, help="model directory (MODELS_DIR)")
    p.add_argument("--engines-dir", type=Path, help="engine directory (ENGINES_DIR)")
    p.add_argument(
        "--demo-models", action="store_true", help="use the generated test models (offline)"
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.models_dir:
        overrides["models_dir"] = args.models_dir
    if args.engines_dir:
        overrides["engines_dir"] = args.engines_dir
    if args.demo_models:
        overrides["demo_models"] = True
    return load_settings(config_file=args.config, **overrides)


def _model_file(settings: Settings, registry: ModelRegistry, info: ModelInfo) -> Path:
    from appliance.models.store import ModelStore, ModelStoreError

    store = ModelStore(settings.models_dir, registry, trust_unverified=settings.trust_unverified)
    try:
        path: Path = store.require(info.name)
    except ModelStoreError as exc:
        raise TargetError(str(exc)) from None
    return path


def configured_models(settings: Settings, names: list[str] | None = None) -> list[ModelTarget]:
    """The models to work on, with their files and max batch (DET_/REC_BATCH_SIZE)."""
    from appliance.models.registry import DEMO_DETECTOR, DEMO_RECOGNIZER

    if settings.demo_models:
        from appliance.models.demo import build_demo_models

        try:
            build_demo_models(settings.models_dir, settings.max_size)
        except OSError as exc:
            raise TargetError(
                f"cannot write the demo models to {settings.models_dir}: {exc}"
            ) from None
        default = [DEMO_DETECTOR, DEMO_RECOGNIZER]
    else:
        default = [settings.det_model, settings.rec_model]
    try:
        registry = ModelRegistry.load(settings.override_file)
    except RegistryError as exc:
        raise TargetError(str(exc)) from None
    targets = []
    for name in names or default:
        try:
            info = registry.get(name)
        except RegistryError as exc:
            raise TargetError(str(exc)) from None
        batch = settings.det_batch_size if info.family == "scrfd" else settings.rec_batch_size
        if settings.demo_models and name in (DEMO_DETECTOR, DEMO_RECOGNIZER):
            path = settings.models_dir / info.file
        else:
            path = _model_file(settings, registry, info)
        targets.append(ModelTarget(info, path, batch))
    return targets


class BuildDisplay:
    """Elapsed time and phase of the build in progress, on one line (TTY) or a line per
    change and every `interval_s` (logs, Ansible's async output)."""

    def __init__(self, out: TextIO, label: str, interval_s: float = 1.0) -> None:
        self._out = out
        self._label = label
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._interval_s = interval_s if self._tty else max(interval_s, 15.0)
        self._phase = "starting"
        self._printed_phase = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._tick, name="build-display", daemon=True)

    def __enter__(self) -> BuildDisplay:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._tty:
            self._out.write("\r\033[K")
            self._out.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def phase(self, text: str) -> None:
        """Called by the builder, possibly from TensorRT's threads."""
        with self._lock:
            self._phase = text
        if not self._tty:
            self._show(force=False)

    def _show(self, force: bool) -> None:
        with self._lock:
            phase = self._phase
            if not self._tty and not force and phase == self._printed_phase:
                return
            self._printed_phase = phase
            line = f"  {self._label}: [{self.elapsed:6.1f} s] {phase}"
            if self._tty:
                self._out.write(f"\r\033[K{line}")
            else:
                self._out.write(line + "\n")
            self._out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._show(force=True)


def build_engines(
    settings: Settings,
    targets: list[ModelTarget],
    toolchain: EngineToolchain,
    force: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Build (or find) each target's engine; returns the exit code."""
    from appliance.backends.base import BackendError
    from appliance.backends.engine_cache import EngineCache, EngineCacheError
    from appliance.backends.tensorrt_build import ensure_engine, plan_engine
    from appliance.models.loader import input_rewrite, normalizes_input

    cache = EngineCache(settings.engines_dir)
    print(
        f"TensorRT {toolchain.tensorrt_version} on {toolchain.gpu_name} "
        f"(compute {toolchain.compute_capability}); engines in {settings.engines_dir}",
        file=out,
    )
    built = fresh = 0
    for target in targets:
        name = target.info.name
        try:
            # The graph the server builds from: with the uint8 input conversion prepended.
            rewrite = input_rewrite(target.info, normalizes_input(target.info, target.path))
            plan = plan_engine(
                settings, target.info, target.path, target.max_batch, toolchain, rewrite
            )
            shapes = plan.key.profiles[0]
            what = (
                f"{plan.key.precision}, batch {shapes.min[0]}..{shapes.max[0]}, "
                f"input {shapes.max[1:]}"
            )
            if plan.batch.mode in ("rewritten", "pieces"):
                what += f", {plan.batch.reason}"
            with BuildDisplay(out, name) as display:
                result = ensure_engine(plan, cache, toolchain, force=force, progress=display.phase)
        except (BackendError, EngineCacheError, OSError) as exc:
            print(f"{name}: FAILED: {exc}", file=out)
            print(
                f"appliance build-engines: the engine for {name} could not be built; "
                "nothing was replaced (see above)",
                file=sys.stderr,
            )
            return EXIT_BUILD_FAILED
        if result.built:
            built += 1
            print(
                f"{name}: built in {result.seconds:.1f} s ({what}; was {result.reason}) "
                f"-> {result.path}",
                file=out,
            )
        else:
            fresh += 1
            print(f"{name}: up to date ({what}) {result.path}", file=out)
    if built == 0:
        print(f"all {fresh} engine(s) up to date; nothing to do", file=out)
    else:
        print(f"{built} engine(s) built, {fresh} up to date", file=out)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    from appliance.backends.base import BackendError
    from appliance.backends.tensorrt_build import TensorRTToolchain

    try:
        settings = settings_from_args(args)
        targets = configured_models(settings, args.models)
    except (ConfigError, TargetError) as exc:
        print(f"appliance build-engines: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        toolchain = TensorRTToolchain()
    except BackendError as exc:
        print(
            f"appliance build-engines: {exc}. Engines are only built on the Jetson (or an "
            "identical GPU) that runs them; elsewhere the appliance uses ONNX Runtime.",
            file=sys.stderr,
        )
        return EXIT_NO_TENSORRT
    try:
        return build_engines(settings, targets, toolchain, force=args.force)
    finally:
        toolchain.close()
