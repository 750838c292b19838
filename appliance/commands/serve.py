"""`appliance serve`: load the models and answer HTTP and WebSocket clients."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from appliance.config import ConfigError, Settings, load_settings

NO_MODELS_HELP = """\
The appliance could not get its models ({problem}). Real model files are not bundled: either
put the ONNX files in a directory and point MODELS_DIR at it (for example
`MODELS_DIR=$HOME/models DET_MODEL=scrfd_10g_gnkps REC_MODEL=glintr100 appliance serve`; file
names and checksums are listed by `appliance models list`, and `appliance models fetch NAME`
downloads one where the network allows), or start with the generated demo models, which need
no download and report planted test faces: `appliance serve --demo-models`."""

DEMO_WARNING = """Serving the generated DEMO models: they report the same planted test faces whatever the image,
so no answer says anything about a real photo. For real faces, put real model files in a
directory and name them, for example InsightFace's SCRFD-2.5G detector and a 128-d
MobileFaceNet (files scrfd_2.5g_bnkps.onnx and mobilefacenet_128.onnx, checked against their
sha256): `MODELS_DIR=/path/to/models DET_MODEL=scrfd_2.5g_bnkps REC_MODEL=mobilefacenet_128
appliance serve`. `appliance models list` shows every known model; docs/MODELS.md explains
how to add your own."""


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("serve", help="run the HTTP/WebSocket service")
    p.add_argument("--config", type=Path, help="TOML settings file (also APPLIANCE_CONFIG)")
    p.add_argument("--host", help="listen address (HOST)")
    p.add_argument("--port", type=int, help="listen port (PORT)")
    p.add_argument("--models-dir", type=Path, help="model directory (MODELS_DIR)")
    p.add_argument(
        "--demo-models", action="store_true", help="serve generated test models (offline)"
    )
    p.add_argument(
        "--fallback-demo",
        action="store_true",
        help="if the configured models cannot be found or fetched, explain why and serve the demo models",
    )
    p.add_argument("--no-fetch", action="store_true", help="never download missing models")
    p.add_argument(
        "--trust-unverified", action="store_true", help="accept models without a published checksum"
    )
    p.set_defaults(handler=run)


def default_demo_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "appliance" / "demo-models"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def prepare_models(settings: Settings, fetch: bool) -> None:
    """Make sure both configured models are present and verified, downloading if allowed."""
    from appliance.models.registry import ModelRegistry
    from appliance.models.store import ModelStore

    registry = ModelRegistry.load(settings.override_file)
    store = ModelStore(settings.models_dir, registry, trust_unverified=settings.trust_unverified)
    for name in (settings.det_model, settings.rec_model):
        if fetch:
            store.ensure(name, progress=_progress(name))
        else:
            store.require(name)


def _progress(name: str) -> Any:
    def report(done: int, total: int | None) -> None:
        pct = f"{100 * done / total:5.1f}%" if total else "     "
        print(f"\rfetching {name}: {pct} {done / 1e6:8.1f} MB", end="", file=sys.stderr, flush=True)
        if total and done >= total:
            print(file=sys.stderr)

    return report


def resolve_settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    if args.models_dir:
        overrides["models_dir"] = args.models_dir
    if args.demo_models:
        overrides["demo_models"] = True
    if args.trust_unverified:
        overrides["trust_unverified"] = True
    return load_settings(config_file=args.config, **overrides)


def use_demo(settings: Settings) -> Settings:
    models_dir = settings.models_dir if _writable(settings.models_dir) else default_demo_dir()
    return settings.replace(demo_models=True, models_dir=models_dir)


def _paragraph(text: str) -> str:
    # The messages are written wrapped in the source; join their lines before wrapping again,
    # or each source line break survives inside the new lines.
    return textwrap.fill(" ".join(text.split()), width=100)


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from appliance.api.app import create_app
    from appliance.api.errors import StartupError
    from appliance.logs import configure_logging
    from appliance.models.store import ModelStoreError

    try:
        settings = resolve_settings(args)
    except ConfigError as exc:
        print(f"appliance: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if settings.demo_models:
        settings = use_demo(settings)
        print(_paragraph(DEMO_WARNING), file=sys.stderr)
    else:
        try:
            prepare_models(settings, fetch=not args.no_fetch)
        except (ModelStoreError, OSError) as exc:
            print(_paragraph(NO_MODELS_HELP.format(problem=exc)), file=sys.stderr)
            if not args.fallback_demo:
                return 2
            print("Continuing with the demo models (--fallback-demo).", file=sys.stderr)
            print(_paragraph(DEMO_WARNING), file=sys.stderr)
            settings = use_demo(settings)
    try:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            access_log=None,
            # SIGTERM: the listener closes at once, streams get 1001 (on_shutdown), and
            # requests in flight have SHUTDOWN_GRACE_S to finish before their sockets close.
            shutdown_timeout=settings.shutdown_grace_s,
            # After an early answer (408, 413) aiohttp reads and discards the rest of the body
            # for `lingering_time` (10 s by default): 2 s still lets an honest uploader read
            # the answer, and a slow sender's socket is closed sooner.
            lingering_time=2.0,
            print=lambda msg: print(msg, file=sys.stderr),
        )
    except StartupError as exc:
        print(f"appliance: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0
