"""What does decoding large JPEGs at a reduced DCT scale change? Measured on the shared photos.

For every shared JPEG at least twice the detector input, the real models analyse it decoded
in full and decoded by `ImageDecoder.decode_for` at each margin (1: the smallest libjpeg-turbo
scale that still covers the letterbox; 2: twice that), and the script prints, per photo and
margin: the DCT factor, decode time (median), faces found in each, the largest box-corner and
landmark difference in original-image pixels, and the lowest cosine similarity between the two
embeddings of a face. The default margin (`JPEG_DCT_SCALING`) is chosen from this output:
docs/BENCHMARKS.md.

    python benchmarks/dct_scaling.py --shared ../shared
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import load_settings
from appliance.models.loader import LoadedModels, load_models
from appliance.pipeline.batcher import DynamicBatcher
from appliance.pipeline.faces import AnalyzeOptions, Face, FaceAnalyzer
from appliance.pipeline.images import Decoded, ImageDecoder, dct_scale, exif_orientation

OPTIONS = AnalyzeOptions(threshold=0.5, extract_embedding=True)


def timed(fn: Callable[..., object], repeat: int, *args: Any, **kwargs: Any) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare(full: list[Face], reduced: list[Face]) -> tuple[int, int, float, float, float]:
    """(faces full, faces reduced, max box diff px, max landmark diff px, min similarity)."""
    box_diff = lm_diff = 0.0
    min_sim = 1.0
    for face in full:
        if not reduced:
            break
        distance = [np.abs(np.subtract(face.bbox, r.bbox)).max() for r in reduced]
        other = reduced[int(np.argmin(distance))]
        box_diff = max(box_diff, float(min(distance)))
        if face.landmarks is not None and other.landmarks is not None:
            lm_diff = max(lm_diff, float(np.abs(face.landmarks - other.landmarks).max()))
        if face.vec is not None and other.vec is not None:
            min_sim = min(min_sim, float(face.vec @ other.vec))
    return len(full), len(reduced), box_diff, lm_diff, min_sim


async def run(shared: Path, margins: list[float], repeat: int) -> None:
    settings = load_settings(
        env={},
        models_dir=shared / "models",
        det_model="scrfd_2.5g_bnkps",
        rec_model="mobilefacenet_128",
        det_workers=1,
        rec_workers=1,
    )
    loaded: LoadedModels = load_models(settings)
    det, rec = loaded.detector, loaded.recognizer
    det_b = DynamicBatcher("detector", det.backend.infer, det.backend.max_batch, 0, 64)
    rec_b = DynamicBatcher("recognizer", rec.backend.infer, rec.backend.max_batch, 0, 64)
    det_b.start()
    rec_b.start()
    analyzer = FaceAnalyzer(det.slot(det_b), rec.slot(rec_b), ThreadPoolExecutor(2))
    decoder = ImageDecoder.create(200_000_000)
    assert decoder.turbo is not None, "libturbojpeg is needed for DCT scaling"
    fit = settings.max_size
    photos = sorted((shared / "photos").rglob("*.jpg"))
    print(
        "photo | size | margin | factor | decode ms full / reduced | faces | box px | lm px | min sim"
    )
    for path in photos:
        data = path.read_bytes()
        info = decoder.probe(data)
        if (
            dct_scale(
                info.width,
                info.height,
                exif_orientation(data),
                fit,
                1.0,
                decoder.turbo.scaling_factors,
            )
            is None
        ):
            continue
        full_ms = timed(decoder.decode, repeat, data)
        full = (await analyzer.analyze(Decoded(decoder.decode(data), 1.0, 1.0), OPTIONS)).faces
        for margin in margins:
            factor = dct_scale(
                info.width,
                info.height,
                exif_orientation(data),
                fit,
                margin,
                decoder.turbo.scaling_factors,
            )
            reduced_ms = timed(decoder.decode_for, repeat, data, fit, margin=margin)
            image = decoder.decode_for(data, fit, margin=margin)
            reduced = (await analyzer.analyze(image, OPTIONS)).faces
            n_full, n_red, box, lm, sim = compare(full, reduced)
            name = path.relative_to(shared / "photos")
            print(
                f"{name} | {info.width}x{info.height} | {margin:g} | "
                f"{factor[0] if factor else 1}/{factor[1] if factor else 1} | "
                f"{full_ms:.1f} / {reduced_ms:.1f} | {n_full} / {n_red} | {box:.2f} | "
                f"{lm:.2f} | {sim:.4f}"
            )
    await det_b.stop()
    await rec_b.stop()
    loaded.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).parents[2] / "shared")
    parser.add_argument("--margins", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(run(args.shared, args.margins, args.repeat))


if __name__ == "__main__":
    main()
