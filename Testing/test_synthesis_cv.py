"""benchmarks/synthesis_cv.py: the montage's rows, also for a label map without the normaliser's reference tissue."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark, write_phantom_case, write_random_model
from MedSynthLib.cases.readers import read_case
from MedSynthLib.schema.labels import Label
from MedSynthLib.synthesis.models import resolve_model
from MedSynthLib.synthesis.networks import MODALITY_ORDER
from MedSynthLib.synthesis.synthesize import SynthesisEngine

cv = load_benchmark("synthesis_cv")


@pytest.fixture(scope="module")
def tissue_zscore_engine(tmp_path_factory) -> SynthesisEngine:
    """A random-weight tiny model whose contrasts are normalised as the shipped models' are (tissue z-score)."""
    intensity = {m: {"kind": "tissue_zscore", "mean": 600.0, "std": 150.0, "scale": 15.0} for m in MODALITY_ORDER}
    folder = write_random_model(tmp_path_factory.mktemp("models") / "tiny_tz", intensity, seed=11)
    return SynthesisEngine(resolve_model(folder), device="cpu", precision="fp32")


def _labels_of(case) -> np.ndarray:
    """A MedSynth label map of the phantom: its segmentation's tumour, grey matter around it, white matter inside."""
    brain = np.any([case.images[m] > 0 for m in MODALITY_ORDER], axis=0)
    labels = np.where(brain, np.uint8(Label.GM), np.uint8(0))
    labels[brain & (case.images["t1"] > np.median(case.images["t1"][brain]))] = Label.WM
    return np.where(case.tumour > 0, case.tumour, labels).astype(np.uint8)


@pytest.mark.parametrize("anatomy", ["grey and white matter", "CSF only"])
def test_the_montage_places_every_row_even_without_the_reference_tissue(
        tissue_zscore_engine, tmp_path, anatomy) -> None:
    folder = write_phantom_case(tmp_path / "cases", seed=3)
    case = read_case(folder, require_segmentation=True)
    labels = _labels_of(case)
    assert (labels >= Label.NCR).any()
    if anatomy == "CSF only":  # e.g. a tumour-only map whose healthy brain was filled with one class
        labels[(labels == Label.GM) | (labels == Label.WM)] = Label.CSF
    brain = np.any([case.images[m] > 0 for m in MODALITY_ORDER], axis=0)
    images, in_frame = cv.synthesis_in_patient_frame(case, labels, tissue_zscore_engine, brain)
    assert in_frame == (anatomy == "grey and white matter")
    for m in MODALITY_ORDER:
        inside = images[m][brain]
        assert np.isfinite(inside).all() and inside.std() > 0
        if not in_frame:  # z-scored on its own over the brain
            assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1.0) < 1e-3
    path = tmp_path / "montage.png"
    cv._montage(case, folder, labels, [("tiny", tissue_zscore_engine)], path)
    assert path.stat().st_size > 1000
