"""Open-set calibration: hand-computed thresholds, and the CLI on the real photos."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main
from appliance.gallery import Gallery, NewFace, Recognizer
from appliance.gallery.calibrate import calibrate, pair_similarities, threshold_at_far
from tests.gallery_fixtures import PHOTOS, needs_shared, real_settings


def test_pairs_split_into_genuine_and_impostor() -> None:
    vecs = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    genuine, impostor = pair_similarities(["a", "a", "b"], vecs)
    assert genuine.tolist() == [1.0]
    assert sorted(impostor.tolist()) == [0.0, 0.0]


def test_threshold_at_far_lets_through_at_most_far_of_the_impostors() -> None:
    impostor = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], np.float32)
    # 10 pairs at FAR 0.1: one may pass (0.95); the threshold sits just above 0.9.
    thr = threshold_at_far(impostor, 0.1)
    assert float(np.float32(0.9)) < thr < 0.9 + 1e-6
    assert np.mean(impostor.astype(np.float64) >= thr) == pytest.approx(0.1)
    # FAR 0: above every impostor.
    assert threshold_at_far(impostor, 0.0) > float(np.float32(0.95))
    result = calibrate(
        ["a", "a", "b", "b"], np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], np.float32), 0.0
    )
    # Impostor pairs: 0, 0.6, 0.6, 0.96; genuine 0.8, 0.8 -> threshold above 0.96 rejects both.
    assert result.threshold > 0.95
    assert (result.achieved_far, result.frr) == (0.0, 1.0)


@needs_shared
def test_calibrate_command_on_the_shared_gallery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = real_settings(tmp_path)
    config = tmp_path / "settings.toml"
    config.write_text(
        "\n".join(
            f'{k} = "{v}"' if isinstance(v, (str, Path)) else f"{k} = {str(v).lower()}"
            for k, v in {
                "models_dir": settings.models_dir,
                "models_override": settings.models_override,
                "det_model": settings.det_model,
                "rec_model": settings.rec_model,
                "trust_unverified": True,
                "det_batch_size": 1,
                "rec_batch_size": 1,
                "det_threshold": 0.5,
                "inference_backend": "onnx",
            }.items()
        )
    )
    code = main(["gallery", "--config", str(config), "calibrate", str(PHOTOS / "gallery")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "5 faces of 3 subjects" in out
    # obama and biden have two photos each: 2 genuine pairs; 10 pairs in all -> 8 impostor.
    assert re.search(r"genuine \(same subject\): 2 pairs", out)
    assert re.search(r"impostor \(different subjects\): 8 pairs", out)
    impostor_max = float(re.search(r"impostor.*max (-?[0-9.]+)", out).group(1))  # type: ignore[union-attr]
    genuine_min = float(re.search(r"genuine.*min (-?[0-9.]+)", out).group(1))  # type: ignore[union-attr]
    threshold = float(re.search(r"threshold at FAR 0.001: (-?[0-9.]+)", out).group(1))  # type: ignore[union-attr]
    # DATA.md: strangers score at most ~0.23, the same person well above 0.5.
    assert impostor_max < 0.25 < 0.5 < genuine_min
    # FAR 1e-3 of 8 pairs lets none through: just above the highest impostor (printed 3 dp).
    assert threshold == pytest.approx(impostor_max, abs=6e-4)
    assert "genuine reject 0" in out


def test_export_and_import_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "src.db"
    g = Gallery(src, Recognizer("test_arcface", "f" * 64))
    g.add_faces("ada", [NewFace(rng.standard_normal(16).astype(np.float32))], create=True)
    g.close()
    snap = tmp_path / "g.snapshot"
    assert main(["gallery", "--gallery-db", str(src), "export", str(snap)]) == 0
    assert "exported 1 subjects, 1 faces" in capsys.readouterr().out
    # Importing needs the configured recognizer's file to compare sha256: none here.
    code = main(
        [
            "gallery",
            "--gallery-db",
            str(tmp_path / "dst.db"),
            "--models-dir",
            str(tmp_path),
            "import",
            str(snap),
        ]
    )
    assert code == 2
    assert "glintr100" in capsys.readouterr().err
