"""benchmarks/contrast_margins_real.py: each rule's margin on a case's healthy tissue, the tumour left out."""

from __future__ import annotations

import numpy as np

from conftest import load_benchmark
from MedSynthLib.schema.labels import Label

margins = load_benchmark("contrast_margins_real")


def test_the_margins_compare_healthy_tissue_only() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros((8, 8, 24), np.uint8)
    labels[1:7, 1:7, 1:7] = Label.CSF
    labels[1:7, 1:7, 7:13] = Label.GM
    labels[1:7, 1:7, 13:19] = Label.WM
    labels[1:7, 1:7, 19:23] = Label.ED
    level = {Label.CSF: 0.0, Label.GM: 1.0, Label.WM: 2.0, Label.ED: -3.0}  # oedema darker than CSF on FLAIR
    images = {}
    for modality in ("t1", "t1ce", "t2", "flair"):
        image = rng.normal(0, 0.01, labels.shape)
        for value, mean in level.items():
            image[labels == value] += mean
        images[modality] = image
    found = margins.healthy_margins(images, labels)
    assert set(found) == {"T1: CSF < GM", "T1: GM < WM", "T2: CSF brightest", "FLAIR: CSF darkest"}
    assert found["FLAIR: CSF darkest"] > 0  # the oedema's darker FLAIR does not count: the tumour is left out
    assert found["T2: CSF brightest"] < 0  # CSF is the darkest healthy class here, so this rule's margin is negative
    spread = np.concatenate([images["t1"][labels == v] for v in (Label.CSF, Label.GM, Label.WM)]).std()
    assert abs(found["T1: GM < WM"] - 1.0 / spread) < 0.01  # z-scored in the healthy brain
