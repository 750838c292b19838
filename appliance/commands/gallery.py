"""`appliance gallery calibrate | export | import`: the gallery without the server.

calibrate DIR: for labelled photos `DIR/<subject>/*.jpg|png` (one face each; the largest is
used) it runs the configured detector and recognizer, prints the genuine and impostor
similarity distributions and the IDENTIFY_THRESHOLD that keeps the false-accept rate at
`--far`. export FILE / import FILE: snapshots of GALLERY_DB (stop the service first, or use
the API, since one process should own the database's writes).

Exit codes: 0 done; 1 nothing to calibrate (too few faces or subjects); 2 bad settings,
models or files.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import ConfigError, Settings, load_settings
from appliance.gallery.errors import GalleryError

EXIT_OK, EXIT_EMPTY, EXIT_CONFIG = 0, 1, 2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "gallery",
        help="calibrate the identify threshold; export or import gallery snapshots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML settings file (also APPLIANCE_CONFIG)")
    p.add_argument("--models-dir", type=Path, help="model directory (MODELS_DIR)")
    p.add_argument("--gallery-db", type=Path, help="gallery database (GALLERY_DB)")
    actions = p.add_subparsers(dest="gallery_command", required=True, metavar="ACTION")
    cal = actions.add_parser("calibrate", help="threshold at a false-accept rate from DIR")
    cal.add_argument("dir", type=Path, help="DIR/<subject>/*.jpg|png")
    cal.add_argument("--far", type=float, default=1e-3, help="false-accept rate (default 1e-3)")
    exp = actions.add_parser("export", help="write a snapshot of GALLERY_DB")
    exp.add_argument("file", type=Path)
    imp = actions.add_parser("import", help="load a snapshot into GALLERY_DB")
    imp.add_argument("file", type=Path)
    imp.add_argument("--mode", choices=("merge", "replace"), default="merge")
    p.set_defaults(handler=run)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.models_dir:
        overrides["models_dir"] = args.models_dir
    if args.gallery_db:
        overrides["gallery_db"] = args.gallery_db
    return load_settings(config_file=args.config, **overrides)


def labelled_photos(root: Path) -> list[tuple[str, Path]]:
    return [
        (subject.name, photo)
        for subject in sorted(p for p in root.iterdir() if p.is_dir())
        for photo in sorted(subject.iterdir())
        if photo.suffix.lower() in IMAGE_SUFFIXES
    ]


async def embed_photos(
    settings: Settings, photos: list[tuple[str, Path]]
) -> tuple[list[str], np.ndarray[Any, np.dtype[np.float32]], list[Path]]:
    """Labels and embeddings of the photos that have a face; the paths that have none."""
    import cv2

    from appliance.commands.local_pipeline import open_pipeline
    from appliance.gallery.enrol import enrolment_face

    labels: list[str] = []
    vecs: list[np.ndarray[Any, np.dtype[np.float32]]] = []
    no_face: list[Path] = []
    async with open_pipeline(settings) as pipe:
        for subject, path in photos:
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            face = (
                None
                if img is None
                else await enrolment_face(
                    pipe.analyzer, np.asarray(img, np.uint8), settings.det_threshold
                )
            )
            if face is None:
                no_face.append(path)
                continue
            labels.append(subject)
            vecs.append(face.embedding)
    dim = vecs[0].shape[0] if vecs else 0
    return labels, np.stack(vecs) if vecs else np.zeros((0, dim), np.float32), no_face


def ceil2(value: float) -> float:
    """Round up to two decimals: rounding down would accept more impostors than measured."""
    return float(np.ceil(value * 100.0) / 100.0)


def calibrate_dir(settings: Settings, root: Path, far: float) -> int:
    from appliance.gallery.calibrate import calibrate, histogram, summary
    from appliance.gallery.thresholds import effective_threshold

    if not root.is_dir():
        print(f"appliance gallery calibrate: {root} is not a directory", file=sys.stderr)
        return EXIT_CONFIG
    photos = labelled_photos(root)
    from appliance.models.loader import ModelLoadError

    try:
        labels, vecs, no_face = asyncio.run(embed_photos(settings, photos))
    except ModelLoadError as exc:
        print(f"appliance gallery calibrate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for path in no_face:
        print(f"no face found, skipped: {path}")
    if len(set(labels)) < 2:
        print("calibration needs faces of at least two subjects", file=sys.stderr)
        return EXIT_EMPTY
    result = calibrate(labels, vecs, far)
    current = effective_threshold(settings.identify_threshold, settings.rec_model)
    print(f"{len(labels)} faces of {len(set(labels))} subjects, recognizer {settings.rec_model}")
    print(f"\ngenuine (same subject): {summary(result.genuine)}")
    print("\n".join(histogram(result.genuine)) if result.genuine.size else "")
    print(f"\nimpostor (different subjects): {summary(result.impostor)}")
    print("\n".join(histogram(result.impostor)))
    print(
        f"\nthreshold at FAR {far:g}: {result.threshold:.4f} (impostor accept "
        f"{result.achieved_far:.4g}, genuine reject {result.frr:.4g})"
    )
    if result.impostor.size * far < 1:
        print(
            f"note: {result.impostor.size} impostor pairs cannot resolve a FAR of {far:g}; "
            "add subjects for a finer estimate"
        )
    print(
        f"current IDENTIFY_THRESHOLD: {current:.4f}; set IDENTIFY_THRESHOLD={result.threshold:.2f}"
    )
    return EXIT_OK


def _recognizer_of(settings: Settings) -> Any:
    from appliance.gallery.records import Recognizer
    from appliance.models.registry import ModelRegistry
    from appliance.models.store import ModelStore

    store = ModelStore(
        settings.models_dir,
        ModelRegistry.load(settings.override_file),
        trust_unverified=settings.trust_unverified,
    )
    found = store.require_verified(settings.rec_model)
    return Recognizer(settings.rec_model, found.sha256 or "")


def run(args: argparse.Namespace) -> int:
    from appliance.gallery import snapshot
    from appliance.gallery.gallery import Gallery
    from appliance.gallery.store import GalleryStore
    from appliance.models.store import ModelStoreError

    try:
        settings = _settings(args)
        if args.gallery_command == "calibrate":
            return calibrate_dir(settings, args.dir, args.far)
        if args.gallery_command == "export":
            # The snapshot carries the recognizer the gallery was built with; no model needed.
            store = GalleryStore(settings.gallery_db)
            bound = store.recognizer()
            store.close()
            if bound is None:
                print(f"appliance gallery export: {settings.gallery_db} is empty", file=sys.stderr)
                return EXIT_EMPTY
            gallery = Gallery(settings.gallery_db, bound)
            checksum = snapshot.export_file(gallery, args.file)
            subjects, faces = gallery.counts()
            print(f"exported {subjects} subjects, {faces} faces to {args.file} ({checksum})")
            return EXIT_OK
        gallery = Gallery(settings.gallery_db, _recognizer_of(settings))
        result = snapshot.import_snapshot(gallery, snapshot.read(args.file), args.mode)
        print(
            f"imported {result.subjects_added} subjects, {result.faces_added} faces "
            f"({result.faces_skipped} already present); gallery has "
            f"{gallery.counts()[0]} subjects"
        )
        return EXIT_OK
    except (ConfigError, ModelStoreError, GalleryError, OSError) as exc:
        print(f"appliance gallery {args.gallery_command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
