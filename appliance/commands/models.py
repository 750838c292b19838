"""`appliance models list | fetch | verify`: the registry's models and their files on disk.

Settings (MODELS_DIR, TRUST_UNVERIFIED, MODELS_OVERRIDE) come from the environment and the
optional TOML file; the flags below override them. Exit codes: 0 everything asked for is
usable, 1 a model is missing, mismatching or failed to download, 2 bad settings, an unknown
model name or a bad override file.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from appliance.config import ConfigError, Settings, load_settings
from appliance.logs import configure_logging
from appliance.models.registry import ModelRegistry, RegistryError, model_names
from appliance.models.store import (
    ModelStatus,
    ModelStore,
    ModelStoreError,
    UnknownModelError,
    VerifyResult,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "models",
        help="list, download and verify model files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    ls = actions.add_parser("list", help="the registry with each model's state on disk")
    _common(ls)
    ls.add_argument(
        "--quick", action="store_true", help="only say present/missing; do not hash the files"
    )

    fetch = actions.add_parser("fetch", help="download models, verify them, put them in place")
    _common(fetch)
    fetch.add_argument("names", nargs="*", metavar="NAME", help="registry names to fetch")
    fetch.add_argument(
        "--all-defaults", action="store_true", help="fetch the configured DET_MODEL and REC_MODEL"
    )
    fetch.add_argument("--force", action="store_true", help="download again even if present")
    fetch.add_argument(
        "--trust-unverified",
        action="store_true",
        help="accept models without a published checksum (TRUST_UNVERIFIED)",
    )

    verify = actions.add_parser(
        "verify", help="check files against their checksums and print their sha256"
    )
    _common(verify)
    verify.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="registry names (default: DET_MODEL, REC_MODEL and every model file present)",
    )
    p.set_defaults(handler=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML settings file (also APPLIANCE_CONFIG)")
    p.add_argument("--models-dir", type=Path, help="model directory (MODELS_DIR)")
    p.add_argument("--override", type=Path, help="model override JSON file (MODELS_OVERRIDE)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.models_dir:
        overrides["models_dir"] = args.models_dir
    if args.override:
        overrides["models_override"] = args.override
    if getattr(args, "trust_unverified", False):
        overrides["trust_unverified"] = True
    return load_settings(config_file=args.config, **overrides)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        settings = settings_from_args(args)
        registry = ModelRegistry.load(settings.override_file)
    except (ConfigError, RegistryError) as exc:
        print(f"appliance models: {exc}", file=err)
        return EXIT_USAGE
    # The command prints its own report; the store's info events would repeat it on stderr.
    level = "DEBUG" if settings.log_level.upper() == "DEBUG" else "WARNING"
    configure_logging(level, settings.log_format)
    store = ModelStore(settings.models_dir, registry, trust_unverified=settings.trust_unverified)
    command: Callable[[argparse.Namespace, Settings, ModelStore, TextIO, TextIO], int] = {
        "list": list_models,
        "fetch": fetch_models,
        "verify": verify_models,
    }[args.models_command]
    try:
        return command(args, settings, store, out, err)
    except UnknownModelError as exc:
        print(f"appliance models: {exc}", file=err)
        return EXIT_USAGE


# -- list ----------------------------------------------------------------------------------


def list_models(
    args: argparse.Namespace, settings: Settings, store: ModelStore, out: TextIO, err: TextIO
) -> int:
    # The models the settings select must exist with the right family: the appliance role runs
    # this against a new release's settings and override before switching to it.
    det, rec = model_names(settings)
    try:
        store.registry.selected(det, rec)
    except RegistryError as exc:
        print(f"appliance models: {exc}", file=err)
        return EXIT_USAGE
    rows = [("NAME", "FAMILY", "FILE", "STATE", "CHECKSUM", "SELECTED")]
    for name in store.registry.names():
        info = store.info(name)
        if args.quick:
            state = "present" if store.path(name).is_file() else ModelStatus.MISSING.value
        else:
            state = _state(store, name)
        chosen = "DET_MODEL" if name == det else "REC_MODEL" if name == rec else ""
        rows.append((name, info.family, info.file, state, info.checksum or "-", chosen))
    print(format_table(rows), file=out)
    print(f"model directory: {settings.models_dir}", file=out)
    return EXIT_OK


def _state(store: ModelStore, name: str) -> str:
    try:
        return store.status(name).value
    except (ModelStoreError, OSError) as exc:
        return f"error: {exc}"


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


# -- fetch ---------------------------------------------------------------------------------


def fetch_models(
    args: argparse.Namespace, settings: Settings, store: ModelStore, out: TextIO, err: TextIO
) -> int:
    names = list(args.names)
    if args.all_defaults:
        names += [settings.det_model, settings.rec_model]
    if not names:
        print("appliance models fetch: name at least one model, or --all-defaults", file=err)
        return EXIT_USAGE
    for name in names:
        store.info(name)  # an unknown name stops everything before any download
    code = EXIT_OK
    for name in dict.fromkeys(names):
        display = ProgressDisplay(name, err)
        try:
            result = store.fetch_verified(name, progress=display, force=args.force)
        except (ModelStoreError, OSError) as exc:
            display.close()
            print(f"{name}: failed: {exc}", file=err)
            code = EXIT_FAILED
            continue
        display.close()
        action = "downloaded" if result.fetched else "already in place"
        print(f"{describe(result)} ({action})", file=out)
    return code


def describe(result: VerifyResult) -> str:
    """One line per model: state, the checked digest, the sha256 to pin, the path."""
    name = result.name
    if result.status is ModelStatus.MISSING:
        return f"{name}: missing: {result.path}"
    if result.status is ModelStatus.CHECKSUM_MISMATCH:
        return (
            f"{name}: checksum-mismatch: expected {result.expected}, got {result.actual} "
            f"sha256:{result.sha256} {result.path}"
        )
    if result.status is ModelStatus.VERIFIED:
        return f"{name}: verified {result.expected} sha256:{result.sha256} {result.path}"
    return (
        f"{name}: present-unverified (no checksum in the registry; pin "
        f'"checksum": "sha256:{result.sha256}") sha256:{result.sha256} {result.path}'
    )


def format_progress(name: str, done: int, total: int | None, rate: float | None) -> str:
    """'fetching NAME:  50.0%   1.0 of   2.0 MB   3.1 MB/s' (percent only with a total)."""
    mb = 1e6
    pct = f"{100.0 * done / total:5.1f}% " if total else ""
    size = f"{done / mb:7.1f} of {total / mb:7.1f} MB" if total else f"{done / mb:7.1f} MB"
    speed = f"  {rate / mb:6.1f} MB/s" if rate is not None else ""
    return f"fetching {name}: {pct}{size}{speed}"


class ProgressDisplay:
    """A download's progress on stderr: one rewritten line on a terminal, else a line every
    `interval_s` (logs and Ansible capture every line, so they get fewer)."""

    def __init__(
        self,
        name: str,
        out: TextIO,
        *,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._name = name
        self._out = out
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._interval_s = interval_s if interval_s is not None else (0.2 if self._tty else 5.0)
        self._clock = clock
        self._started: float | None = None
        self._first = 0
        self._last_shown = float("-inf")
        self._open_line = False

    def __call__(self, done: int, total: int | None) -> None:
        now = self._clock()
        if self._started is None:
            # The rate counts this session's bytes only, not those a resume started from.
            self._started, self._first = now, done
        finished = total is not None and done >= total
        if not finished and now - self._last_shown < self._interval_s:
            return
        self._last_shown = now
        elapsed = now - self._started
        rate = (done - self._first) / elapsed if elapsed > 0 else None
        line = format_progress(self._name, done, total, rate)
        if self._tty:
            self._out.write("\r" + line)
            self._open_line = not finished
            if finished:
                self._out.write("\n")
        else:
            self._out.write(line + "\n")
        self._out.flush()

    def close(self) -> None:
        if self._open_line:
            self._out.write("\n")
            self._open_line = False


# -- verify --------------------------------------------------------------------------------


def verify_models(
    args: argparse.Namespace, settings: Settings, store: ModelStore, out: TextIO, err: TextIO
) -> int:
    names = list(args.names) or _default_verify_names(settings, store)
    for name in names:
        store.info(name)
    code = EXIT_OK
    for name in dict.fromkeys(names):
        try:
            result = store.verify(name)
        except (ModelStoreError, OSError) as exc:
            print(f"{name}: error: {exc}", file=err)
            code = EXIT_FAILED
            continue
        print(describe(result), file=out)
        if not result.ok:
            code = EXIT_FAILED
    return code


def _default_verify_names(settings: Settings, store: ModelStore) -> list[str]:
    configured = [settings.det_model, settings.rec_model]
    present: Iterable[str] = (n for n in store.registry.names() if store.path(n).is_file())
    return [*configured, *(n for n in present if n not in configured)]
